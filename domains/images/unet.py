"""diffusers UNets as score networks of the core's SDE, and CTRL's augmented model around them.

A diffusers UNet predicts the noise eps(x_n, n) of a DDPM schedule. With the schedule written as a
:class:`ctrl_bio.sde.DiscreteScheduleSDE`, the same network is a score s(x, t) = -eps(x, t N - 1) / sigma_t of
DESIGN.md's convention, so the core's sampler, KL and estimators run on it unchanged. :class:`UNetScore` does this for a
pixel-space ``UNet2DModel`` (the CPU suite) and, given fixed text embeddings, for a ``UNet2DConditionModel`` (Stable
Diffusion; ``domains.images.stable_diffusion``).

:class:`UNetAugmentedScore` is CTRL's augmented model (Zhao et al. 2024, Sec. 4.2) for such a network: the UNet is
frozen; a :class:`ctrl_bio.model.LabelEmbedding` (one zero-initialised row per class plus a null row) becomes the
UNet's ``class_embedding`` during the model's calls, which diffusers adds to the time embedding, and optional peft
LoRA adapters (their B matrices start at zero) sit on the attention projections. At initialisation both are
exactly zero, so step 0 reproduces the pre-trained sampler bit for bit; a null request (-1) always gets the
pre-trained score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_bio.lora import inject_lora, lora_disabled
from ctrl_bio.model import NULL_LABEL, LabelEmbedding, check_labels
from ctrl_bio.sde import DiscreteScheduleSDE

#: Attention projections that get LoRA adapters (diffusers' ``Attention`` module names; SD's UNet and UNet2DModel).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def time_embedding_dim(unet: nn.Module) -> int:
    """Width of a diffusers UNet's time embedding, which the class embedding is added to."""
    return int(unet.time_embedding.linear_2.out_features)


class UNetScore(nn.Module):
    """A pixel-space diffusers ``UNet2DModel`` (noise prediction) as a score network ``(x, t) -> s``.

    Args:
        sde: the discrete schedule the UNet is trained on.
        **unet_config: keyword arguments of ``diffusers.UNet2DModel`` (kept as ``config``, so that
            :func:`ctrl_bio.training.runs.export_network` can rebuild the network).
    """

    def __init__(self, sde: DiscreteScheduleSDE, **unet_config: Any):
        super().__init__()
        from diffusers import UNet2DModel

        if not isinstance(sde, DiscreteScheduleSDE):
            raise TypeError(f"UNetScore needs a DiscreteScheduleSDE (the UNet's timesteps), got {type(sde).__name__}")
        self.sde = sde
        self.config = dict(unet_config)
        self.unet = UNet2DModel(**unet_config)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        eps = self.unet(x, self.sde.timestep(t), class_labels=class_labels).sample
        return self.sde.score_from_eps(eps, t)


class UNetAugmentedScore(nn.Module):
    """s_theta(x, t, y) of CTRL for a frozen diffusers UNet: label embedding in the time embedding, optional LoRA.

    Args:
        score: a frozen score network ``score(x, t, class_labels=None) -> s`` with a diffusers ``unet`` attribute
            (:class:`UNetScore`, or the Stable Diffusion wrapper); frozen in place.
        n_classes: classes per label.
        lora_rank: rank of the LoRA adapters on the UNet's attention projections; 0: none.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank).
        lora_targets: module names the adapters go on.
    """

    def __init__(self, score: nn.Module, n_classes: Sequence[int], *, lora_rank: int = 0,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = LORA_TARGETS):
        super().__init__()
        score.requires_grad_(False)
        self.score = score
        unet = score.unet
        if getattr(unet, "class_embedding", None) is not None:
            raise ValueError("the UNet already has a class embedding: CTRL's label embedding takes that place")
        # Held here and put into the UNet only for the duration of a call (:meth:`labels_installed`), so that the
        # frozen network stays the pre-trained one for everyone else who holds it (guidance baselines, other rows).
        self.embedding = LabelEmbedding(n_classes, time_embedding_dim(unet))
        self.n_classes = self.embedding.n_classes
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha or self.lora_rank)
        self.lora_targets = tuple(lora_targets)
        if self.lora_rank > 0:
            # LoRA layers are injected into the UNet itself (peft; diffusers' UNet2DModel has no add_adapter); with
            # the adapters disabled they are the identity, which is how the pre-trained score is computed.
            inject_lora(unet, self.lora_rank, self.lora_alpha, self.lora_targets)

    # The :class:`ctrl_bio.hub.AdapterModel` methods, by which save_pretrained / from_pretrained write and rebuild it.

    def adapted_network(self) -> nn.Module:
        """The score network with the adapters in its UNet (``score``)."""
        return self.score

    def adapter_host(self) -> nn.Module:
        return self.score.unet

    def pathway_config(self) -> dict[str, Any]:
        return {"n_classes": list(self.n_classes)}

    @contextmanager
    def labels_installed(self) -> Iterator[None]:
        """The label embedding as the UNet's ``class_embedding`` (diffusers adds it to the time embedding)."""
        unet = self.score.unet
        unet.class_embedding = self.embedding
        try:
            yield
        finally:
            unet.class_embedding = None

    def _call(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        with self.labels_installed():
            return self.score(x, t, class_labels=class_labels)

    def _pretrained(self, x: Tensor, t: Tensor) -> Tensor:
        null = torch.full((x.shape[0], len(self.n_classes)), NULL_LABEL, dtype=torch.long, device=x.device)
        if self.lora_rank == 0:
            return self._call(x, t, null)
        with lora_disabled(self.score.unet):
            return self._call(x, t, null)

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(s_theta, u = s_theta - s_pre); both from the same frozen UNet."""
        b = x.shape[0]
        if self.lora_rank == 0:  # one call on the doubled batch: the null half is exactly the pre-trained network
            null = torch.full_like(y, NULL_LABEL)
            both = self._call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
            s, s_pre = both[:b], both[b:]
        else:
            s, s_pre = self._call(x, t, y), self._pretrained(x, t)
            active = (y != NULL_LABEL).any(dim=1).view(b, *([1] * (x.ndim - 1)))
            s = torch.where(active, s, s_pre)  # LoRA acts whatever the label: a null request must not see it
        return s, s - s_pre

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """s_theta alone (denoising score matching needs no s_pre): one UNet call unless LoRA meets a null request."""
        if self.lora_rank == 0 or bool((y != NULL_LABEL).any(dim=1).all()):
            return self._call(x, t, y)
        return self.score_and_control(x, t, y)[0]

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        check_labels(y, self.n_classes)
        return lambda x, t: self.score_and_control(x, t, y)
