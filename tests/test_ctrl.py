"""CTRL estimators: exact gradients in every memory mode, improvement over the pre-trained model, NaN safety."""

import pytest
import torch

from ctrl_bio.finetune import NonFiniteLossError, finetune
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.objective import (
    WeightedPool,
    control_fit,
    denoising_score_matching_loss,
    pathwise_loss,
    weighted_score_matching_loss,
)
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE


def make_model(tb, hidden=32):
    pathway = VectorPathway(tb.dim, (tb.component_label.n_classes,), hidden=hidden, depth=2)
    torch.nn.init.normal_(pathway.out.weight, std=0.05)  # away from zero so that every gradient path is active
    return AugmentedScore(tb.pretrained, pathway, tb.sde)


def pathway_grads(model, tb, memory, k=None):
    model.zero_grad()
    reward = LogLikelihoodReward([tb.component_label.log_prob])
    y = torch.randint(0, 2, (16, 1), generator=torch.Generator().manual_seed(0))
    est = pathwise_loss(model, tb.sde, reward, y, (tb.dim,), n_steps=12, memory=memory, grad_last_k=k or 4,
                        generator=torch.Generator().manual_seed(1))
    est.loss.backward()
    return [p.grad.clone() for p in model.pathway.parameters()], est


def test_checkpointed_gradient_equals_full_gradient(small_testbed):
    model = make_model(small_testbed)
    full, est_full = pathway_grads(model, small_testbed, "full")
    ckpt, est_ckpt = pathway_grads(model, small_testbed, "checkpoint")
    assert est_full.loss.item() == est_ckpt.loss.item()
    for a, b in zip(full, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_truncation_to_all_steps_is_full_and_to_fewer_steps_differs(small_testbed):
    model = make_model(small_testbed)
    full, _ = pathway_grads(model, small_testbed, "full")
    all_steps, _ = pathway_grads(model, small_testbed, "truncate", k=12)
    last_two, _ = pathway_grads(model, small_testbed, "truncate", k=2)
    for a, b in zip(full, all_steps):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(full, last_two))


def test_weighted_pool_draws_from_the_tilted_pool():
    x0 = torch.arange(4.0)[:, None]
    log_probs = torch.log(torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]))
    pool = WeightedPool(x0, [log_probs])
    draws = pool.draw(torch.zeros(40_000, 1, dtype=torch.long), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws[:, 0].long(), minlength=4).float() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.5, 0.9, 0.5]) / 2.0, atol=0.01, rtol=0)
    weights = torch.tensor([0.1, 0.5, 0.9, 0.5]) / 2.0
    assert pool.effective_sample_size(torch.tensor([0])) == pytest.approx(float(1 / (weights**2).sum()))


