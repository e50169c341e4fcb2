"""The mixture testbed as a :class:`ctrl_bio.domain.Domain`: what ``ctrl-bio pretrain``, ``train-classifier``,
``finetune`` and ``sample`` need of it, plus a learned pre-trained model.

:class:`GMMDomain` is a :class:`~domains.gmm.testbed.Testbed` (every existing caller and label pair
callable takes it) with the domain's training data, networks and CSV output added. Its pre-trained model
is either the exact mixture score (``configs/pretrained/exact.yaml``) or a score network trained by
denoising score matching on mixture samples (``configs/pretrained/learned.yaml``, :func:`learned_pretrained`),
so that CTRL can be measured on a pre-trained model with real training error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_bio.domain import ScoreModel
from ctrl_bio.metrics import energy_distance
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.nets import VectorScoreNet
from ctrl_bio.sampling import euler_maruyama, time_grid
from domains.gmm.mixture import SavableMixtureScore
from domains.gmm.testbed import Testbed

log = logging.getLogger(__name__)

#: Seed offset of the pre-training samples, so that they never coincide with pairs or evaluation draws.
DATA_SEED_OFFSET = 7000


@dataclass
class GMMDomain(Testbed):
    """The testbed plus what the training commands need (see :class:`ctrl_bio.domain.Domain`).

    Attributes:
        pretrained_fn: ``(testbed, cache_dir=...) -> score`` giving the pre-trained model
            (:func:`exact_pretrained` or :func:`learned_pretrained`); None: the exact mixture score.
        pathway: keyword arguments of :class:`ctrl_bio.model.VectorPathway`.
        score_net: keyword arguments of :class:`ctrl_bio.nets.VectorScoreNet`.
        n_train: mixture samples a score network is pre-trained on.
        cache_dir: where a learned pre-trained model trained on the fly is cached (the run directory).
    """

    pretrained_fn: Callable[..., ScoreModel] | None = None
    pathway: dict[str, Any] = field(default_factory=dict)
    score_net: dict[str, Any] = field(default_factory=dict)
    n_train: int = 50_000
    cache_dir: str | None = None
    _data: Tensor | None = field(default=None, init=False, repr=False)

    name = "gmm"
    label_types = ("categorical", "bins")

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.mixture.dim,)

    def training_data(self) -> Tensor:
        if self._data is None:
            g = torch.Generator().manual_seed(self.seed + DATA_SEED_OFFSET)
            self._data = self.mixture.sample(self.n_train, g)[0]
        return self._data

    def score_network(self) -> nn.Module:
        return VectorScoreNet(self.sde, self.dim, **self.score_net)

    def pretrained_model(self) -> ScoreModel:
        if self.pretrained_fn is None:
            return self.pretrained
        return self.pretrained_fn(self, cache_dir=self.cache_dir)

    def augment(self, pretrained: ScoreModel, n_classes: Sequence[int]) -> AugmentedScore:
        return AugmentedScore(pretrained, VectorPathway(self.dim, n_classes, **self.pathway), self.sde)

    def write_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], run_dir: Path) -> Path:
        """``samples.csv``: columns x0..x{d-1}, then one column per label with the requested class."""
        path = Path(run_dir) / "samples.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([f"x{i}" for i in range(self.dim)] + list(label_names))
            for xi, yi in zip(x.tolist(), y.tolist()):
                writer.writerow([f"{v:.6g}" for v in xi] + yi)
        return path

    def plot_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], path: Path) -> Path:
        """``ctrl-bio sample``'s plot: the samples in the plane of the means' two principal axes, means marked."""
        from domains.gmm.plots import plot_samples

        request = ", ".join(f"{name}={v}" for name, v in zip(label_names, y[0].tolist()))
        return plot_samples(self.mixture, {request: x}, y[:, 0], path)

    def evaluate_pretrained(self, score: ScoreModel, n: int = 2000, n_steps: int = 200,
                            seed: int = 0) -> dict[str, float]:
        """How close a pre-trained score's samples come to the mixture (:func:`pretrained_quality`)."""
        return pretrained_quality(self, score, n=n, n_steps=n_steps, seed=seed)


