"""The estimator interface and adjoint matching: the lean adjoint against a closed form, and the estimator's fit."""

import math

import pytest
import torch
from torch import nn

from ctrl_bio.estimators import (
    ESTIMATORS,
    AdjointMatching,
    Objective,
    Problem,
    RolloutControl,
    SoftValue,
    lean_adjoint,
)
from ctrl_bio.finetune import finetune, train
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward, NonDifferentiableRewardError
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE
from domains.gmm.labels import exact_guidance


class GaussianScore(nn.Module):
    """The exact score of N(m, S I) under the VP-SDE, no control: s = -(x - alpha_t m) / (alpha_t^2 S + sigma_t^2)."""

    def __init__(self, sde, m, s):
        super().__init__()
        self.sde, self.m, self.s = sde, m, s
        self.dummy = nn.Parameter(torch.zeros(1))

    def score_and_control(self, x, t, y):
        a, var = self.sde.alpha(t)[:, None], self.sde.alpha(t)[:, None] ** 2 * self.s + self.sde.sigma(t)[:, None] ** 2
        score = -(x - a * self.m) / var
        return score, torch.zeros_like(x)


def test_lean_adjoint_of_a_linear_reward_is_the_h_transform_control():
    """For p_pre = N(m, S I) and r(x0) = tilt c.x0, h_t(x) = E[exp(r) | x_t = x] gives grad log h_t = tilt alpha_t S c /
    (alpha_t^2 S + sigma_t^2) at every x, and the lean adjoint must equal minus that (Domingo-Enrich et al. 2025,
    the optimal control u* = -a)."""
    sde = VPSDE()
    m, s, c, tilt = torch.tensor([0.5, -1.0]), 2.0, torch.tensor([1.0, -0.5]), 3.0
    model = GaussianScore(sde, m, s)
    times = time_grid(2000, 1e-3)
    states = torch.randn(times.shape[0], 4, 2)  # the adjoint of a linear reward with a linear drift ignores x

    def reward(x0, y):
        return x0 @ c

    a = lean_adjoint(model, sde, reward, states, times, torch.zeros(4, 1, dtype=torch.long), tilt)
    for k in (0, 500, 1000, 1500, 2000):
        t = times[k:k + 1]
        alpha_t, sigma_t = sde.alpha(t), sde.sigma(t)
        control = tilt * alpha_t * s * c / (alpha_t**2 * s + sigma_t**2)
        torch.testing.assert_close(-a[k], control.expand(4, 2), rtol=2e-2, atol=1e-4)  # Euler error, first order in h


def test_objective_owns_the_tilt_and_refuses_a_non_positive_kl_weight():
    assert Objective(alpha=0.5, gamma=2.0).tilt == 4.0
    assert float(Objective(2.0, 3.0).value(torch.tensor([1.0]), torch.tensor([0.5]))) == 3.0 - 1.0
    with pytest.raises(ValueError, match="alpha"):
        Objective(alpha=0.0)


def test_every_estimator_name_is_accepted_by_finetune_and_unknown_ones_are_refused(small_testbed):
    tb = small_testbed
    label = tb.component_label
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=8, depth=1), tb.sde)
    prior = LabelPrior([label.class_probs()])
    for name in (*ESTIMATORS, "hybrid"):
        finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), estimator=name, steps=1,
                 sm_steps=1, value_steps=1, batch_size=4, sm_batch_size=4, pool_size=16, n_steps=4, eval_every=10,
                 eval_batch_size=4,
                 progress=False)
    with pytest.raises(ValueError, match="setting of the soft_value estimator"):
        finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), estimator="pathwise",
                 value_distill="none", progress=False)
    with pytest.raises(ValueError, match="adjoint_matching"):
        finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), estimator="adjoint", progress=False)


def _component_label_problem(tb, hidden: int, depth: int) -> Problem:
    """The mixture testbed's component label as a fine-tuning problem: a fresh zero-initialised vector pathway (seeded),
    the Bayes label's log-likelihood as the reward, J with alpha = gamma = 1, the 50-step sampler."""
    label = tb.component_label
    torch.manual_seed(1)
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=hidden, depth=depth), tb.sde)
    return Problem(model, tb.sde, LogLikelihoodReward([label.log_prob]), LabelPrior([label.class_probs()]), (2,),
                   Objective(), n_steps=50)


