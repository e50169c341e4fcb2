"""The optimal control estimated by rollouts of the pre-trained sampler, regressed onto the label pathway.

The optimum of J is the Doob h-transform of the pre-trained process (DESIGN.md): u*(x, t, y) = grad_x log h_t(x, y)
with h_t(x, y) = E_pre[p(y | x0)^(gamma/alpha) | x_t = x]. Tweedie's formula (Efron 2011) for the tilted and the
pre-trained laws of x0 given x_t = alpha_t x0 + sigma_t eps writes that gradient as a difference of posterior means,

    u*(x_t, t, y) = alpha_t / sigma_t^2 ( E_pre[w_y(x0) x0 | x_t] / E_pre[w_y(x0) | x_t] - E_pre[x0 | x_t] ),
    w_y(x0) = p(y | x0)^(gamma/alpha),

and both expectations are over the pre-trained model's own posterior p_pre(x0 | x_t), which K continuations of its
sampler from x_t draw (Monte Carlo rollouts, as SVDD-MC estimates the soft value, Li et al. 2024, "Derivative-free
guidance in continuous and discrete diffusion models with soft value-based decoding", Sec. 4.2). With
self-normalised weights w_k over the K end points of one anchor, the target is

    u_hat = alpha_t / sigma_t^2 sum_k (w_k - 1/K) x0_k,

a consistent estimate of u* that needs no gradient of the reward and no pool: unlike the tilted-pool targets of score
matching, whose posterior over a finite pool collapses onto one member in high dimension, each anchor's posterior is
the network's own. The pathway is regressed onto it, E sigma_t^2 || u_theta(x_t, t, y) - u_hat ||^2, whose minimiser
over the anchors' distribution is u* (the noise of u_hat averages out across anchors, as the regression to a
conditional mean does). Anchors x_t are states of pre-trained trajectories at the ``times`` chosen, on the sampler's
own grid, so the control is fitted where sampling evaluates it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.estimators.base import Problem
from ctrl_bio.label_space import TiltedPool, label_space_of
from ctrl_bio.objective import control_from_means, control_regression_loss
from ctrl_bio.progress import progress_bar
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.utils import append_dims

#: Anchor noise levels: 16 across (0, 1), each moved to the sampler's nearest grid point.
DEFAULT_TIMES = (0.03, 0.09, 0.15, 0.21, 0.27, 0.33, 0.39, 0.45, 0.51, 0.57, 0.63, 0.69, 0.75, 0.81, 0.87, 0.93)


def grid_levels(grid: Tensor, times: tuple[float, ...] | list[float]) -> list[int]:
    """Indices of the sampler's grid points nearest to ``times``, without t = 1 and the data end, sorted, unique."""
    inner = grid[1:-1]
    if inner.numel() == 0:
        raise ValueError("rollout_control needs a sampler of at least 2 steps (anchors lie strictly inside the grid)")
    return sorted({1 + int((inner - t).abs().argmin()) for t in times})


def rollout_target(pool: TiltedPool, y: Tensor, index: Tensor, x0: Tensor, alpha_t: Tensor, sigma_t: Tensor
                   ) -> Tensor:
    """u_hat = alpha_t / sigma_t^2 sum_k (w_k - 1/K) x0_k for each request, (B, ...): Tweedie's difference of the
    self-normalised tilted mean and the plain mean of each anchor's rollouts.

    index: (B, K) pool rows of each anchor's rollouts; x0: their end points, (B, K, ...); alpha_t, sigma_t: (B,).
    """
    w = torch.softmax(pool.item_log_tilts(y, index).double(), dim=1).to(x0.dtype)
    return control_from_means((append_dims(w, x0.ndim) * x0).sum(1), x0.mean(1), alpha_t, sigma_t)