def test_pool_posterior_mean_is_the_score_of_the_noised_tilted_pool():
    """E[x0 | x_t, y] over the pool gives the exact score of sum_i w_i(y) N(x; a x0_i, s^2 I): (a E[x0|x] - x) / s^2."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 3, generator=g)
    pool = WeightedPool(x0, [torch.randn(7, 2, generator=g).log_softmax(1)], tilt=2.0)
    y = torch.tensor([[0], [1], [1], [0]])
    a, s = torch.tensor([0.9, 0.7, 0.3, 0.5]), torch.tensor([0.4, 0.7, 0.95, 0.1])
    x_t = torch.randn(4, 3, generator=g, requires_grad=True)
    w = torch.stack([pool.weights(row) for row in y]).float()  # (4, 7)
    log_density = torch.logsumexp(w.log() - ((x_t[:, None] - a[:, None, None] * x0) ** 2).sum(-1)
                                  / (2 * s[:, None] ** 2), dim=1)
    score = torch.autograd.grad(log_density.sum(), x_t)[0]
    mean = pool.posterior_mean(x_t.detach(), a, s, y)
    torch.testing.assert_close((a[:, None] * mean - x_t.detach()) / s[:, None] ** 2, score, atol=1e-4, rtol=1e-4)


class _PoolOptimum:
    """s_pre = the noised untilted pool's score, s_theta = the tilted pool's, both by autograd of their densities."""

    def __init__(self, pool: WeightedPool, sde: VPSDE):
        self.pool, self.sde = pool, sde

    def _score(self, x_t, t, w):
        a, s = self.sde.alpha(t), self.sde.sigma(t)
        x_t = x_t.detach().requires_grad_(True)
        log_density = torch.logsumexp(w.log() - ((x_t[:, None] - a[:, None, None] * self.pool.x0) ** 2).sum(-1)
                                      / (2 * s[:, None] ** 2), dim=1)
        return torch.autograd.grad(log_density.sum(), x_t)[0]

    def score_and_control(self, x_t, t, y):
        with torch.enable_grad():
            w = torch.stack([self.pool.weights(row) for row in y]).float()
            s_pre = self._score(x_t, t, torch.full_like(w, 1.0 / w.shape[1]))
            s = self._score(x_t, t, w)
        return s, s - s_pre


def test_control_fit_is_zero_at_the_optimum_and_the_signal_without_control():
    """The pool's own optimum (autograd of the tilted and untilted noised pools) has error ~0 and its s_pre is the
    pool's score; a zero control has error = signal, i.e. explains nothing."""
    g = torch.Generator().manual_seed(0)
    pool = WeightedPool(torch.randn(9, 3, generator=g), [torch.randn(9, 2, generator=g).log_softmax(1)], tilt=2.0)
    sde, y, t = VPSDE(), torch.tensor([[0], [1], [1], [0], [1]]), torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
    optimum = _PoolOptimum(pool, sde)
    signal, error, base = control_fit(optimum, sde, pool, y, t, torch.Generator().manual_seed(1))
    assert (signal > 0).all() and (error < 1e-6 * signal + 1e-8).all() and (base < 1e-8).all()

    class NoControl(_PoolOptimum):
        def score_and_control(self, x_t, t, y):
            s, u = super().score_and_control(x_t, t, y)
            return s - u, torch.zeros_like(u)

    signal0, error0, _ = control_fit(NoControl(pool, sde), sde, pool, y, t, torch.Generator().manual_seed(1))
    torch.testing.assert_close(error0, signal0)
    torch.testing.assert_close(signal0, signal)


def test_control_target_is_zero_at_the_pool_optimum_whatever_the_pre_trained_score():
    """The control target compares u_theta with the pool's u* only: 0 for the pool's autograd optimum, even when
    its s_pre is off the pool's score by a label-free field (which the denoising target would ask u to absorb),
    and the signal for a zero control."""
    g = torch.Generator().manual_seed(0)
    pool = WeightedPool(torch.randn(9, 3, generator=g), [torch.randn(9, 2, generator=g).log_softmax(1)], tilt=2.0)
    sde, y = VPSDE(), torch.tensor([[0], [1], [1], [0], [1]] * 40)

    class OffsetPreTrained(_PoolOptimum):  # s_pre and s_theta both shifted by the same label-free field
        def score_and_control(self, x_t, t, y):
            s, u = super().score_and_control(x_t, t, y)
            return s + 3.0 * torch.sin(x_t), u

    class ScaledControl(_PoolOptimum):  # u = c u*: the loss is (1 - c)^2 E sigma^2 ||u*||^2
        def __init__(self, pool, sde, c):
            super().__init__(pool, sde)
            self.c = c

        def score_and_control(self, x_t, t, y):
            s, u = super().score_and_control(x_t, t, y)
            return s - (1 - self.c) * u, self.c * u

    def loss(model):
        return float(weighted_score_matching_loss(model, sde, pool, y, target="control",
                                                  generator=torch.Generator().manual_seed(1)))

    assert loss(_PoolOptimum(pool, sde)) < 1e-8 and loss(OffsetPreTrained(pool, sde)) < 1e-8
    signal = loss(ScaledControl(pool, sde, 0.0))
    assert signal > 1e-3
    assert loss(ScaledControl(pool, sde, 0.5)) == pytest.approx(signal / 4, rel=1e-4)
    assert loss(ScaledControl(pool, sde, 2.0)) == pytest.approx(signal, rel=1e-4)


