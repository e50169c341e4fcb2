"""Continuous labels against closed forms: a Gaussian pre-trained model and a linear-Gaussian label.

Pre-trained model: the exact score of x ~ N(m, C) in 2-D under the VP-SDE (marginal N(a_t m, a_t^2 C + s_t^2 I)).
Label: y = w.x + N(0, s_y^2). Then p(x | y) = N(m + k (y - w.m), C - k w^T C) with k = C w / (w^T C w + s_y^2)
(Bayes for linear-Gaussian), so the conditional mean is linear in y with slope k.
"""

import pytest
import torch
from torch import nn

from ctrl_bio.continuous import (
    ContinuousAugmentedScore,
    ContinuousLabelEmbedding,
    ContinuousPathwayScore,
    ContinuousPrior,
    ContinuousVectorPathway,
    ContinuousWeightedPool,
    GaussianReward,
    finetune_continuous,
    fit_regressor,
)
from ctrl_bio.finetune import finetune
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE

M = torch.tensor([0.5, -0.5])
C = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
W = torch.tensor([1.0, -0.5])
S_Y = 0.5
Y_MEAN = float(W @ M)  # 0.75
Y_VAR = float(W @ C @ W) + S_Y**2  # 0.85
GAIN = C @ W / Y_VAR  # d E[x | y] / dy = (0.824, 0.235)


def posterior_mean(y: float) -> torch.Tensor:
    return M + GAIN * (y - Y_MEAN)


