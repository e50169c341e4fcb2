"""Path KL between a controlled reverse process and the pre-trained one (Girsanov).

With the same start N(0, I) and the same diffusion sqrt(beta), the two reverse SDEs differ only in the
drift, by beta(t) u(x, t) with u = s_theta - s_pre, and Girsanov's theorem gives

    KL(P_theta || P_pre) = E_{P_theta} int_0^1 beta(t)/2 ||u(x_t, t)||^2 dt,

summed over every dimension of x (DESIGN.md; CTRL, Zhao et al. 2024, eq. 5). One Euler-Maruyama step
of size h has Gaussian transitions with equal covariance beta h I, whose KL is
||mean_theta - mean_pre||^2 / (2 beta h) = h beta ||u||^2 / 2: a left Riemann sum of the same integral.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ctrl_bio.sde import SDE
from ctrl_bio.utils import sum_except_batch


def girsanov_kl(sde: SDE, times: Tensor, controls: Tensor) -> Tensor:
    """Continuous-time form: trapezoidal quadrature of int beta(t)/2 ||u||^2 dt.

    Args:
        sde: supplies beta(t).
        times: time grid (n + 1,), in either direction.
        controls: u at the grid points along each path, (n + 1, batch_size, ...).

    Returns:
        KL per path, (batch_size,).
    """
    sq = torch.stack([sum_except_batch(u**2) for u in controls])  # (n + 1, B)
    integrand = 0.5 * sde.beta(times)[:, None] * sq
    return torch.trapezoid(integrand, times.reshape(-1, 1), dim=0).abs()


def transition_kl(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) summed over all dimensions, (batch_size,)."""
    return sum_except_batch((mean - mean_ref) ** 2) / (2.0 * std**2)


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """Closed-form KL(N(mean_p, diag var_p) || N(mean_q, diag var_q)), summed over the last dimension."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0).sum(dim=-1)
