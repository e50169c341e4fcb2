"""CTRL's label pathway inside a frozen network: a label embedding in its time embedding plus LoRA adapters.

A label embedding alone (:class:`ctrl_bio.model.EmbeddingAugmentedScore`) can only shift the conditioning every
layer already receives; low-rank adapters (Hu et al. 2022, "LoRA") on chosen layers give the pathway a say in what
those layers compute. Both start at zero (peft's LoRA B matrices are zero-initialised), so step 0 of fine-tuning
reproduces the pre-trained sampler bit for bit; the image and molecule suites measured what the adapters add
(benchmarks/images/README.md, probes D and E; domains/molecules/pathway.py). peft is imported only when adapters are
asked for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_bio.label_space import ContinuousLabels, label_space_of
from ctrl_bio.model import LabelEmbedding

#: The peft adapter name of CTRL's LoRA layers (the Hub folders and the seeded re-draw find them by it).
ADAPTER_NAME = "ctrl"


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every peft adapter layer inside ``module`` on or off (off: each layer is its frozen base layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


@contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Inside the block every adapter in ``module`` is off, i.e. ``module`` is its frozen pre-trained self."""
    set_lora_enabled(module, False)
    try:
        yield
    finally:
        set_lora_enabled(module, True)


def inject_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Put rank-``rank`` peft LoRA adapters (named ``ctrl``) on the ``targets`` of ``module``, in place.

    Their B matrices start at zero, so ``module`` computes what it did before; afterwards only adapter weights
    require gradients, and conv adapters get their base layer's dilation (:func:`match_conv_dilation`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True),
                            module, adapter_name=ADAPTER_NAME)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    match_conv_dilation(module)


def match_conv_dilation(module: nn.Module) -> None:
    """Give every convolutional adapter the dilation of the convolution it adapts.

    peft (up to at least 0.21) builds a conv adapter's ``lora_A`` with the base layer's kernel, stride and padding but
    not its dilation (huggingface/peft#3697), so on a dilated convolution the two branches disagree in length and the
    forward pass fails. The fix is geometry only (``lora_A``'s weight does not depend on dilation); a peft that already
    copies it is left unchanged.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        base = getattr(layer, "base_layer", None)
        if isinstance(layer, BaseTunerLayer) and isinstance(base, nn.modules.conv._ConvNd):
            for lora_a in layer.lora_A.values():
                lora_a.dilation = base.dilation


class LoRAAugmentedScore(nn.Module):
    """s_theta(x, t, y) = the frozen ``net(x, t, extra_emb)`` with a label embedding and LoRA adapters.

    Args:
        net: a score network ``net(x, t, extra_emb=None) -> s`` with an ``emb_dim``; it is deep-copied before adapters
            go in, so the caller's network stays the pre-trained one (other rows sample from it).
        n_classes: classes per label (categorical labels: a :class:`ctrl_bio.model.LabelEmbedding`, -1 = no request).
        lora_rank: rank of the adapters; 0: the label embedding only.
        lora_alpha: LoRA scaling numerator (updates are scaled by lora_alpha / lora_rank); None: the rank.
        lora_targets: suffixes of the module names that get adapters.
        embedding: a zero-initialised embedding of real-valued labels instead (e.g.
            :class:`ctrl_bio.model.ContinuousLabelEmbedding`; NaN = no request; one of your own needs ``labels`` or
            ``n_labels``); ``n_classes`` is then ignored.
        label_time_features: sine/cosine features of t in the categorical label embedding (0: constant in t; see
            :class:`ctrl_bio.model.LabelEmbedding`).
        train_copy: train every weight of a copy of ``net`` instead of adapters (``lora_rank`` must be 0). The copy
            starts equal to ``net`` and the label embedding at zero, so u = 0 at step 0 as with adapters; s_pre stays
            the caller's frozen network. The pathway then has the pre-trained network's whole capacity (and size).
    """

    def __init__(self, net: nn.Module, n_classes: Sequence[int] = (), *, lora_rank: int = 4,
                 lora_alpha: float | None = None, lora_targets: Sequence[str],
                 embedding: nn.Module | None = None, label_time_features: int = 0, train_copy: bool = False):
        super().__init__()
        self.lora_rank = int(lora_rank)
        if train_copy and self.lora_rank > 0:
            raise ValueError(f"train_copy trains every weight of the copy: lora_rank must be 0, got {lora_rank}")
        self.train_copy = bool(train_copy)
        self.net = copy.deepcopy(net) if self.lora_rank > 0 or self.train_copy else net
        self.net.requires_grad_(self.train_copy)
        # The frozen pre-trained network beside a trained copy (a submodule, so that .to() moves it too).
        self.frozen = net.requires_grad_(False) if self.train_copy else None
        self.continuous = embedding is not None
        self.embedding = embedding if self.continuous else LabelEmbedding(n_classes, int(net.emb_dim),
                                                                          n_time_features=label_time_features)
        self.n_classes = None if self.continuous else self.embedding.n_classes
        # an embedding of real values that does not name its label space has K = its n_labels, NaN for none
        own = self.continuous and not hasattr(self.embedding, "labels")
        self.labels = ContinuousLabels(self.embedding.n_labels) if own else label_space_of(self.embedding)
        if self.lora_rank > 0:
            inject_lora(self.net, self.lora_rank, float(lora_alpha or self.lora_rank), lora_targets)

    # The :class:`ctrl_bio.hub.AdapterModel` methods, by which save_pretrained / from_pretrained write and rebuild it.

    def adapted_network(self) -> nn.Module:
        """The network with its adapters in (``net``)."""
        if self.continuous or self.train_copy:
            raise TypeError(f"cannot save this {type(self).__name__}: save_pretrained takes one with categorical "
                            "labels and adapters (no continuous embedding, no trained copy)")
        return self.net

    def adapter_host(self) -> nn.Module:
        return self.adapted_network()

    def pathway_config(self) -> dict[str, Any]:
        """The label settings a subclass's constructor takes too (the molecule pathway's does)."""
        return {"n_classes": list(self.n_classes), "label_time_features": self.embedding.n_time_features}

    def _pretrained(self, x: Tensor, t: Tensor) -> Tensor:
        if self.frozen is not None:
            return self.frozen(x, t)
        if self.lora_rank == 0:
            return self.net(x, t)
        with lora_disabled(self.net):
            return self.net(x, t)

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(s_theta, u = s_theta - s_pre); s_pre is the copy with its adapters off and no label, i.e. the pre-trained
        network exactly."""
        s, s_pre = self.net(x, t, self._embed(y, t)), self._pretrained(x, t)
        active = self._active(y).view(x.shape[0], *([1] * (x.ndim - 1)))
        s = torch.where(active, s, s_pre)  # the adapters act whatever the label: a null request must not see them
        return s, s - s_pre

    def _active(self, y: Tensor) -> Tensor:
        """Requests with at least one label asked for, (B,)."""
        return self.labels.requested(y).any(dim=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """s_theta alone: one network call unless a request is null."""
        if bool(self._active(y).all()):
            return self.net(x, t, self._embed(y, t))
        return self.score_and_control(x, t, y)[0]

    def _embed(self, y: Tensor, t: Tensor) -> Tensor:
        return self.embedding(y, t) if getattr(self.embedding, "time_dependent", False) else self.embedding(y)

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        self.labels.check(y)
        return lambda x, t: self.score_and_control(x, t, y)