class GaussianScore(nn.Module):
    """grad_x log N(x; a_t m, a_t^2 C + s_t^2 I): the exact pre-trained score."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def cov_t(self, t):
        a, s = self.sde.alpha(t)[:, None, None], self.sde.sigma(t)[:, None, None]
        return a**2 * C + s**2 * torch.eye(2)

    def forward(self, x, t):
        a = self.sde.alpha(t)[:, None]
        return -torch.linalg.solve(self.cov_t(t), x - a * M)


def exact_guidance(pre: GaussianScore, y: torch.Tensor):
    """s_pre + grad_x log p(y | x_t): the Doob h-transform in closed form (the limit no method beats)."""

    def score(x, t):
        a = pre.sde.alpha(t)[:, None]
        cov = pre.cov_t(t)
        gain = a * torch.linalg.solve(cov, (C @ W).expand(x.shape[0], 2)[:, :, None])[..., 0]  # a Sigma_t^-1 C w
        mu0 = M + a * (C @ torch.linalg.solve(cov, (x - a * M)[:, :, None]))[..., 0]  # E[x_0 | x_t]
        v = (W @ C @ W) - (gain * (a * (C @ W))).sum(1)  # w^T (C - a^2 C Sigma_t^-1 C) w
        u = gain * ((y[:, 0] - mu0 @ W) / (v + S_Y**2))[:, None]
        return pre(x, t) + u

    return score


def exact_reward():
    return GaussianReward(lambda x: x @ W, S_Y)


@pytest.fixture
def testbed():
    sde = VPSDE()
    return sde, GaussianScore(sde)


def sample(sde, score_fn, n, seed, n_steps=50):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return euler_maruyama(sde, score_fn, torch.randn(n, 2, generator=g), time_grid(n_steps), generator=g,
                              keep_trajectory=False).x


def prior_of_y(n=4000, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = M + torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(C).T
    return x, x @ W + S_Y * torch.randn(n, generator=g)


# ---------------------------------------------------------------------------------------------- zero init


def test_embedding_is_zero_at_init_and_nan_contributes_exactly_zero():
    emb = ContinuousLabelEmbedding(8, n_labels=2, hidden=16, loc=[1.0, -2.0], scale=[2.0, 0.5])
    y = torch.tensor([[0.3, float("nan")], [float("nan"), float("nan")], [5.0, -1.0]])
    assert torch.equal(emb(y), torch.zeros(3, 8))
    for mlp in emb.mlps:
        nn.init.normal_(mlp[-1].weight)
    out = emb(y)
    assert torch.equal(out[1], torch.zeros(8))
    only_first = emb(torch.tensor([[0.3, float("nan")]]))
    torch.testing.assert_close(out[0], only_first[0])
    out.sum().backward()  # no NaN reaches a gradient
    assert all(torch.isfinite(p.grad).all() for p in emb.parameters() if p.grad is not None)


def test_time_embedding_network_step_zero_reproduces_pretrained_bit_for_bit():
    from ctrl_bio.nets import ConvScoreNet

    sde = VPSDE()
    net = ConvScoreNet(sde, hidden=8, n_blocks=2, emb_dim=16, n_fourier=8, groups=4)
    model = ContinuousAugmentedScore(net, emb_dim=16, hidden=16, loc=5.0, scale=2.0)
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([[4.0], [7.5], [float("nan")]])
    x_init, noise = torch.randn(3, 4, 10, generator=g), torch.randn(6, 3, 4, 10, generator=g)
    with torch.no_grad():
        a = euler_maruyama(sde, model.conditioned(y), x_init, time_grid(6), noise=noise)
        b = euler_maruyama(sde, net, x_init, time_grid(6), noise=noise)
    assert torch.equal(a.x, b.x) and torch.equal(a.kl, torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        model.conditioned(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="float"):
        model.conditioned(torch.zeros(3, 1, dtype=torch.long))


def test_vector_pathway_step_zero_is_the_exact_score_and_nan_rows_get_no_control(testbed):
    sde, pre = testbed
    model = ContinuousPathwayScore(pre, ContinuousVectorPathway(2, hidden=16, depth=2), sde)
    x, t = torch.randn(4, 2), torch.rand(4) * 0.9 + 0.05
    y = torch.tensor([[0.0], [1.0], [float("nan")], [-3.0]])
    s, u = model.score_and_control(x, t, y)
    assert torch.equal(s, pre(x, t)) and torch.equal(u, torch.zeros(4, 2))
    nn.init.normal_(model.pathway.out.weight)
    s, u = model.score_and_control(x, t, y)
    assert torch.equal(u[2], torch.zeros(2)) and (u[[0, 1, 3]].abs() > 0).all()


# ------------------------------------------------------------------------------------------- reward, prior


def test_gaussian_reward_is_the_normal_log_density_summed_over_labels():
    from scipy.stats import norm

    preds = torch.randn(5, 2)
    sigma = torch.tensor([0.3, 1.7])
    reward = GaussianReward(lambda x: x, sigma)
    y = torch.randn(5, 2)
    expected = torch.distributions.Normal(preds, sigma).log_prob(y).sum(1)
    torch.testing.assert_close(reward(preds, y), expected)
    torch.testing.assert_close(reward(preds, y), torch.tensor(norm.logpdf(y, preds, sigma).sum(1), dtype=torch.float32))
    y_nan = y.clone()
    y_nan[:, 1] = float("nan")
    torch.testing.assert_close(reward(preds, y_nan), torch.distributions.Normal(preds[:, 0], 0.3).log_prob(y[:, 0]))
    # two regressors from separate pair sets: conditionally independent, log-likelihoods add
    separate = GaussianReward([lambda x: x[:, 0], lambda x: x[:, 1]], sigma)
    torch.testing.assert_close(separate(preds, y), expected)


def test_fit_regressor_recovers_the_linear_map_and_the_noise_level():
    x, y = prior_of_y(4000)
    y[:7] = float("nan")
    torch.manual_seed(0)
    regressor, report = fit_regressor(nn.Linear(2, 1), x, y, epochs=30, batch_size=128, lr=3e-2,
                                      weight_decay=0.0, seed=1)
    w_hat = (regressor.scale * regressor.net.weight)[0]  # f(x) = loc + scale * net(x)
    assert report.skipped == 7 and report.calib_size == 799 and report.train_size == 3194
    assert torch.allclose(w_hat, W, atol=0.05), w_hat
    assert report.sigma[0] == pytest.approx(S_Y, rel=0.06) and report.rmse == report.sigma
    assert report.mae[0] == pytest.approx(S_Y * (2 / torch.pi) ** 0.5, rel=0.08)
    assert report.nll == pytest.approx(0.5 * (1 + torch.log(torch.tensor(2 * torch.pi * S_Y**2)).item()), abs=0.07)
    reward = GaussianReward(regressor)
    assert reward.sigma.tolist() == pytest.approx([report.sigma[0]])


def test_continuous_prior_resamples_observed_values():
    values = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    prior = ContinuousPrior(values)
    y = prior.sample(3000, torch.Generator().manual_seed(0))
    assert y.shape == (3000, 1) and y.dtype == torch.float32
    assert set(y[:, 0].tolist()) == {1.0, 2.0, 4.0}
    assert prior.loc.tolist() == pytest.approx([7 / 3])
    two = ContinuousPrior.product([torch.tensor([0.0, 1.0]), torch.tensor([10.0, 20.0, 30.0])])
    y2 = two.sample(6000, torch.Generator().manual_seed(1))
    assert two.n_labels == 2 and set(y2[:, 1].tolist()) == {10.0, 20.0, 30.0}
    assert abs(torch.corrcoef(y2.T)[0, 1]) < 0.05


def test_weighted_pool_weights_are_the_tilted_gaussian_likelihood():
    x0 = torch.arange(5.0)[:, None].repeat(1, 2)
    pool = ContinuousWeightedPool(x0, GaussianReward(lambda x: x[:, 0], 1.0), tilt=2.0)
    y = torch.tensor([[1.5]])
    w = torch.softmax(-(1.5 - torch.arange(5.0)) ** 2, 0)  # N(y; x, 1)^2
    torch.testing.assert_close(pool.log_weights(y).exp()[0].float(), w)
    assert pool.effective_sample_size(y)[0].item() == pytest.approx(float(1 / (w**2).sum()), rel=1e-5)
    draws = pool.draw(y.expand(20000, 1), torch.Generator().manual_seed(0))[:, 0]
    torch.testing.assert_close(torch.bincount(draws.long(), minlength=5).float() / 20000, w, atol=0.01, rtol=0)


# ------------------------------------------------------------------------------------ closed-form CTRL


REQUESTS = (Y_MEAN - 1.5, Y_MEAN + 1.5)


def mean_errors(sde, score_for, n=2000):
    """|sample mean - closed-form posterior mean| for each requested y."""
    errors = []
    for j, yv in enumerate(REQUESTS):
        y = torch.full((n, 1), yv)
        errors.append(float((sample(sde, score_for(y), n, seed=20 + j).mean(0) - posterior_mean(yv)).norm()))
    return errors


def slope(sde, score_for, n=600):
    ys = torch.linspace(Y_MEAN - 1.5, Y_MEAN + 1.5, 5)
    means = torch.stack([sample(sde, score_for(torch.full((n, 1), float(v))), n, seed=30 + j).mean(0)
                         for j, v in enumerate(ys)])
    yc = ys - ys.mean()
    return (yc[:, None] * (means - means.mean(0))).sum(0) / (yc**2).sum()


def make_model(sde, pre, prior):
    torch.manual_seed(0)
    pathway = ContinuousVectorPathway(2, hidden=64, depth=2, loc=prior.loc, scale=prior.scale)
    return ContinuousPathwayScore(pre, pathway, sde)


def prior_and_model(testbed):
    """The empirical prior of the pairs' y and a fresh zero-initialised model standardised by it."""
    sde, pre = testbed
    prior = ContinuousPrior(prior_of_y()[1])
    return prior, make_model(sde, pre, prior)


