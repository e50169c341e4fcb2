"""Paths of the Euler-Maruyama chain as a Gaussian policy: what policy-gradient CTRL records and replays.

One reverse step from x_k at time t_k is the Gaussian policy N(mean_theta(x_k), std_k^2 I), std_k^2 = beta_k h,
mean_theta = mean_pre + h beta_k u_theta(x_k) (Zhao, Chen et al. 2025, "Score as Action"). A :class:`PathBatch`
keeps what the surrogate and the reference terms of :mod:`ctrl_bio.policy_gradient` need of each step: the state,
the standard normal increment, the snapshot's control and denoised prediction; :func:`step_log_ratio` is the
exact per-step log-ratio of two such policies, :meth:`PathBatch.log_density_ratio` the Girsanov density of a path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ctrl_bio.model import ConditionalScore
from ctrl_bio.reward import LabelPrior, Reward
from ctrl_bio.sampling import Spacing, em_step, time_grid
from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims, sum_except_batch

#: PathBatch fields indexed by path first (the others are (steps, paths, ...)).
_PER_PATH = ("y", "on_policy")


def transition_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x_next; mean, std^2 I) of one Euler-Maruyama transition, summed over dimensions, (batch_size,)."""
    n = x_next[0].numel()
    return -sum_except_batch((x_next - mean) ** 2) / (2.0 * std**2) - n * (torch.log(std) + 0.5 * math.log(2 * math.pi))


def step_log_ratio(noise: Tensor, std: Tensor, du: Tensor) -> Tensor:
    """log N(x_next; mean_theta) - log N(x_next; mean_old) for x_next = mean_old + std * noise, (batch_size,).

    With mean_theta - mean_old = std^2 du (du = u_theta - u_old), the difference of the two Gaussian
    log-densities is std noise . du - std^2 ||du||^2 / 2; written this way it has no cancellation of the
    large log-density terms.

    Args:
        noise: standard normal increment of the step, (batch_size, ...).
        std: sqrt(beta(t) h), a scalar tensor or (batch_size,).
        du: control difference u_theta - u_old at the step's start state, (batch_size, ...).
    """
    std = append_dims(std, du.ndim) if std.ndim else std
    return sum_except_batch(std * noise * du) - 0.5 * sum_except_batch((std * du) ** 2)


