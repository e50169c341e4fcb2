"""Baselines as score wrappers, checked against closed forms and for improvement over the pre-trained model."""

import torch
from torch.nn import functional as F

from ctrl_bio.guidance import (
    NoisyMLPClassifier,
    best_of_n,
    classifier_free_guidance,
    classifier_guidance,
    reconstruction_guidance,
    train_conditional_pathway,
    train_noisy_classifier,
)
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.reward import LogLikelihoodReward
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE
from domains.gmm.labels import exact_guidance


def gather(log_probs, y):
    return log_probs.gather(1, y[:, :1]).squeeze(1)


def test_classifier_guidance_with_the_exact_noisy_posterior_is_the_h_transform(small_testbed):
    tb = small_testbed
    label, sde = tb.component_label, tb.sde
    x, t = torch.randn(64, 2, dtype=torch.float64) * 3, torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    y = torch.randint(0, 2, (64, 1))
    mixture64 = type(tb.mixture)(tb.mixture.weights.double(), tb.mixture.means.double(), tb.mixture.variances.double())
    label.mixture = mixture64
    pre = type(tb.pretrained)(mixture64, sde)

    def noisy_ll(z, s, yy):  # the exact p(y | x_t), analytic on the testbed
        return gather(label.log_prob(z, sde, s), yy)

    s_cg, u_cg = classifier_guidance(pre, noisy_ll, y, 1.0)(x, t)
    s_exact, u_exact = exact_guidance(pre, label, sde, y[:, 0])(x, t)
    torch.testing.assert_close(s_cg, s_exact, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u_cg, u_exact, rtol=1e-9, atol=1e-9)


def test_dps_on_a_standard_normal_matches_the_closed_form():
    # Data N(0, I) under a VP-SDE stays N(0, I): s_pre = -x, x0_hat = alpha_t x, and for a linear softmax
    # classifier grad_x log p(y | alpha x) = alpha (W_y - sum_c p_c W_c).
    sde = VPSDE()
    w = torch.randn(3, 4, dtype=torch.float64)
    log_p = lambda z: F.log_softmax(z @ w.T, dim=1)  # noqa: E731
    x, t = torch.randn(16, 4, dtype=torch.float64), torch.full((16,), 0.3, dtype=torch.float64)
    y = torch.randint(0, 3, (16, 1))
    s, u = reconstruction_guidance(lambda z, s_: -z, sde, LogLikelihoodReward([log_p]), y, 2.0)(x, t)
    alpha = sde.alpha(t)[:, None]
    p = log_p(alpha * x).exp()
    expected = 2.0 * alpha * (w[y[:, 0]] - p @ w)
    torch.testing.assert_close(u, expected)
    torch.testing.assert_close(s, -x + expected)


def test_cfg_scales_the_control(small_testbed):
    tb = small_testbed
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=16), tb.sde)
    torch.nn.init.normal_(model.pathway.out.weight)
    x, t, y = torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05, torch.randint(0, 2, (8, 1))
    s1, u1 = classifier_free_guidance(model, y, 1.0)(x, t)
    s_cond, u_cond = model.conditioned(y)(x, t)
    assert torch.equal(s1, s_cond) and torch.equal(u1, u_cond)
    s3, u3 = classifier_free_guidance(model, y, 3.0)(x, t)
    torch.testing.assert_close(u3, 3 * u_cond)
    torch.testing.assert_close(s3, tb.pretrained(x, t) + 3 * u_cond)


def test_best_of_n_keeps_the_best_candidate(small_testbed):
    tb = small_testbed
    ll = LogLikelihoodReward([tb.component_label.log_prob])
    y = torch.randint(0, 2, (200, 1))
    times = time_grid(30)
    one = best_of_n(tb.sde, tb.pretrained, ll, y, (2,), times, 1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    plain = euler_maruyama(tb.sde, tb.pretrained, tb.sde.prior_sampling((200, 2), generator=g), times, generator=g).x
    # With n = 1 the draws are exactly the pre-trained sampler's, in the same order.
    torch.testing.assert_close(one, plain)
    eight = best_of_n(tb.sde, tb.pretrained, ll, y, (2,), times, 8, generator=torch.Generator().manual_seed(0))
    assert ll(eight, y).mean() > ll(one, y).mean() + 0.2


def test_trained_baselines_beat_the_pretrained_model(small_testbed):
    tb = small_testbed
    g = torch.Generator().manual_seed(0)
    x, comp = tb.mixture.sample(400, g)
    y = tb.component_label.classes[comp][:, None]
    requests = torch.randint(0, 2, (400, 1), generator=g)
    times = time_grid(40)

    def accuracy(score_fn):
        x0 = euler_maruyama(tb.sde, score_fn, tb.sde.prior_sampling((400, 2), generator=g), times, generator=g).x
        return (tb.component_label.bayes_label(x0) == requests[:, 0]).float().mean()

    with torch.no_grad():
        base = accuracy(tb.pretrained)
    net = NoisyMLPClassifier(2, 2, hidden=32, depth=2)
    train_noisy_classifier(net, tb.sde, x, y[:, 0], steps=300, batch_size=128, generator=g, progress=False)
    cg = accuracy(classifier_guidance(tb.pretrained, lambda z, s, yy: gather(net(z, s).log_softmax(1), yy),
                                      requests, 1.0))
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=32), tb.sde)
    record = train_conditional_pathway(model, tb.sde, x, y, steps=1000, batch_size=128, generator=g, progress=False)
    with torch.no_grad():
        cfg = accuracy(classifier_free_guidance(model, requests, 1.0))
    assert base < 0.65
    assert cg > base + 0.25 and cfg > base + 0.25
    assert record.losses[-1] < record.losses[0]