def test_exact_guidance_hits_the_closed_form_posterior(testbed):
    """The testbed itself: the closed-form h-transform in the same sampler lands on the Bayes posterior mean."""
    sde, pre = testbed
    errors = mean_errors(sde, lambda y: exact_guidance(pre, y))
    pre_errors = mean_errors(sde, lambda y: pre)
    assert max(errors) < 0.08, errors
    assert min(pre_errors) > 1.2, pre_errors
    torch.testing.assert_close(slope(sde, lambda y: exact_guidance(pre, y)), GAIN, atol=0.08, rtol=0)


def test_score_matching_warm_start_reaches_the_posterior(testbed):
    sde, pre = testbed
    _, y_pairs = prior_of_y()
    prior = ContinuousPrior(y_pairs)
    model = make_model(sde, pre, prior)
    result = finetune_continuous(model, sde, exact_reward(), prior, (2,), estimator="score_matching", sm_steps=600,
                                 sm_batch_size=256, sm_lr=5e-3, pool_size=4000, n_steps=50, eval_every=300,
                                 eval_batch_size=256, progress=False)
    errors = mean_errors(sde, model.conditioned)
    pre_errors = mean_errors(sde, lambda y: pre)
    k = slope(sde, model.conditioned)
    print(f"sm: errors {errors} pre {pre_errors} slope {k.tolist()} closed form {GAIN.tolist()} ess {result.ess}")
    assert all(e < p / 3 for e, p in zip(errors, pre_errors)), (errors, pre_errors)
    torch.testing.assert_close(k, GAIN, atol=0.12, rtol=0)
    assert 100 < result.ess["min"] <= result.ess["median"] <= 4000 and result.pool_ess == result.ess["min"]
    assert result.history[-1]["objective"] > result.history[0]["objective"]


def test_unchanged_finetune_pathwise_runs_with_continuous_pieces(testbed):
    sde, pre = testbed
    _, y_pairs = prior_of_y()
    prior = ContinuousPrior(y_pairs)
    model = make_model(sde, pre, prior)
    result = finetune(model, sde, exact_reward(), prior, (2,), estimator="pathwise", steps=150, batch_size=64,
                      lr=1e-2, n_steps=25, eval_every=75, eval_batch_size=256, progress=False)
    errors = mean_errors(sde, model.conditioned)
    pre_errors = mean_errors(sde, lambda y: pre)
    k = slope(sde, model.conditioned)
    print(f"pathwise: errors {errors} pre {pre_errors} slope {k.tolist()} history {result.history}")
    assert all(e < p / 3 for e, p in zip(errors, pre_errors)), (errors, pre_errors)
    torch.testing.assert_close(k, GAIN, atol=0.15, rtol=0)
    # J* = E_y log p(y) = -1/2 log(2 pi e Var y) at alpha = gamma = 1
    j_star = -0.5 * torch.log(torch.tensor(2 * torch.pi * torch.e * Y_VAR)).item()
    assert result.history[0]["objective"] < result.history[-1]["objective"] < j_star + 0.1


