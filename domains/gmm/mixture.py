"""A diagonal Gaussian mixture in R^d and its analytic VP marginal score.

Under the VP-SDE, x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I), so if x_0 ~ sum_k w_k N(mu_k, diag v_k) then
x_t ~ sum_k w_k N(alpha_t mu_k, diag(alpha_t^2 v_k + sigma_t^2)) and

    grad log p_t(x) = sum_k r_k(x, t) * (alpha_t mu_k - x) / (alpha_t^2 v_k + sigma_t^2),

with r_k the component responsibilities at time t: a pre-trained model with no training error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ctrl_bio.sde import SDE


class GaussianMixture:
    """sum_k w_k N(mu_k, diag(v_k)).

    Args:
        weights: mixture weights, (K,), summing to one.
        means: component means, (K, d).
        variances: per-dimension component variances, (K, d).
    """

    def __init__(self, weights: Tensor, means: Tensor, variances: Tensor):
        if means.shape != variances.shape or weights.shape != means.shape[:1]:
            raise ValueError(f"weights (K,), means and variances (K, d) disagree: {tuple(weights.shape)}, "
                             f"{tuple(means.shape)}, {tuple(variances.shape)}")
        self.weights, self.means, self.variances = weights, means, variances

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def marginal(self, sde: SDE | None, t: Tensor | None) -> tuple[Tensor, Tensor]:
        """Component means and variances of p_t, each (B, K, d), or (1, K, d) at t = 0."""
        if sde is None or t is None:
            return self.means[None], self.variances[None]
        alpha = sde.alpha(t)[:, None, None]
        sigma = sde.sigma(t)[:, None, None]
        return alpha * self.means[None], alpha**2 * self.variances[None] + sigma**2

    def component_log_joint(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """log w_k + log N(x; m_k(t), V_k(t)) for every component, (B, K)."""
        m, v = self.marginal(sde, t)
        diff = x[:, None, :] - m
        log_n = -0.5 * ((diff**2 / v) + torch.log(2 * math.pi * v)).sum(-1)
        return torch.log(self.weights)[None] + log_n

    def log_prob(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """log p_t(x), (B,)."""
        return torch.logsumexp(self.component_log_joint(x, sde, t), dim=1)

    def component_scores(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """grad_x log N(x; m_k(t), V_k(t)) for every component, (B, K, d)."""
        m, v = self.marginal(sde, t)
        return (m - x[:, None, :]) / v

    def score(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """grad_x log p_t(x), (B, d)."""
        r = torch.softmax(self.component_log_joint(x, sde, t), dim=1)
        return (r[:, :, None] * self.component_scores(x, sde, t)).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None,
               component_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """n samples and their components, drawn with ``component_weights`` (default: the mixture weights)."""
        w = self.weights if component_weights is None else component_weights
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.variances[k].sqrt() * z, k


class MixtureScore(nn.Module):
    """The mixture's exact marginal score as a frozen "pre-trained model" ``(x, t) -> s``."""

    def __init__(self, mixture: GaussianMixture, sde: SDE):
        super().__init__()
        self.mixture, self.sde = mixture, sde

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mixture.score(x, self.sde, t)


class SavableMixtureScore(MixtureScore):
    """:class:`MixtureScore` built from the mixture's numbers, ``(sde, weights, means, variances)``, which it keeps
    as its ``config``: the form :func:`ctrl_bio.hub.save_pretrained` describes and ``from_pretrained`` rebuilds, so
    a CTRL model fine-tuned on the exact pre-trained model is saved with its base (a model with no weights). The
    numbers are float32 written as JSON doubles, which read back exactly.
    """

    def __init__(self, sde: SDE, weights: list[float], means: list[list[float]], variances: list[list[float]]):
        mixture = GaussianMixture(torch.tensor(weights, dtype=torch.float32), torch.tensor(means, dtype=torch.float32),
                                  torch.tensor(variances, dtype=torch.float32))
        super().__init__(mixture, sde)

    @classmethod
    def of(cls, mixture: GaussianMixture, sde: SDE) -> SavableMixtureScore:
        return cls(sde, mixture.weights.tolist(), mixture.means.tolist(), mixture.variances.tolist())

    @property
    def config(self) -> dict[str, list]:
        m = self.mixture
        return {"weights": m.weights.tolist(), "means": m.means.tolist(), "variances": m.variances.tolist()}


def make_mixture(dim: int, n_components: int, *, min_separation: float = 4.0,
                 std_range: tuple[float, float] = (0.5, 1.0),
                 generator: torch.Generator | None = None) -> GaussianMixture:
    """A random mixture whose component means are at least ``min_separation`` apart.

    Means are drawn one at a time uniformly in a cube that grows until every new mean keeps its
    distance (rejection sampling), so components stay distinguishable in any dimension >= 1.
    Weights are uniform in [0.5, 1.5] before normalisation, standard deviations uniform in ``std_range``.
    """
    if dim < 1 or n_components < 1:
        raise ValueError(f"dim and n_components must be positive, got {dim}, {n_components}")
    half_width = min_separation
    means: list[Tensor] = []
    while len(means) < n_components:
        for _ in range(200):
            cand = (2 * torch.rand(dim, generator=generator, dtype=torch.float64) - 1) * half_width
            if all(torch.linalg.norm(cand - m) >= min_separation for m in means):
                means.append(cand)
                break
        else:
            half_width *= 1.2
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(n_components, dim, generator=generator, dtype=torch.float64)
    weights = 0.5 + torch.rand(n_components, generator=generator, dtype=torch.float64)
    return GaussianMixture((weights / weights.sum()).float(), torch.stack(means).float(), (stds**2).float())