@dataclass
class PathBatch:
    """Paths of the behaviour process, detached, with what the surrogate needs (n = steps, B = paths).

    Attributes:
        y: labels, (B, K).
        times: time grid of each path, (n + 1, B).
        states: x_{t_k}, (n + 1, B, ...).
        noises: standard normal increments z_k, (n, B, ...).
        controls: u_old(x_k) of the snapshot policy, (n, B, ...) (also where the behaviour used u = 0).
        x0_hat: the snapshot's denoised prediction at each state, (n, B, ...).
        stds: sqrt(beta(t_k) h_k), (n, B).
        active: steps taken by the policy (at or after the switch step), (n, B) bool.
        on_policy: paths that followed the policy from t = 1, (B,) bool.
    """

    y: Tensor
    times: Tensor
    states: Tensor
    noises: Tensor
    controls: Tensor
    x0_hat: Tensor
    stds: Tensor
    active: Tensor
    on_policy: Tensor

    def select(self, idx: Tensor) -> PathBatch:
        """The paths ``idx`` of the batch."""
        return PathBatch(**{name: value[idx] if name in _PER_PATH else value[:, idx] for name, value in self._fields()})

    @staticmethod
    def concat(batches: list[PathBatch]) -> PathBatch:
        """Paths of several batches side by side."""
        return PathBatch(**{name: torch.cat([getattr(b, name) for b in batches], dim=0 if name in _PER_PATH else 1)
                            for name, _ in batches[0]._fields()})

    def _fields(self) -> list[tuple[str, Tensor]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    @property
    def x0(self) -> Tensor:
        return self.states[-1]

    def log_density_ratio(self) -> Tensor:
        """log dP_behaviour/dP_pre of each path, (B,): the Girsanov density of the Euler-Maruyama chain.

        A step x_{k+1} = mean_pre + std^2 u + std z has, under the pre-trained chain, the noise z + std u, so its
        log-ratio is (||z + std u||^2 - ||z||^2) / 2 = std z . u + std^2 ||u||^2 / 2; steps the pre-trained score
        took (before the switch step) contribute zero. Exact for the recorded chain, with no discretisation error.
        """
        std = append_dims(self.stds, self.controls.ndim)
        drift = std * self.controls
        per_step = (self.noises * drift).flatten(2).sum(2) + 0.5 * (drift**2).flatten(2).sum(2)
        return (per_step * self.active).sum(0)

    @property
    def kl_steps(self) -> Tensor:
        """Closed-form transition KL of the snapshot against the pre-trained model, h beta ||u||^2 / 2, (n, B)."""
        sq = torch.stack([sum_except_batch(u**2) for u in self.controls])
        return 0.5 * self.stds**2 * sq * self.active


@torch.no_grad()
def collect_paths(model: ConditionalScore, sde: SDE, y: Tensor, x_shape: tuple[int, ...], times: Tensor, *,
                  switch_step: Tensor | None = None, generator: torch.Generator | None = None) -> PathBatch:
    """Roll out the behaviour process: the pre-trained score before ``switch_step``, the model's after it.

    Args:
        switch_step: per path the first step taken by the policy, (B,) long; None or 0 is fully on-policy.
    """
    n, b = times.shape[0] - 1, y.shape[0]
    device = times.device
    switch_step = torch.zeros(b, dtype=torch.long, device=device) if switch_step is None else switch_step
    score_fn = model.conditioned(y)
    x = sde.prior_sampling((b, *x_shape), generator=generator, device=device)
    states, noises, controls, x0_hats, stds, actives = [x], [], [], [], [], []
    for k in range(n):
        t, h = times[k], times[k] - times[k + 1]
        active = switch_step <= k
        s_theta, u = score_fn(x, t.expand(b))
        gate = append_dims(active.to(x.dtype), x.ndim)
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        # The behaviour's score is s_pre + gate * u, i.e. exactly s_pre before the switch step.
        behaviour = (s_theta - (1 - gate) * u, gate * u)
        x_next, _, _ = em_step(sde, lambda _x, _t, out=behaviour: out, x, t, h, z)
        x0_hats.append(sde.denoise(x, t.expand(b), s_theta))
        controls.append(u)
        noises.append(z)
        stds.append(torch.sqrt(sde.beta(t) * h))
        actives.append(active)
        states.append(x_next)
        x = x_next
    return PathBatch(y=y, times=times[:, None].expand(n + 1, b), states=torch.stack(states), noises=torch.stack(noises),
                     controls=torch.stack(controls), x0_hat=torch.stack(x0_hats),
                     stds=torch.stack(stds)[:, None].expand(n, b),
                     active=torch.stack(actives), on_policy=switch_step == 0)


def jittered_grid(n_steps: int, t_end: float, generator: torch.Generator, *, spacing: Spacing = "uniform",
                  device: torch.device | str | None = None) -> Tensor:
    """A decreasing grid from 1 to t_end whose interior points are drawn uniformly within their cells, (n + 1,).

    Training on random grids keeps the learnt control right at every t, not only at the points of one fixed
    grid, so that the fine-tuned model can be sampled with any step count (step-count independence). The jitter is
    drawn in the grid's own coordinate u in [0, 1] (:func:`ctrl_bio.sampling.time_grid`: t = t_end + (1 - t_end) u
    for ``uniform``, u^2 for ``quadratic``), so a quadratic grid keeps its fine steps near the data.
    """
    if spacing == "uniform":
        # Jittered in t directly, in float32: the arithmetic every recorded uniform-grid run was made with.
        grid = time_grid(n_steps, t_end, device=device)
        shift = (torch.rand(n_steps - 1, generator=generator) - 0.5).to(grid) * ((1.0 - t_end) / n_steps)
        return torch.cat([grid[:1], grid[1:-1] + shift, grid[-1:]])
    if spacing != "quadratic":
        raise ValueError(f"spacing must be 'uniform' or 'quadratic', got {spacing!r}")
    u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    shift = (torch.rand(n_steps - 1, generator=generator) - 0.5).to(torch.float64) / n_steps
    u = torch.cat([u[:1], u[1:-1] + shift, u[-1:]])
    return (t_end + (1.0 - t_end) * u**2).to(device=device, dtype=torch.float32)


def draw_reference_pool(model: ConditionalScore, sde: SDE, reward: Reward, label_prior: LabelPrior,
                    x_shape: tuple[int, ...], n_steps: int, t_end: float, size: int,
                    generator: torch.Generator, chunk: int = 256, spacing: Spacing = "uniform",
                    keep_paths: bool = True) -> tuple[PathBatch | None, Tensor, Tensor, Tensor]:
    """Pre-trained paths (no policy step) on random grids: ``(paths, x0, y, reward)``, failed rewards left out.

    Scored once (one query per path) and reused by every update. With ``keep_paths=False`` only the end points and
    labels are kept (``paths`` is None): the score-matching term reads nothing else, and a whole path is ``n_steps``
    times the memory of its end point.
    """
    device = next(model.parameters()).device
    chunks, x0, y = [], [], []
    for start in range(0, size, chunk):
        b = min(chunk, size - start)
        y_chunk = label_prior.sample(b, generator).to(device)
        times = jittered_grid(n_steps, t_end, generator, spacing=spacing, device=device)
        paths = collect_paths(model, sde, y_chunk, x_shape, times, generator=generator,
                              switch_step=torch.full((b,), n_steps, dtype=torch.long, device=device))
        x0.append(paths.x0.clone())  # a copy: the view paths.x0 would keep the chunk's whole states tensor alive
        y.append(paths.y)
        if keep_paths:
            chunks.append(paths)
    x0_all, y_all = torch.cat(x0), torch.cat(y)
    with torch.no_grad():
        r = reward(x0_all, y_all).detach().to(device=device, dtype=torch.float32).reshape(-1)
    keep = torch.isfinite(r).nonzero().squeeze(1)
    return (PathBatch.concat(chunks).select(keep) if keep_paths else None), x0_all[keep], y_all[keep], r[keep]