@dataclass
class RolloutControl:
    """Regress the pathway onto Monte Carlo estimates of the optimal control from pre-trained rollouts.

    Attributes:
        steps, batch_size, lr: regression updates of the pathway.
        anchors: pre-trained trajectories; their states at ``times`` are the regression's x_t.
        rollouts: continuations K of the pre-trained sampler from each anchor state (the Monte Carlo size).
        times: noise levels of the anchors, each moved to the nearest point of the sampler's grid.
        chunk: anchor states continued at once (memory is chunk x rollouts samples).
        progress: show a progress bar while the rollouts are drawn.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    anchors: int = 256
    rollouts: int = 16
    times: tuple[float, ...] = DEFAULT_TIMES
    chunk: int = 64
    progress: bool = True
    name: str = "rollout_control"
    pool: TiltedPool | None = field(default=None, init=False, repr=False)
    x0: Tensor | None = field(default=None, init=False, repr=False)   # rollout end points, (L * N * K, ...)
    x_t: Tensor | None = field(default=None, init=False, repr=False)  # anchor states, (L * N, ...)
    t: Tensor | None = field(default=None, init=False, repr=False)    # their times, (L * N,)

    def prepare(self, problem: Problem, generator: torch.Generator) -> dict[str, Any]:
        if self.anchors < 1 or self.rollouts < 2:
            raise ValueError(f"rollout_control needs anchors >= 1 and rollouts >= 2, got {self.anchors} and "
                             f"{self.rollouts}")
        start = time.perf_counter()
        p = problem
        device = next(p.model.parameters()).device
        labels = label_space_of(p.model)
        grid = time_grid(p.n_steps, p.t_end, spacing=p.spacing, device=device)
        levels = grid_levels(grid, self.times)

        def pretrained(n: int):
            return p.model.conditioned(labels.none(n, device))

        with torch.no_grad():
            x1 = p.sde.prior_sampling((self.anchors, *p.x_shape), generator=generator, device=device)
            chunks = x1.split(self.chunk)
            states = torch.cat([euler_maruyama(p.sde, pretrained(len(c)), c, grid[:levels[-1] + 1],
                                               generator=generator).states[levels]
                                for c in chunks], dim=1)  # (L, N, ...)
            ends = []
            with progress_bar(len(levels) * len(chunks), "ctrl rollouts", enabled=self.progress) as advance:
                for level, x_level in zip(levels, states):
                    for c in x_level.split(self.chunk):
                        x = c.repeat_interleave(self.rollouts, dim=0)
                        ends.append(euler_maruyama(p.sde, pretrained(len(x)), x, grid[level:], generator=generator,
                                                   keep_trajectory=False).x)
                        advance()
            self.x0 = torch.cat(ends)  # (L * N * K, ...), the K rollouts of each anchor consecutive
            self.pool = labels.tilted_pool(self.x0, p.reward, p.objective.tilt)
        self.x_t = states.reshape(-1, *p.x_shape)
        self.t = grid[levels].repeat_interleave(self.anchors)
        return {"rollout_seconds": time.perf_counter() - start, "rollout_times": [float(grid[j]) for j in levels],
                "target_agreement": self.target_agreement(p, generator)}

    def _target(self, problem: Problem, y: Tensor, anchor: Tensor, rollouts: slice = slice(None)) -> Tensor:
        k = torch.arange(self.rollouts, device=anchor.device)[rollouts]
        index = anchor[:, None] * self.rollouts + k
        t = self.t[anchor]
        return rollout_target(self.pool, y, index, self.x0[index], problem.sde.alpha(t), problem.sde.sigma(t))

    def target_agreement(self, problem: Problem, generator: torch.Generator) -> list[float]:
        """Per anchor level, <u_A, u_B> / (|u_A| |u_B|) over the anchors, with u_A and u_B the targets from the two
        halves of the rollouts for requests from the label prior: 0 when the target is all Monte Carlo noise, 1 when
        K/2 rollouts already fix it (the share of the regression target that is signal)."""
        half = self.rollouts // 2
        out = []
        for level in range(len(self.t) // self.anchors):
            anchor = torch.arange(level * self.anchors, (level + 1) * self.anchors, device=self.t.device)
            y = problem.label_prior.sample(self.anchors, generator).to(self.t.device)
            u_a = self._target(problem, y, anchor, slice(0, half)).flatten(1)
            u_b = self._target(problem, y, anchor, slice(half, 2 * half)).flatten(1)
            dot = (u_a * u_b).sum()
            out.append(float(dot / (u_a.norm() * u_b.norm()).clamp_min(1e-30)))
        return out

    def loss(self, problem: Problem, y: Tensor, generator: torch.Generator) -> Tensor:
        if self.pool is None:
            raise RuntimeError("RolloutControl.prepare must run before loss")
        anchor = torch.randint(0, self.x_t.shape[0], (y.shape[0],), generator=generator).to(self.x_t.device)
        return control_regression_loss(problem.model, problem.sde, self.x_t[anchor], self.t[anchor], y,
                                       self._target(problem, y, anchor))
