"""What every CTRL estimator sees, and the interface it implements.

An estimator is one way of following the gradient of the same objective (DESIGN.md):

    J(theta) = E_y E_{x ~ P_theta(.|y)} [ gamma log p(y | x_0) ] - alpha KL(P_theta || P_pre),

whose maximiser samples p_pre(x_0) p(y | x_0)^(gamma/alpha). A new estimator is one file with a dataclass that has
``steps``, ``batch_size``, ``lr``, ``name`` and the two methods of :class:`Estimator`, plus one line in
:data:`ctrl_bio.estimators.ESTIMATORS`; :func:`ctrl_bio.finetune.finetune` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ctrl_bio.model import ConditionalScore
from ctrl_bio.objective import Objective  # re-exported: estimators and callers name it from here
from ctrl_bio.reward import Reward
from ctrl_bio.sampling import Spacing
from ctrl_bio.sde import SDE


@dataclass
class Problem:
    """The fine-tuning problem: the augmented model, its SDE and sampler, the reward, the label prior, J.

    Attributes:
        model: augmented model (frozen pre-trained score + zero-initialised label pathway), trained in place.
        reward: ``(x0, y) -> log p(y | x0)`` summed over labels, (B,); it may have ``log_prob_fns`` (one
            ``x0 -> (B, n_classes)`` per label), which the pool-based estimators need.
        label_prior: p(y), anything with ``sample(n, generator) -> (n, K)`` and ``n_classes``.
        x_shape: shape of one sample.
        n_steps, t_end, spacing: the Euler-Maruyama sampler the model is trained for.
    """

    model: ConditionalScore
    sde: SDE
    reward: Reward
    label_prior: Any
    x_shape: tuple[int, ...]
    objective: Objective
    n_steps: int = 100
    t_end: float = 1e-3
    spacing: Spacing = "uniform"


class Estimator(Protocol):
    """One phase of fine-tuning: ``steps`` Adam updates at ``lr`` on batches of ``batch_size`` labels."""

    name: str
    steps: int
    batch_size: int
    lr: float

    def prepare(self, problem: Problem, generator: torch.Generator) -> dict[str, Any]:
        """Work done once before the updates (e.g. drawing a pool); returns what to record."""
        ...

    def loss(self, problem: Problem, y: Tensor, generator: torch.Generator) -> Tensor:
        """A scalar whose gradient in the pathway's parameters estimates -grad J, for labels y of shape (B, K)."""
        ...

