"""CTRL's off-policy estimator: denoising score matching on reward-tilted pre-trained samples.

The optimum p_pre(x0) p(y|x0)^(gamma/alpha) is a reweighting of the pre-trained law, so its score at every t is what
denoising score matching (Vincent 2011) learns from pre-trained samples importance-resampled with weights
p(y|x0)^(gamma/alpha) (reward-weighted regression, Peters & Schaal 2007, on the soft-optimal policy of KL-regularised
RL; :func:`ctrl_bio.objective.weighted_score_matching_loss`). It keeps every mode, and is exact on the mixture
testbed; in high dimension the pool's posterior given x_t collapses onto one member before the label is readable,
so there it is a warm start for an estimator that generalises across x_t (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ctrl_bio.estimators.base import Problem
from ctrl_bio.label_space import label_space_of
from ctrl_bio.model import ConditionalScore
from ctrl_bio.objective import ScoreTarget, WeightedPool, weighted_score_matching_loss
from ctrl_bio.sampling import Spacing, euler_maruyama, time_grid
from ctrl_bio.sde import SDE


@torch.no_grad()
def sample_pretrained_pool(model: ConditionalScore, sde: SDE, x_shape: tuple[int, ...], n: int, *,
                           n_steps: int, t_end: float, batch_size: int = 4096, spacing: Spacing = "uniform",
                           generator: torch.Generator | None = None) -> Tensor:
    """n samples of the pre-trained model: the augmented model asked for no label (exactly s_pre)."""
    device = next(model.parameters()).device
    labels = label_space_of(model)
    times = time_grid(n_steps, t_end, spacing=spacing, device=device)
    chunks = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y_null = labels.none(b, device)
        x_init = sde.prior_sampling((b, *x_shape), generator=generator, device=device)
        chunks.append(euler_maruyama(sde, model.conditioned(y_null), x_init, times, generator=generator,
                                     keep_trajectory=False).x)
    return torch.cat(chunks)


def tilted_pool(problem: Problem, pool_x0: Tensor | None, pool_size: int, generator: torch.Generator
                ) -> WeightedPool:
    """The pre-trained pool (``pool_x0``, or ``pool_size`` fresh samples) with the reward's likelihood of every
    request, tilted by gamma / alpha: per label combination, or per requested value (the model's label space)."""
    p = problem
    x0 = pool_x0.to(next(p.model.parameters()).device) if pool_x0 is not None else sample_pretrained_pool(
        p.model, p.sde, p.x_shape, pool_size, n_steps=p.n_steps, t_end=p.t_end, spacing=p.spacing,
        generator=generator)
    with torch.no_grad():
        return label_space_of(p.model).tilted_pool(x0, p.reward, p.objective.tilt)


@dataclass
class ScoreMatching:
    """Weighted denoising score matching on a pool tilted by p(y|x0)^(gamma/alpha).

    Attributes:
        steps, batch_size, lr: updates, pool draws per update, Adam's learning rate.
        pool_size: pre-trained samples drawn when no ``pool_x0`` is given.
        pool_x0: the pool itself, if already drawn (it sets the target: p_pre tilted needs p_pre's samples).
        target: the regression target, ``denoising``, ``posterior`` or ``control``
            (:func:`ctrl_bio.objective.weighted_score_matching_loss`).
        spacing: how t is drawn, ``uniform`` or ``quadratic``.
    """

    steps: int = 2000
    batch_size: int = 512
    lr: float = 2e-3
    pool_size: int = 20000
    pool_x0: Tensor | None = field(default=None, repr=False)
    target: ScoreTarget = "denoising"
    spacing: Spacing = "uniform"
    name: str = "score_matching"
    pool: WeightedPool | None = field(default=None, init=False, repr=False)

    def prepare(self, problem: Problem, generator: torch.Generator) -> dict:
        self.pool = tilted_pool(problem, self.pool_x0, self.pool_size, generator)
        with torch.no_grad():
            return label_space_of(problem.model).pool_summary(self.pool, problem.label_prior, generator)

    def loss(self, problem: Problem, y: Tensor, generator: torch.Generator) -> Tensor:
        if self.pool is None:
            raise RuntimeError("ScoreMatching.prepare must run before loss")
        return weighted_score_matching_loss(problem.model, problem.sde, self.pool, y, t_end=problem.t_end,
                                            spacing=self.spacing, target=self.target, generator=generator)
