"""The DNA domain as a :class:`ctrl_bio.domain.Domain`: ENCODE DHS sequences, a 1-D conv score network, FASTA.

``ctrl-bio pretrain domain=dna`` trains :class:`ctrl_bio.nets.ConvScoreNet` unconditionally on the one-hot
training split (chromosomes other than 1 and 2); the resulting network ships as
``domains/dna/checkpoints/pretrained.safetensors`` (+ ``.json``) and is what ``pretrained_model`` loads
unless a ``checkpoint`` path is given. The label pathway is zero-initialised, so fine-tuning starts from the
pre-trained sampler bit for bit: by default a small CNN :class:`ctrl_bio.nets.SequencePathway` beside the frozen
network, CTRL's :class:`ctrl_bio.model.LabelEmbedding` added to the network's time embedding in its last
``label_blocks`` blocks (:class:`ctrl_bio.model.EmbeddingAugmentedScore`; 320 parameters for 4 classes), or that
embedding in every block plus LoRA adapters on the blocks' convolutions (:class:`ctrl_bio.lora.LoRAAugmentedScore`)
or in every block of a trained copy of the network (``kind: copy``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ctrl_bio.domain import ScoreModel
from ctrl_bio.lora import LoRAAugmentedScore
from ctrl_bio.model import NULL_LABEL, AugmentedScore, EmbeddingAugmentedScore
from ctrl_bio.nets import ConvScoreNet, SequencePathway
from ctrl_bio.sde import VPSDE
from domains.dna.data import (
    SEQ_LEN,
    DHSTable,
    decode,
    encode_sequences,
    from_indices,
    load_dhs,
    one_hot,
    write_fasta,
)

#: Convolutions of every residual block (:class:`ctrl_bio.nets.ResidualConvBlock`): LoRA targets of ``kind: lora``.
CONV_LORA_TARGETS = ("conv1", "conv2")

#: The pathway settings each ``kind`` reads (``conv``: :class:`ctrl_bio.nets.SequencePathway`'s keyword arguments).
PATHWAY_KEYS: dict[str, frozenset[str]] = {
    "conv": frozenset(inspect.signature(SequencePathway).parameters) - {"channels", "n_classes"},
    "embedding": frozenset(),
    "lora": frozenset({"lora_rank", "lora_targets"}),
    "copy": frozenset(),
}

log = logging.getLogger(__name__)

#: The pre-trained network that ships with the package.
SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "pretrained.safetensors"


@dataclass
class DNADomain:
    """ENCODE DHS sequences of 200 bp, one-hot (4, 200) in {-1, +1}, under a VP-SDE.

    Attributes:
        data: ``"full"`` (the fetched ENCODE table) or ``"slice"`` (the 720 rows shipped for tests), or a path
            to a table with the same columns.
        score_net: keyword arguments of :class:`ctrl_bio.nets.ConvScoreNet` for ``pretrain``.
        checkpoint: pre-trained weights (a ``.safetensors`` file or a ``pretrain`` run directory); None: the
            shipped network.
        pathway: the label pathway: ``{"kind": "conv", ...}`` a :class:`ctrl_bio.nets.SequencePathway` (its keyword
            arguments follow ``kind``), ``{"kind": "embedding"}`` a label embedding added to the frozen network's
            time embedding in its last ``label_blocks`` blocks, or ``{"kind": "lora", "lora_rank": 4,
            "lora_targets": ["conv1", "conv2"]}`` that embedding in every block plus LoRA adapters on the residual
            blocks' convolutions, or ``{"kind": "copy"}`` that embedding in every block of a copy of the network whose
            every weight is trained (the frozen network stays beside it as s_pre).
        label_blocks: how many of the network's last blocks receive the label embedding (``kind: embedding``).
        beta_min, beta_max: the VP-SDE schedule.
    """

    data: str = "full"
    score_net: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pathway: dict[str, Any] = field(default_factory=lambda: {"kind": "conv"})
    label_blocks: int | None = 2
    beta_min: float = 0.1
    beta_max: float = 20.0
    _table: DHSTable | None = field(default=None, init=False, repr=False)
    _train_x: Tensor | None = field(default=None, init=False, repr=False)

    name = "dna"
    label_types = ("categorical", "bins")
    x_shape = (4, SEQ_LEN)

    def __post_init__(self) -> None:
        self.sde = VPSDE(self.beta_min, self.beta_max)

    @property
    def table(self) -> DHSTable:
        """The whole DHS table (every split), read once."""
        if self._table is None:
            self._table = load_dhs(source="slice") if self.data == "slice" else (
                load_dhs() if self.data == "full" else load_dhs(self.data))
        return self._table

    def training_data(self) -> Tensor:
        if self._train_x is None:
            self._train_x = one_hot(self.table.of_split("training").sequences)
        return self._train_x

    def score_network(self) -> nn.Module:
        return ConvScoreNet(self.sde, **self.score_net)

    def pretrained_model(self) -> ScoreModel:
        from ctrl_bio.training.runs import load_network

        path = Path(self.checkpoint) if self.checkpoint else SHIPPED_CHECKPOINT
        return load_network(path, self.sde)

    def augment(self, pretrained: ScoreModel, n_classes: Sequence[int]
                ) -> AugmentedScore | EmbeddingAugmentedScore | LoRAAugmentedScore:
        settings = pathway_settings(self.pathway)
        kind = settings.pop("kind")
        if kind == "conv":
            return AugmentedScore(pretrained, SequencePathway(4, n_classes, **settings), self.sde)
        if not isinstance(pretrained, ConvScoreNet):
            raise TypeError(f"an {kind} pathway needs a ConvScoreNet, got {type(pretrained).__name__}")
        if kind in ("lora", "copy"):  # the copy gets the label in every block; the caller's network stays as it is
            rank = int(settings.get("lora_rank", 4)) if kind == "lora" else 0
            model = LoRAAugmentedScore(pretrained, n_classes, lora_rank=rank,
                                       lora_targets=list(settings.get("lora_targets", CONV_LORA_TARGETS)),
                                       train_copy=kind == "copy")
            model.net.label_blocks = None
            return model
        pretrained.label_blocks = self.label_blocks
        return EmbeddingAugmentedScore(pretrained, n_classes, pretrained.emb_dim)

    def encode_x(self, sequences: list[str]) -> tuple[Tensor, list[int]]:
        """Sequences of a label's CSV as one-hot; rows that are not 200 ACGT letters come back as bad indices
        (with their reasons, :class:`ctrl_bio.labels.BadRows`)."""
        return encode_sequences(sequences, SEQ_LEN)

    def project(self, x: Tensor) -> Tensor:
        """Samples x (B, 4, L) moved to the nearest one-hot sequence (the argmax base), in {-1, +1}: what the
        training sequences are (``suite.method.pool=pretrained`` snaps its pool so)."""
        return from_indices(x.argmax(dim=1)).to(x)

    def write_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], run_dir: Path) -> Path:
        names = []
        for i, row in enumerate(y.tolist()):
            tags = [f"{n}={v}" for n, v in zip(label_names, row) if v != NULL_LABEL]
            names.append(f"sample{i}|" + ("|".join(tags) if tags else "unconditional"))
        return write_fasta(Path(run_dir) / "samples.fasta", decode(x), names)


def pathway_settings(pathway: dict[str, Any]) -> dict[str, Any]:
    """``pathway`` reduced to the keys its ``kind`` reads, with ``kind`` kept.

    Hydra merges a command-line ``domain.pathway.kind=lora`` into the default ``conv`` settings, so another kind's
    keys are expected here: they are dropped with one log line that names them. A key that no kind reads is a typo
    and raises.
    """
    settings = dict(pathway)
    kind = settings.pop("kind", "conv")
    if kind not in PATHWAY_KEYS:
        raise ValueError(f"domain.pathway.kind must be one of {sorted(PATHWAY_KEYS)}, got {kind!r}")
    unknown = set(settings) - set().union(*PATHWAY_KEYS.values())
    if unknown:
        raise ValueError(f"domain.pathway has keys no pathway kind reads: {sorted(unknown)}; "
                         f"kind={kind!r} reads {sorted(PATHWAY_KEYS[kind]) or 'none'}")
    ignored = sorted(set(settings) - PATHWAY_KEYS[kind])
    if ignored:
        log.info("domain.pathway.kind=%s ignores the settings of other kinds: %s", kind, ", ".join(ignored))
    return {"kind": kind, **{k: v for k, v in settings.items() if k in PATHWAY_KEYS[kind]}}


def make_domain(**kwargs: Any) -> DNADomain:
    """Hydra entry point (``configs/plugin/dna.yaml``)."""
    return DNADomain(**kwargs)

