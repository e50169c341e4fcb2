"""A plain reward: CTRL with a reward log r(x0) and no label, targeting p_pre(x0) r(x0)^(gamma/alpha) / Z.

CTRL's objective (DESIGN.md) with a reward that does not depend on a requested label is KL-regularised reward
fine-tuning: J = gamma E[log r(x0)] - alpha KL(P_theta || P_pre), whose optimum is the pre-trained law tilted by
r^(gamma/alpha) (Uehara et al. 2024; Domingo-Enrich et al. 2025). r need not be normalised: a constant in log r
shifts J, never its maximiser, and the score-matching pool's weights are self-normalised. Every estimator runs it
through the label machinery with one label of one class that every request asks for, so nothing downstream branches:
:class:`PlainReward` gives the reward both signatures the estimators read, :data:`PLAIN_LABELS` is the pathway's class
count, :func:`plain_requests` the requests to sample with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ctrl_bio.reward import LabelPrior

#: The class counts of a plain reward's pathway: one label with one class ("the reward is asked for").
PLAIN_LABELS: tuple[int, ...] = (1,)


class PlainReward:
    """log r(x0) as CTRL's reward ``(x0, y) -> (B,)`` (y ignored) and as the pool's one-class log-likelihood.

    Args:
        log_r: ``x0 -> (B,)``, log of an unnormalised reward; differentiable for the pathwise and adjoint-matching
            estimators, any values for score matching.
    """

    def __init__(self, log_r: Callable[[Tensor], Tensor]):
        self.log_r = log_r
        self.log_prob_fns = [lambda x0: log_r(x0)[:, None]]

    def __call__(self, x0: Tensor, y: Tensor | None = None) -> Tensor:
        return self.log_r(x0)


def plain_prior() -> LabelPrior:
    """The label prior of a plain reward: every request asks for the reward."""
    return LabelPrior([torch.ones(1)])


def plain_requests(n: int, device: torch.device | str | None = None) -> Tensor:
    """n requests for a plain reward's fine-tuned model, (n, 1): ``model.conditioned(plain_requests(n))``."""
    return torch.zeros(n, 1, dtype=torch.long, device=device)