def make_domain(testbed: Testbed, pretrained: Callable[..., ScoreModel] | None = None,
                pathway: Mapping[str, Any] | None = None, score_net: Mapping[str, Any] | None = None,
                n_train: int = 50_000, cache_dir: str | None = None) -> GMMDomain:
    """Wrap a testbed (``domains.gmm.make_testbed``) as a domain; ``configs/plugin/gmm.yaml`` calls this."""
    base = {f.name: getattr(testbed, f.name) for f in fields(Testbed)}
    return GMMDomain(**base, pretrained_fn=pretrained, pathway=dict(pathway or {}), score_net=dict(score_net or {}),
                     n_train=n_train, cache_dir=cache_dir)


def exact_pretrained(testbed: Testbed, cache_dir: str | None = None) -> ScoreModel:
    """The mixture's exact score: a pre-trained model with no training error (savable by ``save_pretrained``)."""
    return SavableMixtureScore.of(testbed.mixture, testbed.sde)


def _cache_key(testbed: Testbed, settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for t in (testbed.mixture.weights, testbed.mixture.means, testbed.mixture.variances):
        h.update(t.numpy().tobytes())
    h.update(json.dumps({"sde": repr(testbed.sde), **settings}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def learned_pretrained(testbed: Testbed, checkpoint: str | None = None, *, cache_dir: str | None = None,
                       steps: int = 4000, batch_size: int = 512, lr: float = 2e-3, hidden: int = 256, depth: int = 3,
                       n_fourier: int = 16, n_train: int = 50_000, seed: int = 0,
                       progress: bool = False) -> nn.Module:
    """A learned pre-trained score for the testbed: a frozen :class:`ctrl_bio.nets.VectorScoreNet`.

    Args:
        testbed: the mixture (a :class:`GMMDomain` or a plain testbed).
        checkpoint: a ``ctrl-bio pretrain`` run directory or its ``score.safetensors``; None trains one now
            by denoising score matching on ``n_train`` mixture samples (d = 4, 4,000 steps: about 50 s on one core).
        cache_dir: where a network trained now is saved and looked up again
            (``<cache_dir>/pretrained/<hash of mixture and settings>/score.safetensors``); None: not cached.
        steps, batch_size, lr, hidden, depth, n_fourier, n_train, seed: training settings when no checkpoint is given.

    Returns:
        The frozen network ``(x, t) -> s``.
    """
    from ctrl_bio.training import export_network, fit_score_network, load_network

    if checkpoint is not None:
        return load_network(checkpoint, testbed.sde)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "hidden": hidden, "depth": depth,
                "n_fourier": n_fourier, "n_train": n_train, "seed": seed}
    cached = Path(cache_dir) / "pretrained" / _cache_key(testbed, settings) / "score.safetensors" if cache_dir else None
    if cached is not None and cached.is_file():
        return load_network(cached, testbed.sde)
    domain = testbed if isinstance(testbed, GMMDomain) else make_domain(testbed)
    data = domain.mixture.sample(n_train, torch.Generator().manual_seed(testbed.seed + DATA_SEED_OFFSET))[0]
    torch.manual_seed(seed)
    net = VectorScoreNet(testbed.sde, testbed.dim, hidden=hidden, depth=depth, n_fourier=n_fourier)
    log.info("training a pre-trained score network for the mixture (%d steps)", steps)
    net = fit_score_network(net, testbed.sde, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            progress=progress)
    if cached is not None:
        export_network(net, cached)
    return net


def pretrained_quality(testbed: Testbed, score: ScoreModel, *, n: int = 2000, n_steps: int = 200,
                       seed: int = 0) -> dict[str, float]:
    """Energy distance of a pre-trained score's samples to true mixture samples, beside the same distance for
    the exact score under the same sampler (discretisation alone) and between two true sets (the noise floor)."""
    g = torch.Generator().manual_seed(seed + 5000)
    truth, twin = testbed.mixture.sample(n, g)[0], testbed.mixture.sample(n, g)[0]
    times = time_grid(n_steps)

    def draw(fn: ScoreModel) -> Tensor:
        gs = torch.Generator().manual_seed(seed + 6000)
        with torch.no_grad():
            x_init = testbed.sde.prior_sampling((n, testbed.dim), generator=gs)
            return euler_maruyama(testbed.sde, fn, x_init, times, generator=gs, keep_trajectory=False).x

    return {"distance_to_mixture": energy_distance(draw(score), truth),
            "exact_score_distance": energy_distance(draw(testbed.pretrained), truth),
            "noise_floor": energy_distance(twin, truth), "n": n, "n_steps": n_steps}
