"""The CTRL objective and its estimators.

For labels y drawn from a prior p(y), CTRL (Zhao et al. 2024, eq. 6; DESIGN.md) maximises

    J(theta) = E_y E_{x ~ P_theta(.|y)} [ gamma * log p(y | x_0) ] - alpha * KL(P_theta(.|y) || P_pre),

whose maximiser for alpha = gamma = 1 is the Doob h-transform s* = s_pre + grad log h_t(x, y),
h_t(x, y) = E_pre[p(y | x_0) | x_t = x], i.e. P*(x_0 | y) = p_pre(x_0) p(y | x_0) / p(y) and J* = E_y log p(y).

Two estimators of the same optimum live here:
- :func:`pathwise_loss`: -J by reparameterised Euler-Maruyama, differentiated through the whole chain
  (full, with activation checkpointing, or through the last K steps as in DRaFT-K). On-policy: it only
  sees where the current model goes, so a mode it stops visiting gets no gradient back.
- :func:`weighted_score_matching_loss`: the optimum as a score-matching regression. Since
  P*(x_0|y) is proportional to p_pre(x_0) p(y|x_0)^(gamma/alpha), its score at every t is what denoising
  score matching (Vincent 2011) learns from samples of the pre-trained model importance-resampled with
  weights p(y|x_0)^(gamma/alpha) (reward-weighted regression, Peters & Schaal 2007, applied to the soft-optimal
  policy of KL-regularised RL). Off-policy: the behaviour samples come from the pre-trained model, which
  covers every mode, so no mode can be lost on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ctrl_bio.label_space import WeightedPool  # re-exported: the categorical pool lived here
from ctrl_bio.model import AugmentedScore, ConditionalScore
from ctrl_bio.reward import Reward, check_differentiable
from ctrl_bio.sampling import Spacing, euler_maruyama, time_grid
from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims, rand, randn, sum_except_batch

MemoryMode = Literal["full", "checkpoint", "truncate"]
#: The regression target of weighted score matching: the drawn noise (``denoising``), its expectation given x_t
#: under the tilted pool (``posterior``, Rao-Blackwellised: same minimiser, less variance), or the pool's optimal
#: control itself (``control``: the tilted minus the untilted pool score, free of the pool-versus-s_pre gap).
ScoreTarget = Literal["denoising", "posterior", "control"]


@dataclass(frozen=True)
class Objective:
    """CTRL's objective J = gamma E[log p(y|x0)] - alpha KL: the one place that owns alpha, gamma and their ratio.

    Attributes:
        alpha: weight of the path KL to the pre-trained model (> 0).
        gamma: weight of the reward; gamma / alpha > 1 sharpens like a guidance scale.
    """

    alpha: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha (the KL weight) must be positive, got {self.alpha}")

    @classmethod
    def of(cls, method: Mapping[str, Any]) -> Objective:
        """alpha and gamma of a run's ``method`` settings (:class:`ctrl_bio.settings.CTRLSettings`), defaults these."""
        return cls(alpha=float(method.get("alpha", cls.alpha)), gamma=float(method.get("gamma", cls.gamma)))

    @property
    def tilt(self) -> float:
        """gamma / alpha: the exponent of p(y | x0) in the optimum p_pre(x0) p(y | x0)^(gamma/alpha)."""
        return self.gamma / self.alpha

    def value(self, log_likelihood: Tensor, kl: Tensor) -> Tensor:
        """J per sample, gamma log p(y | x0) - alpha KL, (B,)."""
        return self.gamma * log_likelihood - self.alpha * kl


@dataclass
class ObjectiveEstimate:
    """One minibatch estimate of the CTRL objective (scalars are batch means)."""

    loss: Tensor
    reward: Tensor
    kl: Tensor
    objective: Tensor
    x0: Tensor