def test_posterior_target_keeps_the_gradient_and_lowers_its_variance(small_testbed):
    """Rao-Blackwell: with the same draws (x0, t, eps), the posterior target's per-sample gradient has the denoising
    one's mean (same minimiser) and a smaller variance."""
    tb = small_testbed
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(300, tb.dim, generator=g) + 2.0 * torch.sign(torch.randn(300, 1, generator=g))
    pool = WeightedPool(x0, [torch.stack([-x0[:, 0], x0[:, 0]], 1).log_softmax(1)])
    theta = torch.zeros((), requires_grad=True)

    def model(x, t, y):  # a one-parameter score: -x (the standard normal's) scaled by 1 + theta
        return -(1 + theta) * x

    grads = {}
    for target in ("denoising", "posterior"):
        samples = []
        for i in range(800):
            y = torch.tensor([[i % 2]])
            loss = weighted_score_matching_loss(model, tb.sde, pool, y, target=target,
                                                generator=torch.Generator().manual_seed(i))
            samples.append(torch.autograd.grad(loss, theta)[0])
        grads[target] = torch.stack(samples)
    diff = grads["denoising"] - grads["posterior"]
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / 800**0.5  # same expectation
    assert float(grads["posterior"].var()) < 0.7 * float(grads["denoising"].var())