@pytest.mark.parametrize("estimator,near_exact", [
    (AdjointMatching(steps=150, batch_size=64, lr=1e-2), None),
    (SoftValue(steps=500, batch_size=256, lr=5e-3, value_steps=1000, pool_size=4000, progress=False), 0.3),
    (SoftValue(steps=500, batch_size=256, lr=5e-3, value_steps=1000, pool_size=4000, distill_on="guided",
               guided_paths=512, progress=False), 0.3),
    (RolloutControl(steps=500, batch_size=256, lr=5e-3, anchors=256, rollouts=16, progress=False), 0.3),
])
def test_estimator_moves_the_mixture_towards_exact_guidance(small_testbed, estimator, near_exact):
    """From a zero control, each estimator alone (no warm start) raises the Bayes-label accuracy above 0.9 and J by
    3 nats on the component-label mixture; the soft value function gets within ``near_exact`` nats of exact guidance
    (the true h-transform) in the same 50-step sampler. Adjoint matching does not: on this well-separated mixture the
    lean adjoint is heavy-tailed (the pre-trained score's Jacobian between modes amplifies it along a few paths), so
    its regression target is dominated by rare large values."""
    tb = small_testbed
    label = tb.component_label
    problem = _component_label_problem(tb, hidden=64, depth=2)
    model, prior = problem.model, problem.label_prior
    result = train(problem, [estimator], eval_every=10**6, eval_batch_size=256, progress=False)
    y = prior.sample(1000, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = euler_maruyama(tb.sde, model.conditioned(y), torch.randn(1000, 2, generator=g), time_grid(50),
                           generator=g)
        x_pre = euler_maruyama(tb.sde, tb.pretrained, torch.randn(1000, 2, generator=g), time_grid(50), generator=g).x
        exact = euler_maruyama(tb.sde, exact_guidance(tb.pretrained, label, tb.sde, y[:, 0]),
                               torch.randn(1000, 2, generator=g), time_grid(50), generator=g)
    acc = float((label.bayes_label(x.x) == y[:, 0]).float().mean())
    acc_pre = float((label.bayes_label(x_pre) == y[:, 0]).float().mean())
    j = float((label.log_prob(x.x).gather(1, y).squeeze(1) - x.kl).mean())
    j_pre = float(label.log_prob(x_pre).gather(1, y).mean())
    j_exact = float((label.log_prob(exact.x).gather(1, y).squeeze(1) - exact.kl).mean())
    assert acc > 0.9 and acc > acc_pre + 0.3, (acc, acc_pre)
    assert j > j_pre + 3.0, (j, j_pre)
    if near_exact is not None:
        assert j > j_exact - near_exact, (j, j_exact)
    assert result.history[-1]["objective"] > result.history[0]["objective"] + 3.0
    assert math.isfinite(result.history[-1]["kl"])


def test_an_undistilled_soft_value_samples_near_exact_guidance_and_trains_no_pathway(small_testbed):
    """distill_on="none" with steps=0: train() still prepares the phase (V is fitted), the pathway stays zero, and
    the sampler guided by s_pre + grad V gets within 0.3 nats of exact guidance's J; updates are refused."""
    from ctrl_bio.estimators.soft_value import value_guided_score

    tb = small_testbed
    label = tb.component_label
    problem = _component_label_problem(tb, hidden=8, depth=1)
    model, prior = problem.model, problem.label_prior
    estimator = SoftValue(steps=0, value_steps=1000, pool_size=4000, distill_on="none", progress=False)
    result = train(problem, [estimator], eval_every=10**6, eval_batch_size=256, progress=False)
    assert result.prepared["soft_value"]["value_seconds"] > 0
    assert not model.pathway.out.weight.detach().any() and not model.pathway.out.bias.detach().any()
    y = prior.sample(1000, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(5)
    guided = euler_maruyama(tb.sde, value_guided_score(tb.pretrained, estimator.value_net, (2,), y),
                            torch.randn(1000, 2, generator=g), time_grid(50), generator=g)
    exact = euler_maruyama(tb.sde, exact_guidance(tb.pretrained, label, tb.sde, y[:, 0]),
                           torch.randn(1000, 2, generator=g), time_grid(50), generator=g)
    j, j_exact = (float((label.log_prob(out.x).gather(1, y).squeeze(1) - out.kl).mean()) for out in (guided, exact))
    assert j > j_exact - 0.3, (j, j_exact)
    with pytest.raises(ValueError, match="steps must be 0"):
        train(problem, [SoftValue(steps=5, value_steps=1, pool_size=16, distill_on="none", progress=False)],
              progress=False)


def test_a_phase_stops_when_j_levels_off_and_says_so(small_testbed):
    """With a tolerance no update can beat, the phase stops two evaluations after its first (which sets the best);
    without patience it runs its whole budget. Either way ``stopped_by`` names the criterion and the update."""
    tb = small_testbed
    label = tb.component_label
    prior = LabelPrior([label.class_probs()])
    common = dict(estimator="pathwise", steps=40, batch_size=8, n_steps=5, eval_every=5, eval_batch_size=16,
                  progress=False)
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=8, depth=1), tb.sde)
    result = finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), patience=2, tolerance=1e6,
                      **common)
    assert result.stopped_by["pathwise"] == {"criterion": "converged", "update": 15}
    assert result.history[-1]["step"] == 15
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=8, depth=1), tb.sde)
    result = finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), **common)
    assert result.stopped_by["pathwise"] == {"criterion": "budget", "update": 40}


