"""Euler-Maruyama sampling of the reverse SDE, differentiable end to end; deterministic DDIM for sampling only.

Samplers are plain functions over any score callable (as in k-diffusion), so guidance, exact
h-transforms and label pathways wrap the score and the sampler never branches on them. No
``@torch.no_grad()`` here: CTRL backpropagates through sampling, so the caller decides with
``torch.set_grad_enabled``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims, randn, sum_except_batch

#: A score callable ``(x, t) -> s`` with x of shape (B, ...) and t of shape (B,). It may instead return
#: the pair ``(s, u)`` where ``u = s - s_ref`` is the control against a reference (pre-trained) score;
#: the sampler then records the Girsanov KL increments of the path against the reference.
ScoreFn = Callable[[Tensor, Tensor], Union[Tensor, tuple[Tensor, Tensor]]]


@dataclass
class SamplerOutput:
    """What one run of the sampler hands to evaluation and to RL.

    Attributes:
        x: final samples at t = times[-1], (batch_size, ...); carries gradients when enabled.
        times: the time grid, (n_steps + 1,), decreasing from 1.
        kl_steps: Euler-Maruyama KL increments ||mean - mean_ref||^2 / (2 std^2), (n_steps, batch_size);
            zeros when the score callable returns no control. Carries gradients when enabled.
        states: detached states x_{t_k}, (n_steps + 1, batch_size, ...), or None if not kept.
        means: detached transition means, (n_steps, batch_size, ...), or None if not kept.
        stds: transition standard deviations sqrt(beta(t_k) h_k), (n_steps,).
    """

    x: Tensor
    times: Tensor
    kl_steps: Tensor
    stds: Tensor
    states: Tensor | None = None
    means: Tensor | None = None

    @property
    def kl(self) -> Tensor:
        """Path KL to the reference process per sample, (batch_size,)."""
        return self.kl_steps.sum(dim=0)


Spacing = Literal["uniform", "quadratic"]


def time_grid(n_steps: int, t_end: float = 1e-3, *, spacing: Spacing = "uniform",
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decreasing grid 1 = t_0 > t_1 > ... > t_N = t_end for the reverse process.

    ``uniform`` steps are equal. ``quadratic`` puts t_k = t_end + (1 - t_end)(1 - k/N)^2 (the "quad" spacing of
    DDIM, Song et al. 2021, Sec. D.2): steps shrink towards the data, so the last Euler-Maruyama step adds noise of
    std sqrt(beta h) with h ~ 1/N^2 rather than 1/N. Images need this: on a uniform 50-step grid the last step adds
    noise of std 0.1 (13 grey levels), which is visible and is incompressible for a JPEG encoder.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must lie in [0, 1), got {t_end}")
    if spacing == "uniform":
        return torch.linspace(1.0, t_end, n_steps + 1, device=device, dtype=dtype)
    if spacing == "quadratic":
        u = torch.linspace(1.0, 0.0, n_steps + 1, device=device, dtype=torch.float64)
        return (t_end + (1.0 - t_end) * u**2).to(dtype)
    raise ValueError(f"spacing must be 'uniform' or 'quadratic', got {spacing!r}")


def split_score(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """Normalise a score callable's output into (score, control or None)."""
    if isinstance(out, tuple):
        return out
    return out, None


