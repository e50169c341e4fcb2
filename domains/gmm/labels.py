"""Exact labels on the mixture testbed: their likelihoods, h-transforms and target samples.

Component labels: y = class(k) of the component k that generated x. Then p(y | x_t) is analytic at
every t, h_t(x, y) = p(y | x_t) (DESIGN.md), and exact guidance s_pre + grad log h_t samples the mixture
restricted to class y exactly (the Doob h-transform; CTRL, Zhao et al. 2024, Thm. 1).

Logistic labels: y_k ~ softmax(W_k x + b_k) drawn independently per label, so several labels are exactly
conditionally independent given x; the target p(x) prod_k p(y_k | x) / Z is sampled by importance
resampling of a large pool of mixture samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ctrl_bio.objective import WeightedPool
from ctrl_bio.sde import SDE
from domains.gmm.mixture import GaussianMixture


class ComponentLabel:
    """y = classes[k] for the generating component k.

    Args:
        mixture: the mixture.
        classes: class of each component, (K,), values 0..n_classes-1, each class holding >= 1 component.
    """

    def __init__(self, mixture: GaussianMixture, classes: Tensor):
        self.mixture, self.classes = mixture, classes
        self.n_classes = int(classes.max()) + 1
        self.members = F.one_hot(classes, self.n_classes).T.bool()  # (C, K)

    def class_probs(self) -> Tensor:
        """p(y) = sum of the weights of the class's components, (C,)."""
        return torch.stack([self.mixture.weights[m].sum() for m in self.members])

    def log_prob(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """log p(y = c | x_t) for every class c, (B, C); at t = None this is the clean-data likelihood."""
        lj = self.mixture.component_log_joint(x, sde, t)  # (B, K)
        masked = lj[:, None, :].masked_fill(~self.members[None], float("-inf"))  # (B, C, K)
        return torch.logsumexp(masked, dim=2) - torch.logsumexp(lj, dim=1, keepdim=True)

    def grad_log_h(self, x: Tensor, y: Tensor, sde: SDE, t: Tensor) -> Tensor:
        """grad_x log p(y | x_t) = sum_{k in y} r^y_k s_k - sum_k r_k s_k, (B, d)."""
        lj = self.mixture.component_log_joint(x, sde, t)
        s_k = self.mixture.component_scores(x, sde, t)
        r_all = torch.softmax(lj, dim=1)
        r_y = torch.softmax(lj.masked_fill(~self.members[y], float("-inf")), dim=1)
        return ((r_y - r_all)[:, :, None] * s_k).sum(1)

    def bayes_label(self, x: Tensor) -> Tensor:
        return self.log_prob(x).argmax(1)

    def sample_target(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of p(x | y): for each request, the mixture restricted to class y."""
        x = torch.empty(y.shape[0], self.mixture.dim)
        for c in range(self.n_classes):
            rows = (y == c).nonzero().squeeze(1)
            if rows.numel():
                w = self.mixture.weights * self.members[c]
                x[rows] = self.mixture.sample(rows.numel(), generator, component_weights=w)[0]
        return x


class LogisticLabels:
    """K independent labels y_k ~ softmax(W_k x + b_k).

    Args:
        weights: per label, (C_k, d).
        biases: per label, (C_k,).
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor]):
        self.weights, self.biases = weights, biases
        self.n_classes = tuple(w.shape[0] for w in weights)

    def log_prob_fns(self) -> list[Callable[[Tensor], Tensor]]:
        """One ``x -> log p_k(. | x)`` per label, (B, C_k)."""
        return [lambda x, w=w, b=b: F.log_softmax(x @ w.T + b, dim=1) for w, b in zip(self.weights, self.biases)]

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """sum_k log p_k(y_k | x), (B,)."""
        return sum(f(x).gather(1, y[:, k:k + 1]).squeeze(1) for k, f in enumerate(self.log_prob_fns()))

    def sample_labels(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y_k ~ p_k(. | x) independently, (B, K)."""
        return torch.stack([torch.multinomial(f(x).exp(), 1, generator=generator).squeeze(1)
                            for f in self.log_prob_fns()], dim=1)

    def sample_target(self, mixture: GaussianMixture, y: Tensor, pool_size: int = 200_000,
                      generator: torch.Generator | None = None) -> Tensor:
        """Exact-in-the-limit samples of p(x) prod_k p(y_k|x) / Z by importance resampling of a pool."""
        pool, _ = mixture.sample(pool_size, generator)
        weighted = WeightedPool(pool, [log_prob(pool) for log_prob in self.log_prob_fns()])
        return weighted.draw(y, generator)


def exact_guidance(pretrained: Callable[[Tensor, Tensor], Tensor], label: ComponentLabel, sde: SDE,
                   y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The Doob h-transform s_pre + grad log h_t(x, y) for labels y (B,), as a sampler callable returning
    (score, control) so that the sampler also records its path KL to the pre-trained model."""

    def score_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        u = label.grad_log_h(x, y, sde, t)
        return pretrained(x, t) + u, u

    return score_fn