def test_hybrid_with_a_time_embedding_network_smoke():
    from ctrl_bio.nets import ConvScoreNet

    sde = VPSDE()
    net = ConvScoreNet(sde, hidden=8, n_blocks=2, emb_dim=16, n_fourier=8, groups=4)
    prior = ContinuousPrior(torch.linspace(0.0, 1.0, 50))
    model = ContinuousAugmentedScore(net, emb_dim=16, hidden=16, loc=prior.loc, scale=prior.scale)
    reward = GaussianReward(lambda x: x.mean(dim=(1, 2)), 0.2)
    result = finetune_continuous(model, sde, reward, prior, (4, 8), estimator="hybrid", steps=2, batch_size=4,
                                 sm_steps=3, sm_batch_size=8, pool_size=16, n_steps=4, eval_every=2,
                                 eval_batch_size=8, progress=False)
    assert [r["phase"] for r in result.history] == ["init", "score_matching", "score_matching", "pathwise"]
    assert [r["step"] for r in result.history] == [0, 2, 3, 5]
    assert any(p.abs().sum() > 0 for m in model.embedding.mlps for p in m[-1].parameters())


def test_shared_finetune_runs_the_continuous_score_matching_phase_bit_for_bit(testbed):
    """One loop: finetune's score matching takes the continuous pool from the model's label space, and gives exactly
    the parameters and J of finetune_continuous's warm start (same seed, same draws)."""
    sde, pre = testbed
    prior = ContinuousPrior(prior_of_y()[1])
    kw = dict(sm_steps=30, sm_batch_size=64, pool_size=300, n_steps=10, eval_every=15, eval_batch_size=64,
              progress=False, seed=5)
    a, b = make_model(sde, pre, prior), make_model(sde, pre, prior)
    shared = finetune(a, sde, exact_reward(), prior, (2,), estimator="score_matching", **kw)
    own = finetune_continuous(b, sde, exact_reward(), prior, (2,), estimator="score_matching", **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [r["objective"] for r in shared.history] == [r["objective"] for r in own.history]
    assert shared.pool_ess == own.ess["min"] and len(shared.history) == 3


def test_continuous_pool_posterior_mean_weighs_each_item_by_its_tilted_likelihood_and_its_noise_density():
    """E[x_0 | x_t, y] over the pool: weights N(y; f(x0_i), s^2)^tilt N(x_t; a x0_i, s_t^2 I), one vector per row."""
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(7, 2, generator=g), torch.randn(3, 2, generator=g)
    alpha_t, sigma_t = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.4, 0.8, 0.95])
    y = torch.tensor([[0.3], [float("nan")], [-1.0]])
    pool = ContinuousWeightedPool(x0, GaussianReward(lambda x: x[:, 0], 0.8), tilt=1.5)
    label = torch.distributions.Normal(x0[:, 0], 0.8)
    expected = []
    for b in range(3):
        noise = torch.distributions.Normal(alpha_t[b] * x0, sigma_t[b]).log_prob(x_t[b]).sum(1)
        tilt = 0.0 if torch.isnan(y[b, 0]) else 1.5 * label.log_prob(y[b, 0])
        expected.append(torch.softmax(tilt + noise, 0) @ x0)
    torch.testing.assert_close(pool.posterior_mean(x_t, alpha_t, sigma_t, y), torch.stack(expected))
    flat = pool.untilted()
    assert flat.tilt == 0.0 and pool.tilt == 1.5
    uniform = torch.softmax(torch.distributions.Normal(alpha_t[0] * x0, sigma_t[0]).log_prob(x_t[0]).sum(1), 0) @ x0
    torch.testing.assert_close(flat.posterior_mean(x_t, alpha_t, sigma_t, y)[0], uniform)


def test_the_control_target_runs_on_a_continuous_pool(testbed):
    sde, _ = testbed
    prior, model = prior_and_model(testbed)
    result = finetune_continuous(model, sde, exact_reward(), prior, (2,), sm_target="control", sm_steps=20,
                                 sm_batch_size=32, pool_size=200, n_steps=10, eval_every=10, eval_batch_size=32,
                                 progress=False)
    assert [r["step"] for r in result.history] == [0, 10, 20]
    assert all(torch.isfinite(torch.tensor(r["objective"])) for r in result.history)
    assert any(p.abs().sum() > 0 for p in model.pathway.out.parameters())