@pytest.mark.parametrize("spacing,mean_t", [("uniform", 0.5), ("quadratic", 1.0 / 3.0)])
def test_score_matching_draws_t_with_the_density_of_its_spacing(small_testbed, spacing, mean_t):
    """t = t_end + (1 - t_end) u (uniform) or u^2 (quadratic, the sampler grid's density): E[u] = 1/2, E[u^2] = 1/3;
    the quadratic draws put half of their mass below t = 1/4."""
    seen = []

    def model(x, t, y):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.zeros(50_000, small_testbed.dim)
    loss = denoising_score_matching_loss(model, small_testbed.sde, x0, torch.zeros(50_000, 1, dtype=torch.long),
                                         t_end=0.0, spacing=spacing, generator=torch.Generator().manual_seed(0))
    t = seen[0]
    assert float(t.mean()) == pytest.approx(mean_t, abs=0.01)
    if spacing == "quadratic":
        assert float((t < 0.25).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float(loss) == pytest.approx(small_testbed.dim, rel=0.02)  # zero score: the loss is E||eps||^2 = d


def evaluate(tb, score_fn, y, n_steps=50):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = euler_maruyama(tb.sde, score_fn, torch.randn(y.shape[0], tb.dim, generator=g), time_grid(n_steps),
                             generator=g)
    label = tb.component_label
    acc = float((label.bayes_label(out.x) == y[:, 0]).float().mean())
    objective = float((label.log_prob(out.x).gather(1, y).squeeze(1) - out.kl).mean())
    return acc, objective


@pytest.mark.parametrize("estimator,kwargs", [
    ("score_matching", {"sm_steps": 1000, "sm_lr": 5e-3, "sm_batch_size": 256, "pool_size": 4000,
                        "control_fit_times": (0.1, 0.4, 0.8)}),
    ("score_matching", {"sm_steps": 500, "sm_lr": 1e-2, "sm_batch_size": 128, "pool_size": 2000,
                        "sm_target": "posterior"}),
    ("score_matching", {"sm_steps": 500, "sm_lr": 1e-2, "sm_batch_size": 128, "pool_size": 2000,
                        "sm_target": "control"}),
    ("pathwise", {"steps": 60, "batch_size": 64, "lr": 1e-2, "n_steps": 25}),
])
def test_ctrl_improves_accuracy_and_objective_over_pretrained(small_testbed, estimator, kwargs):
    tb = small_testbed
    label = tb.component_label
    prior = LabelPrior([label.class_probs()])
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=64, depth=2), tb.sde)
    kwargs = {"n_steps": 50} | kwargs
    result = finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), estimator=estimator,
                      eval_every=10**6, eval_batch_size=256, progress=False, **kwargs)
    y = prior.sample(1000, torch.Generator().manual_seed(2))
    acc_pre, j_pre = evaluate(tb, tb.pretrained, y)
    acc, j = evaluate(tb, model.conditioned(y), y)
    assert acc > acc_pre + 0.3 and acc > 0.9
    assert j > j_pre + 3.0
    assert result.history[-1]["objective"] > result.history[0]["objective"]
    if result.control_fit:  # the trained control has found most of the optimum's, weighted by where it is large
        signal, error = (sum(r[k] for r in result.control_fit) for k in ("signal", "error"))
        assert 1.0 - error / signal > 0.8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small_testbed, tmp_path):
    tb = small_testbed
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=16, depth=1), tb.sde)
    calls = {"n": 0}

    def reward(x0, y):
        calls["n"] += 1
        return -x0.pow(2).sum(1) * (float("nan") if calls["n"] > 3 else 1.0)  # NaN, still a function of x0

    reward.log_prob_fns = []
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(NonFiniteLossError, match="nan"):
        finetune(model, tb.sde, reward, LabelPrior([torch.tensor([0.5, 0.5])]), (2,), estimator="pathwise",
                 steps=10, batch_size=8, n_steps=5, eval_every=1, eval_batch_size=8, checkpoint_path=path,
                 progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(saved[name], p.detach())
            assert torch.isfinite(p).all()


def test_two_labels_from_separate_classifiers_reach_the_product_target(small_testbed):
    """Two logistic labels, each with its own calibrated classifier trained on its own pairs, combined by
    conditional independence: the fine-tuned model raises the true E[p(y1, y2 | x)] to that of exact samples."""
    from ctrl_bio.reward import mlp_classifier, train_classifier

    tb = small_testbed
    lab = tb.logistic_labels
    g = torch.Generator().manual_seed(4)
    classifiers, labels = [], []
    for k in range(2):  # separate pair sets: each label is observed on its own draws of x
        x_pairs, _ = tb.mixture.sample(1500, g)
        y_pairs = lab.sample_labels(x_pairs, g)[:, k]
        clf, _ = train_classifier(mlp_classifier(2, 2, hidden=32), x_pairs, y_pairs, epochs=40, generator=g)
        classifiers.append(clf)
        labels.append(y_pairs)
    prior = LabelPrior.from_labels(labels, (2, 2))
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2, 2), hidden=64, depth=2), tb.sde)
    finetune(model, tb.sde, LogLikelihoodReward(classifiers), prior, (2,), sm_steps=1000, sm_lr=5e-3,
             sm_batch_size=256, pool_size=4000, n_steps=50, eval_every=10**6, eval_batch_size=128, progress=False)
    y = prior.sample(1500, torch.Generator().manual_seed(6))
    with torch.no_grad():
        x = euler_maruyama(tb.sde, model.conditioned(y), torch.randn(1500, 2, generator=g), time_grid(50),
                           generator=g).x
        x_pre = euler_maruyama(tb.sde, tb.pretrained, torch.randn(1500, 2, generator=g), time_grid(50),
                               generator=g).x
    exact = lab.sample_target(tb.mixture, y, pool_size=50_000, generator=g)
    likelihood = {name: float(lab.log_likelihood(s, y).exp().mean()) for name, s in
                  [("ctrl", x), ("pretrained", x_pre), ("exact", exact)]}
    halfway = likelihood["pretrained"] + 0.5 * (likelihood["exact"] - likelihood["pretrained"])
    assert likelihood["ctrl"] > halfway, likelihood
    assert likelihood["ctrl"] > likelihood["exact"] - 0.05, likelihood