def pathwise_loss(model: ConditionalScore, sde: SDE, reward: Reward, y: Tensor, x_shape: tuple[int, ...], *,
                  n_steps: int = 100, t_end: float = 1e-3, alpha: float = 1.0, gamma: float = 1.0,
                  memory: MemoryMode = "checkpoint", grad_last_k: int = 10, spacing: Spacing = "uniform",
                  generator: torch.Generator | None = None) -> ObjectiveEstimate:
    """-J for labels y by backpropagation through the Euler-Maruyama sampler.

    Args:
        model: the augmented model; only its label pathway has trainable parameters.
        reward: ``(x0, y) -> log p(y | x0)`` summed over labels.
        y: requested labels, (batch_size, n_labels).
        x_shape: shape of one sample.
        memory: ``full`` keeps every step's activations; ``checkpoint`` recomputes them in backward
            (memory flat in ``n_steps``, same gradient); ``truncate`` differentiates only the last
            ``grad_last_k`` steps (biased, cheapest).
        spacing: the sampler's time grid (:func:`ctrl_bio.sampling.time_grid`).
    """
    if memory not in ("full", "checkpoint", "truncate"):
        raise ValueError(f"memory must be 'full', 'checkpoint' or 'truncate', got {memory!r}")
    device = next(model.parameters()).device
    times = time_grid(n_steps, t_end, spacing=spacing, device=device)
    x_init = sde.prior_sampling((y.shape[0], *x_shape), generator=generator, device=device)
    out = euler_maruyama(sde, model.conditioned(y), x_init, times, generator=generator,
                         checkpoint=memory == "checkpoint",
                         grad_last_k=grad_last_k if memory == "truncate" else None, keep_trajectory=False)
    r = reward(out.x, y)
    if torch.is_grad_enabled() and out.x.requires_grad:
        # Without the reward's gradient the loss would still train, on the KL alone: the control would only shrink.
        check_differentiable(r, "pathwise")
    kl = out.kl
    objective = Objective(alpha=alpha, gamma=gamma).value(r, kl)
    return ObjectiveEstimate(loss=-objective.mean(), reward=r.mean().detach(), kl=kl.mean().detach(),
                             objective=objective.mean().detach(), x0=out.x.detach())


def pool_optimal_control(pool: WeightedPool, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, y: Tensor) -> Tensor:
    """The optimum's control on the pool, u*(x_t, t, y) = alpha_t (E_w[x_0 | x_t, y] - E[x_0 | x_t]) / sigma_t^2.

    The difference between the noised scores of the pool tilted for y and of the untilted pool (Tweedie's formula
    for each; :meth:`WeightedPool.posterior_mean`): grad log h_t of the Doob h-transform, exact for the pool's
    empirical law. alpha_t, sigma_t: (B,). Shape of x_t.
    """
    return control_from_means(*_posterior_means(pool, x_t, alpha_t, sigma_t, y), alpha_t, sigma_t)


