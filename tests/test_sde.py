"""VP-SDE against closed forms and simulation."""

import math

import pytest
import torch

from ctrl_bio.sde import VPSDE
from ctrl_bio.utils import append_dims


def test_alpha_sigma_closed_form():
    sde = VPSDE(0.1, 20.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    integral = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(sde.alpha(t), torch.exp(-0.5 * integral))
    torch.testing.assert_close(sde.sigma(t) ** 2, 1 - torch.exp(-integral))
    assert float(sde.alpha(torch.tensor(1.0))) ** 2 == pytest.approx(math.exp(-10.05), rel=1e-5)


def test_marginal_matches_forward_simulation():
    """Euler-Maruyama of the forward SDE from a fixed x0 reaches N(alpha_t x0, sigma_t^2)."""
    sde = VPSDE(0.1, 20.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([2.0, -1.0], dtype=torch.float64)
    x = x0.expand(20_000, 2).clone()
    n, t_final = 500, 0.6
    h = t_final / n
    for k in range(n):
        t = torch.tensor(k * h, dtype=torch.float64)
        drift, diffusion = sde.sde(x, t.expand(x.shape[0]))
        x = x + drift * h + append_dims(diffusion, 2) * math.sqrt(h) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    mean, std = sde.marginal_prob(x0[None], torch.tensor([t_final], dtype=torch.float64))
    torch.testing.assert_close(x.mean(0), mean[0], atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(0), std.expand(2), atol=0.02, rtol=0)


@pytest.mark.parametrize("shape", [(5, 3), (5, 4, 200), (5, 3, 8, 8)])
def test_shapes_are_agnostic(shape):
    sde = VPSDE()
    x, t = torch.randn(shape), torch.rand(shape[0])
    drift, diffusion = sde.sde(x, t)
    assert drift.shape == x.shape and diffusion.shape == (shape[0],)
    assert sde.reverse_drift(x, t, torch.randn(shape)).shape == x.shape
    assert sde.prior_logp(x).shape == (shape[0],)
    score = torch.randn(shape)
    # Tweedie's x0_hat and the noise parameterisation round-trip
    eps = -score * append_dims(sde.sigma(t), len(shape))
    torch.testing.assert_close(sde.score_from_eps(eps, t), score)


def test_invalid_schedule():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(5.0, 1.0)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_discrete_vp_matches_the_ddpm_marginals_at_every_step(schedule):
    """alpha_{t_n}^2 = prod_{m<=n} (1 - beta_m) at t_n = (n + 1) / N, in closed form (Ho et al. 2020, eq. 4)."""
    from ctrl_bio.sde import DiscreteVPSDE

    beta_start, beta_end, n = (1e-4, 0.02, 1000) if schedule == "linear" else (8.5e-4, 0.012, 1000)
    sde = DiscreteVPSDE(beta_start, beta_end, n, schedule)
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    else:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    torch.testing.assert_close(sde.alpha(t) ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.sigma(t) ** 2, 1 - abar, rtol=1e-10, atol=0)
    torch.testing.assert_close(sde.timestep(t), torch.arange(n, dtype=torch.float64))
    # beta = -2 d/dt log alpha: integrating it back gives log alpha (beta is piecewise constant: midpoints are exact).
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    mid = 0.5 * (grid[1:] + grid[:-1])
    integral = torch.cumsum(sde.beta(mid) * (grid[1:] - grid[:-1]), 0)
    torch.testing.assert_close(-0.5 * integral, sde.log_alpha(grid[1:]), rtol=1e-10, atol=1e-12)


def test_discrete_vp_linear_schedule_tends_to_the_continuous_vp():
    from ctrl_bio.sde import VPSDE, DiscreteVPSDE

    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    discrete, continuous = DiscreteVPSDE(1e-4, 0.02, 1000), VPSDE(0.1, 20.0)
    # -N log(1 - beta_n) = N beta_n (1 + O(beta_n)): log alpha agrees to 0.05 at t = 1, where it is -5.0.
    torch.testing.assert_close(discrete.log_alpha(t), continuous.log_alpha(t), rtol=0, atol=0.05)


def test_discrete_vp_matches_diffusers_scheduler():
    """The same abar_n as diffusers' DDPMScheduler, the schedule Stable Diffusion is trained on."""
    diffusers = pytest.importorskip("diffusers")
    from ctrl_bio.sde import DiscreteVPSDE

    sched = diffusers.DDPMScheduler(beta_start=8.5e-4, beta_end=0.012, beta_schedule="scaled_linear")
    sde = DiscreteVPSDE(8.5e-4, 0.012, 1000, "scaled_linear")
    torch.testing.assert_close(sde.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_time_grid_quadratic_spacing_shrinks_towards_the_data():
    from ctrl_bio.sampling import time_grid

    g = time_grid(50, 1e-4, spacing="quadratic", dtype=torch.float64)
    assert g[0] == 1.0 and abs(float(g[-1]) - 1e-4) < 1e-15
    h = g[:-1] - g[1:]
    assert (h > 0).all() and h[-1] < h[0] / 50
    with pytest.raises(ValueError, match="spacing"):
        time_grid(5, spacing="cubic")
