"""Sampler and path KL: Girsanov = Euler-Maruyama = closed form on a Gaussian h-transform."""

import math

import pytest
import torch

from ctrl_bio.kl import gaussian_kl, girsanov_kl, transition_kl
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE

TAU2 = 0.5  # observation noise of y = x0 + tau * n


def gaussian_problem(y: torch.Tensor):
    """p_pre = N(0, I) (so s_pre = -x at every t), p(y | x0) = N(y; x0, tau^2 I).

    Then h_t(x) = N(y; alpha_t x, (1 - alpha_t^2 + tau^2) I), grad log h = alpha (y - alpha x) / (1 - alpha^2 + tau^2),
    and the target is N(y / (1 + tau^2), tau^2 / (1 + tau^2) I).
    """
    sde = VPSDE(0.1, 20.0)

    def score_fn(x, t):
        a = sde.alpha(t)[:, None]
        u = a * (y - a * x) / (1 - a**2 + TAU2)
        return -x + u, u

    return sde, score_fn


def test_girsanov_kl_equals_em_kl_and_closed_form():
    d, n = 2, 10_000
    y = torch.tensor([1.5, -0.5], dtype=torch.float64)
    sde, score_fn = gaussian_problem(y)
    g = torch.Generator().manual_seed(0)
    times = time_grid(500, 1e-4, dtype=torch.float64)
    out = euler_maruyama(sde, score_fn, torch.randn(n, d, generator=g, dtype=torch.float64), times, generator=g)
    target_mean, target_var = y / (1 + TAU2), torch.full((d,), TAU2 / (1 + TAU2), dtype=torch.float64)
    torch.testing.assert_close(out.x.mean(0), target_mean, atol=0.02, rtol=0)
    torch.testing.assert_close(out.x.var(0), target_var, atol=0.02, rtol=0)
    closed = float(gaussian_kl(target_mean, target_var, torch.zeros(d, dtype=torch.float64),
                               torch.ones(d, dtype=torch.float64)))
    em = float(out.kl.mean())
    controls = torch.stack([score_fn(s, times[k].expand(n))[1] for k, s in enumerate(out.states)])
    continuous = float(girsanov_kl(sde, times, controls).mean())
    assert em == pytest.approx(closed, rel=0.03)
    assert continuous == pytest.approx(closed, rel=0.03)
    assert em == pytest.approx(continuous, rel=0.01)


def test_transition_kl_is_the_em_increment():
    sde = VPSDE()
    x = torch.randn(7, 3)
    t, h = torch.tensor(0.5), torch.tensor(0.01)
    s_pre, u = -x, torch.randn(7, 3)
    mean_pre = x - h * sde.reverse_drift(x, t.expand(7), s_pre)
    mean = x - h * sde.reverse_drift(x, t.expand(7), s_pre + u)
    std = torch.sqrt(sde.beta(t) * h)
    torch.testing.assert_close(transition_kl(mean, mean_pre, std), 0.5 * sde.beta(t) * h * (u**2).sum(1))


def test_kl_sums_over_dimensions():
    """The KL of a d-dimensional path is d times that of one dimension (summed, not averaged)."""
    sde = VPSDE()
    times = time_grid(20)
    noise = torch.randn(20, 4, 1)
    one = euler_maruyama(sde, lambda x, t: (-x + 1.0, torch.ones_like(x)), torch.zeros(4, 1), times, noise=noise)
    many = euler_maruyama(sde, lambda x, t: (-x + 1.0, torch.ones_like(x)), torch.zeros(4, 5), times,
                          noise=noise.expand(20, 4, 5).contiguous())
    torch.testing.assert_close(many.kl, 5 * one.kl)


def test_same_noise_same_path_and_outputs():
    sde = VPSDE()
    times = time_grid(10)
    noise = torch.randn(10, 3, 2)
    a = euler_maruyama(sde, lambda x, t: -x, torch.ones(3, 2), times, noise=noise)
    b = euler_maruyama(sde, lambda x, t: -x, torch.ones(3, 2), times, noise=noise)
    assert torch.equal(a.x, b.x) and a.states.shape == (11, 3, 2) and a.means.shape == (10, 3, 2)
    assert torch.equal(a.kl, torch.zeros(3))
    assert a.stds.shape == (10,) and float(a.stds[0]) == pytest.approx(math.sqrt(20.0 * 0.0999), rel=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="noise"):
        euler_maruyama(VPSDE(), lambda x, t: -x, torch.ones(3, 2), time_grid(5), noise=torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="shape"):
        euler_maruyama(VPSDE(), lambda x, t: x[:, :1], torch.ones(3, 2), time_grid(5))