def control_from_means(mean_tilted: Tensor, mean_untilted: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """u* = alpha_t (E_w[x_0 | x_t, y] - E[x_0 | x_t]) / sigma_t^2, from the two posterior means (Tweedie)."""
    a, sigma2 = append_dims(alpha_t, mean_tilted.ndim), append_dims(sigma_t**2, mean_tilted.ndim)
    return a * (mean_tilted - mean_untilted) / sigma2


def control_regression_loss(model: AugmentedScore, sde: SDE, x_t: Tensor, t: Tensor, y: Tensor, u_star: Tensor
                            ) -> Tensor:
    """E sigma_t^2 || u_theta(x_t, t, y) - u* ||^2: the control u_theta = s_theta - s_pre regressed onto a target u*
    in noise units (the pool's optimal control, a value function's gradient, a rollout estimate)."""
    _, u_theta = model.score_and_control(x_t, t, y)
    sigma = append_dims(sde.sigma(t), x_t.ndim)
    return sum_except_batch((sigma * (u_theta - u_star)) ** 2).mean()


def _posterior_means(pool: WeightedPool, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, y: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """(E_w[x_0 | x_t, y], E[x_0 | x_t]): the posterior means under the pool tilted for y and the untilted pool."""
    untilted = pool.untilted()
    # Untilted weights are uniform whatever the label: one label combination, one matrix product for the batch.
    return (pool.posterior_mean(x_t, alpha_t, sigma_t, y),
            untilted.posterior_mean(x_t, alpha_t, sigma_t, torch.zeros_like(y)))


def weighted_score_matching_loss(model: AugmentedScore, sde: SDE, pool: WeightedPool, y: Tensor, *,
                                 t_end: float = 1e-3, spacing: Spacing = "uniform", target: ScoreTarget = "denoising",
                                 generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching of s_theta(., ., y) on the reward-tilted pre-trained samples.

    Loss: E || sigma_t s_theta(x_t, t, y) + eps ||^2 with x_t = alpha_t x_0 + sigma_t eps, x_0 drawn from the
    pool tilted by p(y|x_0)^(gamma/alpha) (the sigma_t^2 weighting of Song et al. 2021, i.e. noise units).
    Its minimiser is the score of the tilted distribution at every t: the optimum of J.

    ``target="posterior"`` replaces eps by E[eps | x_t, y] = (x_t - alpha_t E[x_0 | x_t, y]) / sigma_t, computed
    exactly over the pool (:meth:`WeightedPool.posterior_mean`). That is the stable target field of Xu et al. (2023)
    with the whole pool as reference batch: by Rao-Blackwell the minimiser is unchanged and the gradient's variance
    can only fall. The gain is largest at high noise, where eps is almost pure noise and the label's signal (the
    difference between the tilted and untilted posterior means) is small beside it. Cost: one (B, N) matrix product
    per batch against the N pool items. The loss is lower than the denoising one by E Var[eps | x_t]: compare
    training curves of one target only. Measured: lower gradient variance on the mixture (a test), but no accuracy
    gain on the QED or DNA cell-type suites, where the fit and not its noise is the limit (docs/method.md).

    ``target="control"`` regresses the control u_theta = s_theta - s_pre alone onto the pool's optimal control
    (:func:`pool_optimal_control`): E sigma_t^2 || u_theta - u* ||^2. Both other targets ask s_pre + u_theta for
    the tilted *pool's* score, so u_theta must also make up the label-free gap s_pool - s_pre between the pool's
    empirical score and the network's, which on a finite pool of high-dimensional points is far larger than the
    label's signal (:func:`control_fit`'s third number). Subtracting the untilted pool's score removes that gap
    from the target exactly; what is left is the label's part alone. The price: where the pool's posterior sits on
    one point (low noise), u* is 0, so the control learns nothing there. Cost: two (B, N) matrix products.
    Measured: it reaches the optimum on the mixture (a test), but on QED bins (0.320, pre-trained 0.297) and DNA
    cell type (0.232) the control stays near zero: there u* is large only at noise levels where it sends x_t to
    particular pool items, which a network that generalises does not learn (benchmarks/*/README.md).
    """
    if target not in ("denoising", "posterior", "control"):
        raise ValueError(f"target must be 'denoising', 'posterior' or 'control', got {target!r}")
    x0 = pool.draw(y, generator)
    if target == "denoising":
        return denoising_score_matching_loss(model, sde, x0, y, t_end=t_end, spacing=spacing, generator=generator)
    t, eps = noise_levels(x0, y.shape[0], t_end, spacing, generator)
    x_t = sde.perturb(x0, t, eps)
    alpha_t, sigma_t = sde.alpha(t), sde.sigma(t)
    if target == "control":
        return control_regression_loss(model, sde, x_t, t, y, pool_optimal_control(pool, x_t, alpha_t, sigma_t, y))
    sigma = append_dims(sigma_t, x0.ndim)
    eps_mean = (x_t - append_dims(alpha_t, x0.ndim) * pool.posterior_mean(x_t, alpha_t, sigma_t, y)) / sigma
    return sum_except_batch((sigma * model(x_t, t, y) + eps_mean) ** 2).mean()


@torch.no_grad()
def control_fit(model: AugmentedScore, sde: SDE, pool: WeightedPool, y: Tensor, t: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """How far the learned control is from the optimum's on the pool at noise levels t: per request, sigma_t^2 ||u*||^2
    (the signal), sigma_t^2 ||u_theta - u*||^2 (the error) and sigma_t^2 ||s_pre - s_pool||^2 (the pre-trained
    network's own distance from the untilted pool's score), in noise units as the score-matching loss.

    x_0 is drawn from the pool tilted for y and x_t = alpha_t x_0 + sigma_t eps, where the optimum acts. The optimal
    control is the difference between the noised scores of the tilted and the untilted pool
    (:func:`pool_optimal_control`), and u_theta = s_theta - s_pre is the model's. 1 - error / signal is the share of
    the optimum's control the fit has found at that noise level (1: all of it; 0: no better than no control).
    The third number says where the comparison means something. Where the pool's empirical law is a set of separate
    points, its score (and u*) is that of those points, which a network that generalises does not follow, and the
    third number dwarfs the signal: near t = 0 always, and for high-dimensional discrete data well beyond (QM9 graphs
    with a 16,384-molecule pool: 14 against a signal of 1.8 at t = 0.3; benchmarks/molecules/README.md). Read the
    fit only where the third number is small. On the 2-D mixture testbed the trained fit explains 95 % of the
    optimum's control (tests/test_ctrl.py).
    """
    x0 = pool.draw(y, generator)
    x_t = sde.perturb(x0, t, randn(x0.shape, generator, device=x0.device, dtype=x0.dtype))
    alpha_t, sigma_t = sde.alpha(t), sde.sigma(t)
    mean_tilted, mean_untilted = _posterior_means(pool, x_t, alpha_t, sigma_t, y)
    u_star = control_from_means(mean_tilted, mean_untilted, alpha_t, sigma_t)  # the untilted mean is reused below
    a, sigma2 = append_dims(alpha_t, x0.ndim), append_dims(sigma_t**2, x0.ndim)
    s_theta, u_theta = model.score_and_control(x_t, t, y)
    s_pool = (a * mean_untilted - x_t) / sigma2
    return (sum_except_batch(sigma2 * u_star**2), sum_except_batch(sigma2 * (u_theta - u_star) ** 2),
            sum_except_batch(sigma2 * (s_theta - u_theta - s_pool) ** 2))


def noise_levels(x0: Tensor, batch: int, t_end: float, spacing: Spacing, generator: torch.Generator | None
                  ) -> tuple[Tensor, Tensor]:
    """t on [t_end, 1] (``uniform``, or ``quadratic``: t_end + (1 - t_end) u^2) and standard noise like x0."""
    if spacing not in ("uniform", "quadratic"):
        raise ValueError(f"spacing must be 'uniform' or 'quadratic', got {spacing!r}")
    u = rand((batch,), generator, device=x0.device, dtype=x0.dtype)
    t = t_end + (1.0 - t_end) * (u if spacing == "uniform" else u**2)
    return t, randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)


def denoising_score_matching_loss(model: AugmentedScore, sde: SDE, x0: Tensor, y: Tensor, *, t_end: float = 1e-3,
                                  spacing: Spacing = "uniform", generator: torch.Generator | None = None) -> Tensor:
    """E_t,eps || sigma_t s_theta(x_t, t, y) + eps ||^2 for clean samples x0 with labels y (Vincent 2011).

    On pairs (x0, y) from the data this trains a conditional model p(x | y) directly, as classifier-free
    guidance does (Ho & Salimans 2022); on reward-tilted pre-trained samples it is CTRL's score-matching
    estimator (:func:`weighted_score_matching_loss`).

    ``spacing`` is how t is drawn: ``uniform`` on [t_end, 1], or ``quadratic``, t = t_end + (1 - t_end) u^2 with u
    uniform, the density of the sampler's quadratic grid (:func:`ctrl_bio.sampling.time_grid`). The minimiser at each
    t is the same; the spacing decides where a small pathway spends its capacity, and a sampler that takes most of its
    steps near the data (images, where the last steps set the fine texture) is best served by a fit that does too.
    """
    t, eps = noise_levels(x0, y.shape[0], t_end, spacing, generator)
    x_t = sde.perturb(x0, t, eps)
    s_theta = model(x_t, t, y)
    sigma = append_dims(sde.sigma(t), x0.ndim)
    return sum_except_batch((sigma * s_theta + eps) ** 2).mean()
