"""CTRL's label pathway for the graph score network: a label embedding in the time embedding plus LoRA adapters.

The label embedding alone (:class:`ctrl_bio.model.EmbeddingAugmentedScore`, 384 parameters for three classes) can
only shift the FiLM conditioning every layer already receives; on QED bins it barely moved the pre-trained model
(``ctrl_alpha0``, with almost no KL to hold it, stayed at the pre-trained accuracy), the same lack of capacity the
image suite met (benchmarks/images/README.md). Low-rank adapters (Hu et al. 2022, "LoRA") on the node and edge MLPs
give the pathway a say in what every layer computes, still starting at zero: peft's LoRA B matrices are
zero-initialised, so step 0 of fine-tuning reproduces the pre-trained sampler bit for bit (a test checks it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ctrl_bio.model import NULL_LABEL, LabelEmbedding, check_labels

#: Linear layers of :class:`domains.molecules.nets.GraphLayer` that get adapters: the node and edge MLPs.
LORA_TARGETS = ("node_mlp.0", "node_mlp.2", "edge_mlp.0", "edge_mlp.2")


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every peft adapter layer inside ``module`` on or off (off: each layer is its frozen base layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


class GraphAugmentedScore(nn.Module):
    """s_theta(x, t, y) = the frozen ``net(x, t, extra_emb)`` with a label embedding and LoRA adapters.

    Args:
        net: a score network ``net(x, t, extra_emb=None) -> s`` with an ``emb_dim``; it is deep-copied before adapters
            go in, so the caller's network stays the pre-trained one (other rows sample from it).
        n_classes: classes per label (categorical labels: a :class:`ctrl_bio.model.LabelEmbedding`, -1 = no request).
        lora_rank: rank of the adapters; 0: the label embedding only.
        lora_alpha: LoRA scaling numerator (updates are scaled by lora_alpha / lora_rank); None: the rank.
        lora_targets: suffixes of the module names that get adapters.
        embedding: a zero-initialised embedding of real-valued labels instead (e.g.
            :class:`ctrl_bio.continuous.ContinuousLabelEmbedding`; NaN = no request); ``n_classes`` is then ignored.
    """

    def __init__(self, net: nn.Module, n_classes: Sequence[int] = (), *, lora_rank: int = 4,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = LORA_TARGETS,
                 embedding: nn.Module | None = None):
        super().__init__()
        self.lora_rank = int(lora_rank)
        self.net = copy.deepcopy(net) if self.lora_rank > 0 else net
        self.net.requires_grad_(False)
        self.continuous = embedding is not None
        self.embedding = embedding if self.continuous else LabelEmbedding(n_classes, int(net.emb_dim))
        self.n_classes = None if self.continuous else self.embedding.n_classes
        if self.lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=self.lora_rank, lora_alpha=float(lora_alpha or self.lora_rank),
                                               target_modules=list(lora_targets), init_lora_weights=True),
                                    self.net, adapter_name="ctrl")
            for name, p in self.net.named_parameters():
                p.requires_grad_("lora_" in name)

    def _pretrained(self, x: Tensor, t: Tensor) -> Tensor:
        if self.lora_rank == 0:
            return self.net(x, t)
        set_lora_enabled(self.net, False)
        try:
            return self.net(x, t)
        finally:
            set_lora_enabled(self.net, True)

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(s_theta, u = s_theta - s_pre); s_pre is the copy with its adapters off and no label, i.e. the pre-trained
        network exactly."""
        s, s_pre = self.net(x, t, self.embedding(y)), self._pretrained(x, t)
        active = self._active(y).view(x.shape[0], *([1] * (x.ndim - 1)))
        s = torch.where(active, s, s_pre)  # the adapters act whatever the label: a null request must not see them
        return s, s - s_pre

    def _active(self, y: Tensor) -> Tensor:
        """Requests with at least one label asked for, (B,)."""
        return (~torch.isnan(y)).any(dim=1) if self.continuous else (y != NULL_LABEL).any(dim=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """s_theta alone: one network call unless a request is null."""
        if bool(self._active(y).all()):
            return self.net(x, t, self.embedding(y))
        return self.score_and_control(x, t, y)[0]

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        if not self.continuous:
            check_labels(y, self.n_classes)
        return lambda x, t: self.score_and_control(x, t, y)
