"""Build a testbed from plain numbers: mixture, SDE, exact pre-trained score and labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrl_bio.sde import SDE, VPSDE
from domains.gmm.labels import ComponentLabel, LogisticLabels
from domains.gmm.mixture import GaussianMixture, MixtureScore, make_mixture


@dataclass
class Testbed:
    """A mixture with its exact score, component labels and logistic labels."""

    mixture: GaussianMixture
    sde: SDE
    pretrained: MixtureScore
    component_label: ComponentLabel
    logistic_labels: LogisticLabels
    seed: int

    #: What label configs need of a domain (ctrl_bio.labels): its name and the label types it takes.
    #: Continuous labels need a continuous label pathway, which the vector pathway does not have yet.
    name = "gmm"
    label_types = ("categorical", "bins")

    @property
    def dim(self) -> int:
        return self.mixture.dim

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.mixture.dim,)


def make_testbed(dim: int = 4, n_components: int = 8, n_classes: int = 4, *, min_separation: float = 4.0,
                 n_logistic_labels: int = 2, logistic_classes: int = 2, beta_min: float = 0.1,
                 beta_max: float = 20.0, seed: int = 0) -> Testbed:
    """A random mixture testbed.

    Components are dealt to classes in a random order, round robin, so every class holds at least two
    components (a class that loses one is then visible in ``component_tv``). Logistic labels have
    random directions scaled so that each is informative but not deterministic.

    Raises:
        ValueError: for a non-positive dimension, or fewer than two components per class.
    """
    if dim < 1:
        raise ValueError(f"domain.dim must be a positive integer, got {dim}")
    if n_classes < 2:
        raise ValueError(f"domain.n_classes must be at least 2, got {n_classes}")
    if n_components < 2 * n_classes:
        raise ValueError(f"domain.n_components ({n_components}) must be at least twice domain.n_classes "
                         f"({n_classes}): every class needs two components")
    g = torch.Generator().manual_seed(seed)
    mixture = make_mixture(dim, n_components, min_separation=min_separation, generator=g)
    classes = torch.randperm(n_components, generator=g) % n_classes
    scale = 1.0 / mixture.means.std().clamp_min(1e-6)
    weights = [torch.randn(logistic_classes, dim, generator=g) * scale for _ in range(n_logistic_labels)]
    biases = [torch.randn(logistic_classes, generator=g) * 0.5 for _ in range(n_logistic_labels)]
    sde = VPSDE(beta_min, beta_max)
    return Testbed(mixture=mixture, sde=sde, pretrained=MixtureScore(mixture, sde),
                   component_label=ComponentLabel(mixture, classes), logistic_labels=LogisticLabels(weights, biases),
                   seed=seed)
