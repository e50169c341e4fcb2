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
