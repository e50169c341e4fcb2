"""The exactly solvable testbed: a Gaussian mixture whose pre-trained score, target and optimal control
are all in closed form (DESIGN.md, "The exact testbed")."""

from domains.gmm.labels import ComponentLabel, LogisticLabels, exact_guidance
from domains.gmm.mixture import GaussianMixture, MixtureScore, make_mixture
from domains.gmm.testbed import Testbed, make_testbed

__all__ = ["GaussianMixture", "MixtureScore", "make_mixture", "ComponentLabel", "LogisticLabels",
           "exact_guidance", "Testbed", "make_testbed"]
