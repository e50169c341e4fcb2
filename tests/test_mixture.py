"""The mixture testbed: analytic score and exact labels against autograd and sampling."""

import math

import pytest
import torch

from ctrl_bio.metrics import energy_distance, tilted_accuracy, tilted_objective
from ctrl_bio.sampling import euler_maruyama, time_grid
from domains.gmm import exact_guidance, make_testbed


@pytest.mark.parametrize("t_value", [0.0, 0.05, 0.4, 0.9])
def test_score_equals_autograd_of_log_density(t_value):
    tb = make_testbed(dim=3, n_components=6, n_classes=3, seed=1)
    x = torch.randn(64, 3, dtype=torch.float64) * 3
    mix = tb.mixture
    mix64 = type(mix)(mix.weights.double(), mix.means.double(), mix.variances.double())
    t = torch.full((64,), t_value, dtype=torch.float64)
    x.requires_grad_(True)
    grad = torch.autograd.grad(mix64.log_prob(x, tb.sde, t).sum(), x)[0]
    torch.testing.assert_close(mix64.score(x.detach(), tb.sde, t), grad, atol=1e-9, rtol=1e-7)


def test_label_h_gradient_equals_autograd():
    tb = make_testbed(dim=3, n_components=6, n_classes=3, seed=2)
    label = tb.component_label
    x = (torch.randn(32, 3) * 2).requires_grad_(True)
    y = torch.randint(0, 3, (32,))
    t = torch.full((32,), 0.3)
    logh = label.log_prob(x, tb.sde, t).gather(1, y[:, None]).sum()
    grad = torch.autograd.grad(logh, x)[0]
    torch.testing.assert_close(label.grad_log_h(x.detach(), y, tb.sde, t), grad, atol=1e-4, rtol=1e-4)


def test_invalid_testbeds():
    with pytest.raises(ValueError, match="at least twice"):
        make_testbed(dim=2, n_components=5, n_classes=3)
    with pytest.raises(ValueError, match="positive"):
        make_testbed(dim=0)


def test_every_class_has_two_components():
    tb = make_testbed(dim=2, n_components=9, n_classes=4, seed=0)
    assert torch.bincount(tb.component_label.classes).min() >= 2


def test_exact_guidance_samples_the_restricted_mixture():
    """The Doob h-transform of the exact score samples p(x | y) (CTRL Thm. 1) up to discretisation."""
    tb = make_testbed(dim=2, n_components=4, n_classes=2, seed=3)
    label = tb.component_label
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (2000,), generator=g)
    out = euler_maruyama(tb.sde, exact_guidance(tb.pretrained, label, tb.sde, y), torch.randn(2000, 2, generator=g),
                         time_grid(200), generator=g)
    assert (label.bayes_label(out.x) == y).float().mean() > 0.99
    target = label.sample_target(y, g)
    for c in (0, 1):
        rows = y == c
        floor = sum(energy_distance(label.sample_target(y, g)[rows], target[rows]) for _ in range(5)) / 5
        assert energy_distance(out.x[rows], target[rows]) < 2 * floor
    # the path KL of the h-transform equals KL(p(x|y) || p(x)) = E log p(y|x) - log p(y), and
    # E log p(y|x) is nearly 0 for these well separated classes
    expected = -torch.log(label.class_probs()[y]).mean()
    assert float(out.kl.mean()) == pytest.approx(float(expected), rel=0.05)


def test_logistic_labels_multi_label_target():
    tb = make_testbed(dim=2, n_components=4, n_classes=2, seed=4, n_logistic_labels=2)
    lab = tb.logistic_labels
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([[0, 1]]).expand(3000, 2)
    x = lab.sample_target(tb.mixture, y, pool_size=50_000, generator=g)
    pool, _ = tb.mixture.sample(3000, g)
    # the resampled target has a higher likelihood of the requested labels than the prior
    assert lab.log_likelihood(x, y).exp().mean() > lab.log_likelihood(pool, y).exp().mean() + 0.1


def test_tilted_accuracy_matches_the_closed_form():
    """Two samples per class, classifier probabilities 0.8 / 0.2: at gamma = 1 each request picks its own class with
    weight 0.8 (accuracy 0.8, effective sample size 1 / (2 (0.4^2 + 0.1^2)) = 2.94); gamma = 0 is the data itself."""
    log_p = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]]).log()
    true = torch.tensor([0, 0, 1, 1])
    acc, ess = tilted_accuracy(log_p, true, 1.0)
    assert acc == pytest.approx(0.8) and ess == pytest.approx(1 / (2 * (0.4**2 + 0.1**2)))
    assert tilted_accuracy(log_p, true, 0.0) == pytest.approx((0.5, 4.0))
    assert tilted_accuracy(log_p, true, 8.0)[0] == pytest.approx(0.8**8 / (0.8**8 + 0.2**8))


def test_tilted_objective_is_the_log_normaliser():
    """J* = mean_y log mean_i p(y|x_i)^gamma: log((0.8^gamma + 0.2^gamma) / 2) for both classes of the table above.
    It bounds gamma E log p(y|x) - KL for every P(x|y); sampling p(x) itself (KL 0) must score no more."""
    log_p = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]]).log()
    for gamma in (1.0, 4.0):
        assert tilted_objective(log_p, gamma) == pytest.approx(math.log((0.8**gamma + 0.2**gamma) / 2))
        # sampling p(x) itself for every request: KL 0 and gamma E log p(y|x) = gamma (log 0.8 + log 0.2) / 2
        assert tilted_objective(log_p, gamma) >= gamma * (math.log(0.8) + math.log(0.2)) / 2
