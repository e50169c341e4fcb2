"""CTRL's label pathway for the graph score network: a label embedding in the time embedding plus LoRA adapters.

The label embedding alone (:class:`ctrl_bio.model.EmbeddingAugmentedScore`, 384 parameters for three classes) can
only shift the FiLM conditioning every layer already receives; on QED bins it barely moved the pre-trained model
(``ctrl_alpha0``, with almost no KL to hold it, stayed at the pre-trained accuracy), the same lack of capacity the
image suite met (benchmarks/images/README.md). Low-rank adapters (Hu et al. 2022, "LoRA") on the node and edge MLPs
give the pathway a say in what every layer computes, still starting at zero: peft's LoRA B matrices are
zero-initialised, so step 0 of fine-tuning reproduces the pre-trained sampler bit for bit (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ctrl_bio.lora import LoRAAugmentedScore

#: Linear layers of :class:`domains.molecules.nets.GraphLayer` that get adapters: the node and edge MLPs.
LORA_TARGETS = ("node_mlp.0", "node_mlp.2", "edge_mlp.0", "edge_mlp.2")


class GraphAugmentedScore(LoRAAugmentedScore):
    """:class:`ctrl_bio.lora.LoRAAugmentedScore` with adapters on the graph layers' node and edge MLPs by default."""

    def __init__(self, net: nn.Module, n_classes: Sequence[int] = (), *, lora_rank: int = 4,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = LORA_TARGETS,
                 embedding: nn.Module | None = None, label_time_features: int = 0, train_copy: bool = False):
        super().__init__(net, n_classes, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                         embedding=embedding, label_time_features=label_time_features, train_copy=train_copy)