def test_keep_best_ends_on_the_evaluation_with_the_highest_j(small_testbed, tmp_path):
    """``keep_best`` restores the parameters of the best evaluation (saved to the checkpoint too) and names it;
    here a learning rate far too high makes later evaluations worse than an earlier one."""
    from safetensors.torch import load_file

    tb = small_testbed
    label = tb.component_label
    prior = LabelPrior([label.class_probs()])
    runs = {}
    for keep_best in (False, True):  # the same seeded run, ending on its last or its best evaluation
        model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=8, depth=1), tb.sde)
        result = finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), prior, (2,), estimator="pathwise",
                          steps=30, batch_size=8, lr=1.0, grad_clip=None, n_steps=5, eval_every=5,
                          eval_batch_size=64, keep_best=keep_best, checkpoint_path=tmp_path / "pathway.safetensors",
                          progress=False)
        runs[keep_best] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    best = max(result.history, key=lambda h: h["objective"])
    assert result.kept == best and best is not result.history[-1]
    assert any(not torch.equal(a, b) for a, b in zip(runs[False], runs[True]))
    saved = load_file(tmp_path / "pathway.safetensors")
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), saved[name])


def test_the_adjoint_clip_acts_per_path_and_step():
    from ctrl_bio.estimators.adjoint_matching import clip_norm

    a = torch.zeros(3, 2, 4)
    a[1, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5: clipped to 1
    a[2, 1] = torch.tensor([0.0, 0.6, 0.0, 0.0])  # norm 0.6: kept
    clipped = clip_norm(a, 1.0)
    torch.testing.assert_close(clipped[1, 0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    torch.testing.assert_close(clipped[2, 1], a[2, 1])
    assert torch.equal(clipped[0], a[0]) and torch.equal(clipped[1, 1], a[1, 1])


@pytest.mark.parametrize("estimator", ["pathwise", "adjoint_matching"])
def test_gradient_estimators_refuse_a_reward_without_gradient(estimator):
    """A reward computed on the decoded sample (here: argmax, like an exact label of a DNA sequence) has no gradient
    in x0: the estimators that follow it say so instead of training on the KL alone."""
    sde = VPSDE()
    pretrained = lambda x, t: -x  # noqa: E731  a standard normal's score
    decoded = lambda x: torch.nn.functional.one_hot(x.argmax(1), 2).float().clamp_min(1e-3).log()  # noqa: E731
    model = AugmentedScore(pretrained, VectorPathway(2, (2,), hidden=8, depth=1), sde)
    with pytest.raises(NonDifferentiableRewardError, match=f"estimator {estimator} follows the reward's gradient"):
        finetune(model, sde, LogLikelihoodReward([decoded]), LabelPrior([torch.ones(2)]), (2,), estimator=estimator,
                 steps=1, batch_size=4, n_steps=3, eval_every=10, eval_batch_size=4, progress=False)


def test_rollout_target_is_the_h_transform_control_on_exact_posterior_draws():
    """For p_pre = N(m, S I) and log w(x0) = c.x0, draws of the exact posterior p_pre(x0 | x_t) give Tweedie's
    difference of tilted and untilted posterior means, u* = alpha_t S c / (alpha_t^2 S + sigma_t^2) at every x_t
    (the closed form the lean adjoint test uses), up to Monte Carlo error."""
    from ctrl_bio.estimators.rollout_control import rollout_target
    from ctrl_bio.label_space import WeightedPool

    sde = VPSDE()
    m, s, c = torch.tensor([0.5, -1.0]), 2.0, torch.tensor([1.0, -0.5])
    g = torch.Generator().manual_seed(0)
    n_anchor, k = 3, 200_000
    t = torch.tensor([0.2, 0.5, 0.8])
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    x_t = torch.randn(n_anchor, 2, generator=g) * 2
    var = alpha**2 * s + sigma**2
    post_mean = m + (alpha * s / var)[:, None] * (x_t - alpha[:, None] * m)
    post_std = torch.sqrt(s * sigma**2 / var)
    x0 = post_mean[:, None] + post_std[:, None, None] * torch.randn(n_anchor, k, 2, generator=g)
    pool = WeightedPool(x0.reshape(-1, 2), [(x0.reshape(-1, 2) @ c)[:, None]], tilt=1.0)
    index = torch.arange(n_anchor * k).reshape(n_anchor, k)
    u = rollout_target(pool, torch.zeros(n_anchor, 1, dtype=torch.long), index, x0, alpha, sigma)
    expected = (alpha * s / var)[:, None] * c
    torch.testing.assert_close(u, expected, rtol=0.03, atol=0.03)


def test_uses_pool_names_the_estimators_that_read_one():
    from ctrl_bio.estimators import ESTIMATORS, uses_pool

    assert {name for name in ESTIMATORS if uses_pool(name)} == {"score_matching", "soft_value"}
    assert uses_pool("hybrid") and uses_pool("pathwise", warm_start=True) and uses_pool("rollout_control", True)
    assert not uses_pool("pathwise") and not uses_pool("adjoint_matching") and not uses_pool("rollout_control")


def test_finetune_refuses_a_pool_its_estimator_would_ignore(small_testbed):
    tb = small_testbed
    label = tb.component_label
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=8, depth=1), tb.sde)
    with pytest.raises(ValueError, match="takes no pool"):
        finetune(model, tb.sde, LogLikelihoodReward([label.log_prob]), LabelPrior([label.class_probs()]), (2,),
                 estimator="pathwise", steps=1, pool_x0=torch.zeros(4, 2), progress=False)


def test_denoised_reward_value_starts_as_the_reward_at_tweedies_estimate(small_testbed):
    """V_c(x_t, t) = a(t) log p(c | x0_hat) + b_c(t) with a = 1, b = 0 at initialisation; its only parameters are the
    calibration's (the frozen network and classifier stay out of SoftValue's regression); grad_x flows through both."""
    from ctrl_bio.estimators.soft_value import DenoisedRewardValue

    tb = small_testbed
    classifier = nn.Linear(2, 2)  # a stand-in reward classifier with parameters of its own
    log_prob = lambda x0: torch.log_softmax(classifier(x0), dim=1)  # noqa: E731
    combos = torch.tensor([[0], [1]])
    value = DenoisedRewardValue(tb.pretrained, tb.sde, [log_prob], combos)
    x_t, t = torch.randn(5, 2), torch.full((5,), 0.3)
    x0_hat = tb.sde.denoise(x_t, t, tb.pretrained(x_t, t))
    torch.testing.assert_close(value(x_t, t), log_prob(x0_hat))
    torch.testing.assert_close(value.scale(t), torch.ones(5))
    own = {id(p) for p in value.parameters()}
    frozen = [*classifier.parameters(), *getattr(tb.pretrained, "parameters", list)()]
    assert own and not own & {id(p) for p in frozen}
    x = x_t.clone().requires_grad_(True)
    grad = torch.autograd.grad(value(x, t)[:, 1].sum(), x)[0]
    assert grad.abs().sum() > 0
