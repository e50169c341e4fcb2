"""Forward and reverse SDEs in the one convention of DESIGN.md.

Time t in [0, 1], data at t = 0 and noise at t = 1. The variance-preserving SDE (Song et al. 2021,
"Score-Based Generative Modeling through Stochastic Differential Equations", eq. 11) is

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,
    x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I),  alpha_t = exp(-1/2 int_0^t beta),  sigma_t^2 = 1 - alpha_t^2,

and its reverse-time SDE (Anderson 1982; Song et al. eq. 6) is

    dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dW_bar,   t from 1 to 0.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ctrl_bio.utils import append_dims, randn, sum_except_batch


class SDE(abc.ABC):
    """A forward diffusion with a Gaussian marginal x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I).

    Subclasses give ``beta(t)`` and ``log_alpha(t)``; everything else follows. Every method takes
    ``t`` as a tensor of shape (batch_size,) (or a scalar tensor) and data of any shape (batch_size, ...).
    """

    @abc.abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        """Instantaneous noise rate beta(t) = g(t)^2."""

    @abc.abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha_t = -1/2 int_0^t beta(s) ds."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        # -expm1(2 log alpha) = 1 - alpha^2 without cancellation near t = 0.
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward drift f(x, t) = -1/2 beta(t) x and diffusion g(t) = sqrt(beta(t))."""
        beta = self.beta(t)
        return -0.5 * append_dims(beta, x.ndim) * x, torch.sqrt(beta)

    def marginal_prob(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean alpha_t x_0 (shape of x0) and std sigma_t (shape of t) of x_t | x_0."""
        return append_dims(self.alpha(t), x0.ndim) * x0, self.sigma(t)

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t = alpha_t x_0 + sigma_t eps for the given standard normal ``noise``."""
        mean, std = self.marginal_prob(x0, t)
        return mean + append_dims(std, x0.ndim) * noise

    def prior_sampling(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Sample the reference distribution at t = 1, N(0, I)."""
        return randn(shape, generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) summed over all dimensions but the batch one: (B, ...) -> (B,)."""
        n = z[0].numel()
        return -0.5 * n * math.log(2 * math.pi) - 0.5 * sum_except_batch(z**2)

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Drift of the reverse SDE in forward-time units, f(x, t) - g(t)^2 s(x, t).

        The reverse process runs t from 1 to 0, so one Euler step of size h > 0 moves the state by
        ``-h * reverse_drift``.
        """
        drift, _ = self.sde(x, t)
        return drift - append_dims(self.beta(t), x.ndim) * score

    def score_from_eps(self, eps: Tensor, t: Tensor) -> Tensor:
        """s = -eps / sigma_t for a network that predicts the noise."""
        return -eps / append_dims(self.sigma(t), eps.ndim)

    def denoise(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Tweedie's posterior mean x0_hat = (x_t + sigma_t^2 s) / alpha_t."""
        alpha, sigma = append_dims(self.alpha(t), x.ndim), append_dims(self.sigma(t), x.ndim)
        return (x + sigma**2 * score) / alpha


class VPSDE(SDE):
    """VP-SDE with a linear schedule beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021).

    Args:
        beta_min: beta(0).
        beta_max: beta(1); with the defaults alpha_1^2 = exp(-10.05), so x_1 is N(0, I) to 4e-5.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max and beta_max > 0, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"


class DiscreteScheduleSDE(SDE):
    """Any discrete-time DDPM schedule abar_0 > abar_1 > ... > abar_{N-1} (its ``alphas_cumprod``) as a VP-SDE.

    A discrete-time model trained on steps n = 0..N-1 with x_n | x_0 ~ N(sqrt(abar_n) x_0, (1 - abar_n) I) (Ho et al.
    2020, "Denoising Diffusion Probabilistic Models", eq. 4) becomes an SDE of DESIGN.md's convention by placing step n
    at time t_n = (n + 1) / N and interpolating log alpha_t linearly in t between the grid points (log alpha_0 = 0).
    Then alpha_{t_n}^2 = abar_n exactly at every grid point, and beta(t) = -2 d/dt log alpha_t is piecewise constant,
    -N log(abar_n / abar_{n-1}) on (n/N, (n+1)/N). The schedule is all the SDE needs, so every beta schedule a
    diffusers scheduler ships (linear, scaled_linear, squaredcos_cap_v2, sigmoid, trained betas, zero terminal SNR)
    is one of these (:func:`ctrl_bio.interop.sde_from_scheduler`). The network is queried at the continuous
    scheduler timestep :meth:`timestep` (t N - 1).

    Args:
        alphas_cumprod: abar_n for n = 0..N-1, N >= 2, in (0, 1] and non-increasing. A last value of 0 (a zero
            terminal-SNR schedule, Lin et al. 2024) is raised to 2^-24, as diffusers' own samplers do, so that
            log alpha_1 stays finite.
    """

    #: The smallest abar_n kept (diffusers' ``alphas_cumprod[-1] = 2**-24`` for zero terminal SNR).
    MIN_ALPHA_CUMPROD = 2.0**-24

    def __init__(self, alphas_cumprod: Tensor | Sequence[float]):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if abar.ndim != 1 or abar.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 steps, got shape {tuple(abar.shape)}")
        if not torch.isfinite(abar).all() or (abar < 0).any() or (abar > 1).any():
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if (abar[1:] > abar[:-1]).any():
            raise ValueError("alphas_cumprod must be non-increasing (a noise schedule only adds noise)")
        self._set_schedule(0.5 * torch.log(abar.clamp_min(self.MIN_ALPHA_CUMPROD)))

    def _set_schedule(self, log_alpha: Tensor) -> None:
        """Keep log alpha at t = 0, 1/N, ..., 1 from log alpha_{t_n} = 1/2 log abar_n (float64)."""
        self.num_train_timesteps = int(log_alpha.numel())
        self._log_alpha_grid = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha])

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_n for n = 0..N-1, as the scheduler holds them (float64)."""
        return torch.exp(2.0 * self._log_alpha_grid[1:])

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u = t.to(torch.float64) * self.num_train_timesteps
        i = torch.clamp(torch.floor(u), 0, self.num_train_timesteps - 1).long()
        return i, u - i

    def log_alpha(self, t: Tensor) -> Tensor:
        grid = self._log_alpha_grid.to(t.device)
        i, frac = self._segment(t)
        return (grid[i] + frac * (grid[i + 1] - grid[i])).to(t.dtype)

    def beta(self, t: Tensor) -> Tensor:
        grid = self._log_alpha_grid.to(t.device)
        i, _ = self._segment(t)
        return (-2.0 * self.num_train_timesteps * (grid[i + 1] - grid[i])).to(t.dtype)

    def timestep(self, t: Tensor) -> Tensor:
        """The scheduler's (continuous) timestep index of time t: t N - 1, so t_n = (n + 1) / N gives n."""
        return t * self.num_train_timesteps - 1.0

    def __repr__(self) -> str:
        abar = self.alphas_cumprod
        return (f"DiscreteScheduleSDE(num_train_timesteps={self.num_train_timesteps}, "
                f"alphas_cumprod=[{float(abar[0]):.6g}, ..., {float(abar[-1]):.6g}])")


class DiscreteVPSDE(DiscreteScheduleSDE):
    """A named DDPM beta schedule as a :class:`DiscreteScheduleSDE`, kept by its four settings.

    The linear schedule's continuum limit is :class:`VPSDE`: beta(t) = -N log(1 - beta_n) on (n/N, (n+1)/N), which
    is N beta_n to first order. Its public attributes are exactly the constructor's arguments, which is what a saved
    network's SDE is checked against.

    Args:
        beta_start, beta_end: the scheduler's first and last beta_n (unused by ``squaredcos_cap_v2``).
        num_train_timesteps: N.
        beta_schedule: ``linear`` (DDPM: beta_n linear in n), ``scaled_linear`` (Stable Diffusion: sqrt(beta_n)
            linear in n) or ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
            Probabilistic Models", eq. 17: abar(s) = cos^2((s + 0.008) / 1.008 pi / 2), beta_n capped at 0.999),
            as diffusers names them.
    """

    SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear"):
        if beta_schedule not in self.SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {self.SCHEDULES}, got {beta_schedule!r}")
        if not 0 < beta_start <= beta_end < 1 or num_train_timesteps < 2:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1 and num_train_timesteps >= 2, got "
                             f"{beta_start}, {beta_end}, {num_train_timesteps}")
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.beta_schedule = beta_schedule
        n = int(num_train_timesteps)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        else:
            s = torch.arange(n + 1, dtype=torch.float64) / n
            abar_fn = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.clamp(1.0 - abar_fn[1:] / abar_fn[:-1], max=0.999)
        # float64: the cumulative sum of a thousand small logs.
        self._set_schedule(0.5 * torch.cumsum(torch.log1p(-betas), 0))

    def __repr__(self) -> str:
        return (f"DiscreteVPSDE(beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r})")
