"""The molecule domain as a :class:`ctrl_bio.domain.Domain`: QM9 graphs, a graph score network, SMILES out.

``ctrl-bio pretrain domain=molecules`` trains :class:`domains.molecules.nets.GraphScoreNet` unconditionally on
the QM9 training split (nodes and bonds diffused jointly under one VP-SDE); the network ships as
``domains/molecules/checkpoints/pretrained.safetensors`` (+ ``.json``). The label pathway
(:class:`domains.molecules.pathway.GraphAugmentedScore`) is CTRL's zero-initialised label embedding added to the
frozen network's time embedding plus rank-4 LoRA adapters on its node and edge MLPs (``lora_rank: 0`` for the
embedding alone), so fine-tuning starts from the pre-trained sampler bit for bit.
Samples are written as SMILES (CSV, with the requested labels and validity) and SDF (RDKit 3-D embedding).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_bio.domain import ScoreModel
from ctrl_bio.model import NULL_LABEL
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE
from domains.molecules.data import (
    X_DIM,
    MoleculeTable,
    decode,
    encode,
    encode_smiles,
    graph_types,
    load_qm9,
    to_smiles,
)
from domains.molecules.metrics import generation_metrics
from domains.molecules.nets import GraphScoreNet
from domains.molecules.pathway import LORA_TARGETS, GraphAugmentedScore

#: The pre-trained network that ships with the package.
SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "pretrained.safetensors"


@dataclass
class MoleculeDomain:
    """QM9 molecular graphs as flat vectors (189,) in {-1, +1} under a VP-SDE.

    Attributes:
        data: ``"full"`` (QM9 fetched from ``qm9pack``), ``"slice"`` (the 3,000 molecules shipped for tests) or a
            path to a CSV with QM9's columns.
        score_net: keyword arguments of :class:`domains.molecules.nets.GraphScoreNet` for ``pretrain``.
        checkpoint: pre-trained weights (a ``.safetensors`` file or a ``pretrain`` run directory); None: the
            shipped network.
        lora_rank: rank of the LoRA adapters beside the label embedding; 0: the embedding only.
        lora_targets: module-name suffixes that get adapters (default: the node and edge MLPs of every layer).
        label_time_features: sine/cosine features of t in the label embedding (0: one vector per class for every t;
            :class:`ctrl_bio.model.LabelEmbedding`).
        train_copy: train every weight of a copy of the network beside the label embedding (``lora_rank`` must
            be 0; :class:`ctrl_bio.lora.LoRAAugmentedScore`).
        beta_min, beta_max: the VP-SDE schedule.
    """

    data: str = "full"
    score_net: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    lora_rank: int = 4
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    label_time_features: int = 0
    train_copy: bool = False
    beta_min: float = 0.1
    beta_max: float = 20.0
    _table: MoleculeTable | None = field(default=None, init=False, repr=False)
    _train_x: Tensor | None = field(default=None, init=False, repr=False)

    name = "molecules"
    label_types = ("categorical", "bins", "continuous")
    x_shape = (X_DIM,)
    spacing = "uniform"

    def __post_init__(self) -> None:
        self.sde = VPSDE(self.beta_min, self.beta_max)

    @property
    def table(self) -> MoleculeTable:
        """The whole QM9 table (both splits), read once."""
        if self._table is None:
            self._table = load_qm9(self.data)
        return self._table

    def training_data(self) -> Tensor:
        if self._train_x is None:
            self._train_x = self.table.of_split("training").x()
        return self._train_x

    def score_network(self) -> nn.Module:
        return GraphScoreNet(self.sde, **self.score_net)

    def pretrained_model(self) -> ScoreModel:
        from ctrl_bio.training.runs import load_network

        path = Path(self.checkpoint) if self.checkpoint else SHIPPED_CHECKPOINT
        return load_network(path, self.sde)

    def augment(self, pretrained: ScoreModel, n_classes: Sequence[int]) -> GraphAugmentedScore:
        if not isinstance(pretrained, GraphScoreNet):
            raise TypeError(f"the molecule label pathway needs a GraphScoreNet, got {type(pretrained).__name__}")
        return GraphAugmentedScore(pretrained, n_classes, lora_rank=self.lora_rank, lora_targets=self.lora_targets,
                                   label_time_features=self.label_time_features, train_copy=self.train_copy)

    def encode_x(self, smiles: list[str]) -> tuple[Tensor, list[int]]:
        """SMILES of a label's CSV as graphs; rows RDKit cannot parse or that do not fit QM9 graphs are bad indices
        (with their reasons, :class:`ctrl_bio.labels.BadRows`)."""
        return encode_smiles(smiles)

    def project(self, x: Tensor) -> Tensor:
        """Samples x (B, 189) moved to the nearest graph encoding: the argmax node and edge types, in {-1, +1}.

        What the training molecules are: a pool of pre-trained samples projected so is the law the decoder reads
        (``suite.method.pool=pretrained``).
        """
        return encode(*graph_types(x.detach().cpu())).to(x)

    def write_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], run_dir: Path) -> Path:
        """``samples.csv`` (SMILES, validity, requested labels) and ``samples.sdf`` (valid molecules in 3-D); returns
        the CSV."""
        from domains.molecules.io import write_sdf

        mols = decode(x)
        names = []
        for i, row in enumerate(y.tolist()):
            tags = [f"{n}={v}" for n, v in zip(label_names, row) if v != NULL_LABEL]
            names.append(f"sample{i}|" + ("|".join(tags) if tags else "unconditional"))
        write_sdf(Path(run_dir) / "samples.sdf", mols, names)
        return write_smiles_csv(Path(run_dir) / "samples.csv", to_smiles(mols), y, label_names)

    @torch.no_grad()
    def sample(self, score: ScoreModel, n: int, n_steps: int = 100, seed: int = 0, batch_size: int = 512,
               t_end: float = 1e-3) -> Tensor:
        """n unconditional samples x (n, 189) from a score with Euler-Maruyama."""
        generator = torch.Generator().manual_seed(seed)
        times = time_grid(n_steps, t_end)
        out = []
        for i in range(0, n, batch_size):
            x_init = self.sde.prior_sampling((min(batch_size, n - i), X_DIM), generator=generator)
            out.append(euler_maruyama(self.sde, score, x_init, times, generator=generator, keep_trajectory=False).x)
        return torch.cat(out)

    def evaluate_pretrained(self, score: ScoreModel, n: int = 1024, n_steps: int = 100, seed: int = 0
                            ) -> dict[str, float]:
        """Validity, uniqueness, novelty and connectedness of n unconditional samples (``pretrain``'s quality.json)."""
        train_smiles = set(self.table.of_split("training").smiles)
        return generation_metrics(decode(self.sample(score, n, n_steps, seed)), train_smiles)


def write_smiles_csv(path: Path, smiles: Sequence[str | None], y: Tensor, label_names: Sequence[str],
                     extra: dict[str, Sequence[Any]] | None = None) -> Path:
    """Samples as a CSV: ``sample``, ``smiles`` (empty when invalid), ``valid``, one column per requested label
    (empty for none) and any ``extra`` columns (measured properties)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "smiles", "valid", *(f"requested_{n}" for n in label_names), *extra])
        for i, (s, row) in enumerate(zip(smiles, y.tolist())):
            requested = ["" if v == NULL_LABEL else v for v in row]
            writer.writerow([i, s or "", int(s is not None), *requested, *(extra[k][i] for k in extra)])
    return path


def make_domain(**kwargs: Any) -> MoleculeDomain:
    """Hydra entry point (``configs/plugin/molecules.yaml``)."""
    return MoleculeDomain(**kwargs)