def em_step(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, h: Tensor,
            noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One reverse Euler-Maruyama step from time t to t - h.

    mean = x - h [f(x, t) - beta(t) s(x, t)],  x_next = mean + sqrt(beta(t) h) * noise.
    With the same start and diffusion, the transition KL against the reference score is
    ||h beta u||^2 / (2 beta h) = h beta ||u||^2 / 2 (DESIGN.md), summed over all dimensions.

    Returns:
        (x_next, mean, kl) with kl of shape (batch_size,).
    """
    t_vec = t.expand(x.shape[0])
    score, control = split_score(score_fn(x, t_vec))
    if score.shape != x.shape:
        raise ValueError(f"score callable returned shape {tuple(score.shape)} for input {tuple(x.shape)}")
    beta = sde.beta(t)
    mean = x - h * sde.reverse_drift(x, t_vec, score)
    x_next = mean + torch.sqrt(beta * h) * noise
    if control is None:
        kl = x.new_zeros(x.shape[0])
    else:
        kl = 0.5 * beta * h * sum_except_batch(control**2)
    return x_next, mean, kl


def euler_maruyama(sde: SDE, score_fn: ScoreFn, x_init: Tensor, times: Tensor, *,
                   noise: Tensor | None = None, generator: torch.Generator | None = None,
                   checkpoint: bool = False, grad_last_k: int | None = None,
                   keep_trajectory: bool = True) -> SamplerOutput:
    """Sample the reverse SDE with Euler-Maruyama over ``times`` (decreasing).

    Args:
        sde: the forward SDE.
        score_fn: ``(x, t) -> s`` or ``(x, t) -> (s, u)`` (see :data:`ScoreFn`).
        x_init: start at t = times[0], (batch_size, ...), usually ``sde.prior_sampling``.
        times: decreasing time grid, (n_steps + 1,).
        noise: optional standard normal increments, (n_steps, batch_size, ...); two runs with the same
            noise and the same score are identical (used to check zero initialisation bit for bit).
        generator: random generator used when ``noise`` is None.
        checkpoint: recompute each step's activations in the backward pass, so that memory stays flat
            in the number of steps (Chen et al. 2016) at the cost of one extra forward per step.
        grad_last_k: if set, only the last k steps are differentiated (DRaFT-K, Clark et al. 2024);
            earlier steps run under ``torch.no_grad``.
        keep_trajectory: store detached states and means (needed by policy-gradient estimators).
    """
    n_steps = times.shape[0] - 1
    if noise is not None and noise.shape != (n_steps, *x_init.shape):
        raise ValueError(f"noise must have shape {(n_steps, *x_init.shape)}, got {tuple(noise.shape)}")
    first_grad_step = 0 if grad_last_k is None else max(n_steps - grad_last_k, 0)
    x = x_init
    states = [x.detach()] if keep_trajectory else None
    means, kls, stds = [], [], []
    for k in range(n_steps):
        t, h = times[k], times[k] - times[k + 1]
        z = noise[k] if noise is not None else randn(x.shape, generator, device=x.device, dtype=x.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and k >= first_grad_step):
            if checkpoint and torch.is_grad_enabled():
                x, mean, kl = activation_checkpoint(em_step, sde, score_fn, x, t, h, z, use_reentrant=False)
            else:
                x, mean, kl = em_step(sde, score_fn, x, t, h, z)
        kls.append(kl)
        stds.append(torch.sqrt(sde.beta(t) * h))
        if keep_trajectory:
            states.append(x.detach())
            means.append(mean.detach())
    return SamplerOutput(
        x=x, times=times, kl_steps=torch.stack(kls), stds=torch.stack(stds),
        states=torch.stack(states) if keep_trajectory else None,
        means=torch.stack(means) if keep_trajectory else None)


@torch.no_grad()
def sample_in_batches(sde: SDE, score_fn_for: Callable[[Tensor], ScoreFn], y: Tensor, x_shape: tuple[int, ...],
                      times: Tensor, batch_size: int, generator: torch.Generator,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Samples and path KLs for requests y, ``batch_size`` at a time, every batch from the same ``generator``.

    Args:
        score_fn_for: requests of one batch -> the score callable to sample that batch with.
        y: requests, (N, ...); only their count and batching matter here.
        device: where the paths are computed (the score's device); None: the generator's. A CPU generator on a
            CUDA device draws the same numbers as on the CPU (:func:`ctrl_bio.utils.randn`).
    """
    xs, kls = [], []
    times = times.to(device) if device is not None else times
    for start in range(0, y.shape[0], batch_size):
        yb = y[start:start + batch_size].to(device) if device is not None else y[start:start + batch_size]
        x_init = sde.prior_sampling((yb.shape[0], *x_shape), generator=generator, device=device)
        out = euler_maruyama(sde, score_fn_for(yb), x_init, times, generator=generator, keep_trajectory=False)
        xs.append(out.x)
        kls.append(out.kl)
    return torch.cat(xs), torch.cat(kls)


def ddim_step(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One deterministic DDIM step from time t to t_next < t (Song et al. 2021, "Denoising Diffusion Implicit
    Models", eq. 12 with eta = 0), written over the score in this code base's time convention.

    With x_t = alpha_t x_0 + sigma_t eps, the score gives the noise eps_hat = -sigma_t s(x, t) and Tweedie's
    x0_hat = (x + sigma_t^2 s) / alpha_t; DDIM keeps eps_hat and moves x0_hat to the next noise level:

        x_next = alpha_{t_next} x0_hat + sigma_{t_next} eps_hat.

    (Song's alpha_t is our alpha_t^2.) A control returned beside the score is ignored: a deterministic step carries
    no path KL.
    """
    t_vec = t.expand(x.shape[0])
    score, _ = split_score(score_fn(x, t_vec))
    if score.shape != x.shape:
        raise ValueError(f"score callable returned shape {tuple(score.shape)} for input {tuple(x.shape)}")
    eps_hat = -append_dims(sde.sigma(t_vec), x.ndim) * score
    x0_hat = sde.denoise(x, t_vec, score)
    t_next_vec = t_next.expand(x.shape[0])
    return append_dims(sde.alpha(t_next_vec), x.ndim) * x0_hat + append_dims(sde.sigma(t_next_vec), x.ndim) * eps_hat


def ddim(sde: SDE, score_fn: ScoreFn, x_init: Tensor, times: Tensor) -> Tensor:
    """Deterministic DDIM sampling (eta = 0) over ``times`` (decreasing): x at t = times[-1].

    For sampling only (``ctrl-bio sample sampler=ddim``): it follows the probability-flow ODE of the same marginals
    with no injected noise, so it needs no generator and records no KL; fine-tuning keeps the KL-carrying
    :func:`euler_maruyama`. Its last step to a t_end near 0 returns Tweedie's mean, which is what DDIM outputs.
    """
    x = x_init
    for k in range(times.shape[0] - 1):
        x = ddim_step(sde, score_fn, x, times[k], times[k + 1])
    return x
