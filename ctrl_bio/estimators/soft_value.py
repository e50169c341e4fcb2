"""A learned soft value function, V(x_t, t, y) = log E_pre[p(y | x0)^(gamma/alpha) | x_t], distilled into the pathway.

The optimum of J is the Doob h-transform of the pre-trained process (DESIGN.md): u*(x, t, y) = grad_x log h_t(x, y)
with h_t(x, y) = E_pre[p(y | x0)^(gamma/alpha) | x_t = x], the soft value function of KL-regularised control
(Uehara et al. 2024, "Fine-tuning of continuous-time diffusion models as entropy-regularized control", eq. 9; the
value SVDD guides with, Li et al. 2024). It is a conditional expectation, so it is learned by regression over x_t
(function approximation, not an index of a pool): pre-trained samples x0 are noised forward to x_t (the pair
(x0, x_t) then has the pre-trained process's joint law) and a network V(x_t, t) with one output per label
combination c minimises the Bregman loss of the log link,

    E_{x0, t, x_t} sum_c [ exp(V_c(x_t, t)) - w_c(x0) V_c(x_t, t) ],    w_c(x0) = p(c | x0)^(gamma/alpha) / mean_pool,

whose minimiser is exp(V_c) = E[w_c(x0) | x_t] exactly (the per-class normalisation shifts V_c by a constant, which
no gradient sees). Its gradient is the optimal control; the zero-initialised label pathway is then regressed onto it,
E sigma_t^2 || u_theta(x_t, t, y) - grad_x V_y(x_t, t) ||^2 with x_t drawn from the tilted pool's forward marginals
(where the optimum sends the sampler), so sampling needs no extra network. Where no pathway holds grad V
(``distill_on="none"``), :func:`value_guided_score` samples with it directly: s_pre + grad V, at the price of a
gradient of V at every sampler step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ctrl_bio.estimators.base import Problem
from ctrl_bio.estimators.score_matching import tilted_pool
from ctrl_bio.guidance import NoisyMLPClassifier, fit_adam
from ctrl_bio.label_space import CategoricalLabels
from ctrl_bio.model import NULL_LABEL, fourier_features
from ctrl_bio.objective import WeightedPool, control_regression_loss, noise_levels
from ctrl_bio.sampling import Spacing, euler_maruyama, time_grid
from ctrl_bio.sde import SDE


def combination_index(y: Tensor, n_classes: tuple[int, ...]) -> Tensor:
    """Index of each label combination in :meth:`CategoricalLabels.combinations` order (the last label varies
    fastest), (B,)."""
    index = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    for k, n in enumerate(n_classes):
        index = index * n + y[:, k]
    return index


def combination_log_probs(class_log_probs: Sequence[Tensor], combos: Tensor) -> Tensor:
    """sum_k log p_k(c_k | x) for every item and label combination c (rows of ``combos``, (C, K)), (N, C), from one
    (N, n_classes_k) table per label."""
    return sum(lp[:, combos[:, k]] for k, lp in enumerate(class_log_probs))


def value_gradient(value_net: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, index: Tensor) -> Tensor:
    """grad_x V_c(x_t, t) for each item's label combination ``index`` (B,), shape of x_t; V is not trained."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        v = value_net(x, t).gather(1, index.to(x.device)[:, None]).sum()
        return torch.autograd.grad(v, x)[0]


def value_guided_score(pretrained: Callable[[Tensor, Tensor], Tensor], value_net: Callable[[Tensor, Tensor], Tensor],
                       n_classes: Sequence[int], y: Tensor, scale: float = 1.0
                       ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The sampler's ``(x, t) -> (s, u)`` for labels y (B, K): s = s_pre + u with the soft value's control
    u = scale grad_x V_y (the h-transform of DESIGN.md at scale 1; the KL is recorded from u)."""
    index = combination_index(y, tuple(n_classes))

    def score_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        u = scale * value_gradient(value_net, x, t, index)
        return pretrained(x, t) + u, u

    return score_fn


class DenoisedRewardValue(nn.Module):
    """V_c(x_t, t) = a(t) L_c(x0_hat(x_t, t)) + b_c(t): the reward classifier read at the pre-trained denoiser's
    Tweedie estimate x0_hat = (x_t + sigma_t^2 s_pre) / alpha_t, with a learned calibration in t.

    L_c = sum_k log p_k(c_k | x0_hat) is what reconstruction guidance (DPS, Chung et al. 2023) differentiates with one
    scale for every t; here the scale a(t) >= 0 and the offsets b_c(t) (an MLP of Fourier features of t, a few
    thousand weights) are fitted by the soft value's own Bregman regression, so that exp(V) approximates
    E_pre[p(c | x0)^(gamma/alpha) | x_t]. Near the data x0_hat = x0 and the exact value is (gamma/alpha) L_c, so
    a -> gamma/alpha; where x_t has forgotten the label the regression can flatten V by a -> 0, which one DPS scale
    cannot do at both ends. Its gradient, the control, is a(t) grad_x L_c through the frozen denoiser and
    classifier; nothing of either is trained.

    Args:
        pretrained: the frozen pre-trained score ``(x, t) -> s`` (or ``(s, u)``).
        sde: its SDE (for Tweedie's formula).
        log_prob_fns: one ``x0 -> (B, n_classes_k)`` per label (the reward's ``log_prob_fns``).
        combinations: the label combinations, (C, K), in the order of V's outputs.
        n_fourier, hidden: the calibration network's features of t and width.
    """

    def __init__(self, pretrained: Callable[[Tensor, Tensor], Tensor | tuple[Tensor, Tensor]], sde: SDE,
                 log_prob_fns: Sequence[Callable[[Tensor], Tensor]], combinations: Tensor, n_fourier: int = 16,
                 hidden: int = 32):
        super().__init__()
        # A tuple, not attributes: the frozen network and classifier must not become submodules, whose weights
        # SoftValue's regression (it fits every parameter of its value network) would then train.
        self.frozen = (pretrained, sde, list(log_prob_fns))
        self.register_buffer("combinations", combinations.clone())
        self.n_fourier = n_fourier
        self.calibration = nn.Sequential(nn.Linear(n_fourier, hidden), nn.SiLU(),
                                         nn.Linear(hidden, 1 + combinations.shape[0]))
        nn.init.zeros_(self.calibration[-1].weight)
        with torch.no_grad():  # a(t) = softplus(0.5413) = 1 at initialisation, b_c(t) = 0
            self.calibration[-1].bias.zero_()
            self.calibration[-1].bias[0] = math.log(math.e - 1.0)

    def reward_log_probs(self, x_t: Tensor, t: Tensor) -> Tensor:
        """L_c(x0_hat(x_t, t)) for every combination, (B, C); differentiable in x_t when x_t requires grad."""
        pretrained, sde, log_prob_fns = self.frozen
        with torch.set_grad_enabled(x_t.requires_grad):
            s = pretrained(x_t, t)
            x0_hat = sde.denoise(x_t, t, s[0] if isinstance(s, tuple) else s)
            return combination_log_probs([fn(x0_hat) for fn in log_prob_fns], self.combinations)

    @torch.no_grad()
    def scale(self, t: Tensor) -> Tensor:
        """The fitted a(t), (B,): how much of the reward classifier's log-likelihood at x0_hat V keeps at t."""
        return nn.functional.softplus(self.calibration(fourier_features(t, self.n_fourier))[:, 0])

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.calibration(fourier_features(t, self.n_fourier))
        a = nn.functional.softplus(out[:, :1])
        return a * self.reward_log_probs(x_t, t) + out[:, 1:]


def value_weights(pool: WeightedPool, combos: Tensor) -> Tensor:
    """w_ic = p(c | x0_i)^tilt for every pool item and label combination, each column scaled to mean 1, (N, C)."""
    logw = pool.tilt * combination_log_probs(pool.class_log_probs, combos)
    return torch.softmax(logw.double(), dim=0).float() * logw.shape[0]


@dataclass
class GuidedStates:
    """States x_t of trajectories guided by grad V, their times, labels and controls grad V (the regression targets),
    flattened over steps and paths (kept on the CPU); ``kl`` and ``log_likelihood``: the guided sampler's mean path
    KL and reward, what a perfect distillation would reach."""

    x: Tensor
    t: Tensor
    y: Tensor
    control: Tensor
    kl: float
    log_likelihood: float
    n_classes: tuple[int, ...]

    def __post_init__(self) -> None:
        # The states grouped by label combination once, so that each draw is an index computation.
        have = combination_index(self.y, self.n_classes)
        self.order = torch.argsort(have, stable=True)
        self.counts = torch.bincount(have, minlength=math.prod(self.n_classes))
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def draw(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """For each requested label, a uniformly random stored state of a path guided toward that label."""
        want = combination_index(y.cpu(), self.n_classes)
        if (self.counts[want] == 0).any():
            raise ValueError("a requested label combination has no guided path: raise guided_paths")
        pick = self.order[self.starts[want] + (torch.rand(want.shape[0], generator=generator)
                                               * self.counts[want]).long()]
        return self.x[pick].to(y.device), self.t[pick].to(y.device), self.control[pick].to(y.device)


@dataclass
class SoftValue:
    """Fit V(x_t, t, c) by regression on the noised pre-trained pool, then distil grad V into the label pathway.

    Attributes:
        steps, batch_size, lr: distillation updates of the pathway.
        value_steps, value_batch_size, value_lr: the value network's regression.
        value_net: ``(x_t, t) -> (B, C)`` with one output per label combination; None: an MLP of the flattened x_t
            and Fourier features of t (:class:`ctrl_bio.guidance.NoisyMLPClassifier`). A domain gives its noisy
            classifier's architecture here.
        pool_size, pool_x0: the pre-trained samples, as for score matching.
        spacing: how t is drawn for both regressions, ``uniform`` on [t_end, 1] or ``quadratic`` (t_end + (1 - t_end)
            u^2: most draws near the data, where a label that noise soon hides is readable at all).
        distill_on: where the pathway is regressed onto grad V. ``pool``: x_t drawn from the tilted pool's forward
            marginals. ``guided``: the states of ``guided_paths`` trajectories of the sampler guided by s_pre + grad V
            itself (drawn once, with their targets, which the guidance computed anyway), i.e. the states the
            distilled model must steer from; a regression then costs no gradient of V. ``none``: no distillation
            (``steps`` must be 0); the fitted ``value_net`` is the result, sampled by :func:`value_guided_score`
            (for a pathway that cannot hold grad V: benchmarks/dna/README.md).
        guided_paths: trajectories drawn for ``distill_on="guided"`` (their states and targets are kept in memory:
            guided_paths x n_steps x the sample size, twice).
        progress: show a progress bar while the value network is fitted.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    value_steps: int = 2000
    value_batch_size: int = 256
    value_lr: float = 2e-3
    value_net: nn.Module | None = field(default=None, repr=False)
    pool_size: int = 20000
    pool_x0: Tensor | None = field(default=None, repr=False)
    spacing: Spacing = "uniform"
    distill_on: str = "pool"
    guided_paths: int = 512
    progress: bool = True
    name: str = "soft_value"
    pool: WeightedPool | None = field(default=None, init=False, repr=False)
    guided: GuidedStates | None = field(default=None, init=False, repr=False)

    def prepare(self, problem: Problem, generator: torch.Generator) -> dict:
        if self.distill_on not in ("pool", "guided", "none"):
            raise ValueError(f"distill_on must be 'pool', 'guided' or 'none', got {self.distill_on!r}")
        if self.distill_on == "none" and self.steps:
            raise ValueError(f"distill_on='none' fits V and distils nothing: steps must be 0, got {self.steps}")
        start = time.perf_counter()
        self.pool = tilted_pool(problem, self.pool_x0, self.pool_size, generator)
        combos = CategoricalLabels(problem.label_prior.n_classes).combinations()
        weights = value_weights(self.pool, combos).to(self.pool.x0.device)
        if self.value_net is None:
            self.value_net = NoisyMLPClassifier(math.prod(problem.x_shape), combos.shape[0])
        net = self.value_net.to(self.pool.x0.device).train().requires_grad_(True)
        x0_all = self.pool.x0

        def loss_fn(_: int) -> Tensor:
            idx = torch.randint(0, x0_all.shape[0], (self.value_batch_size,), generator=generator)
            x_t, t = self._noised(problem, x0_all[idx.to(x0_all.device)], generator)
            v = net(x_t, t).clamp(max=30.0)  # exp(V) fits a mean of weights of mean 1: 30 is far outside
            return (v.exp() - weights[idx] * v).sum(1).mean()

        record = fit_adam(list(net.parameters()), loss_fn, self.value_steps, self.value_lr, "ctrl soft value V",
                          self.progress)
        net.eval().requires_grad_(False)
        info = {"pool_ess": min(self.pool.effective_sample_size(c) for c in combos[:64]),
                "value_losses": record.losses, "value_seconds": time.perf_counter() - start}
        if self.distill_on == "guided":
            start = time.perf_counter()
            self.guided = self._guided_states(problem, generator)
            info |= {"guided_seconds": time.perf_counter() - start, "guided_kl": self.guided.kl,
                     "guided_log_likelihood": self.guided.log_likelihood}
        return info

    @torch.no_grad()
    def _guided_states(self, problem: Problem, generator: torch.Generator) -> GuidedStates:
        """Every state of ``guided_paths`` trajectories of s_pre + grad V, with grad V there (the targets), the
        label combinations in turn."""
        times = time_grid(problem.n_steps, problem.t_end, spacing=problem.spacing)
        device = next(p for p in problem.model.parameters()).device
        # Balanced over label combinations (not drawn from the prior), so that every label a batch asks for has paths.
        combos = CategoricalLabels(problem.label_prior.n_classes).combinations()
        if self.guided_paths < combos.shape[0]:
            raise ValueError(f"guided_paths={self.guided_paths} is fewer than the {combos.shape[0]} label combinations")
        y_all = combos[torch.arange(self.guided_paths) % combos.shape[0]].to(device)
        xs, ts, ys, us, kls, log_liks = [], [], [], [], [], []
        for start in range(0, self.guided_paths, self.value_batch_size):
            y = y_all[start:start + self.value_batch_size]
            null = torch.full_like(y, NULL_LABEL)
            guided = value_guided_score(lambda x, t, null=null: problem.model(x, t, null), self.value_net,
                                        problem.label_prior.n_classes, y)

            def score_fn(x: Tensor, t: Tensor, y: Tensor = y, guided=guided) -> tuple[Tensor, Tensor]:
                s, u = guided(x, t)
                for store, value in ((xs, x), (ts, t), (ys, y), (us, u)):
                    store.append(value.cpu())
                return s, u

            x_init = problem.sde.prior_sampling((y.shape[0], *problem.x_shape), generator=generator).to(device)
            out = euler_maruyama(problem.sde, score_fn, x_init, times.to(device), generator=generator,
                                 keep_trajectory=False)
            kls.append(out.kl.cpu())
            log_liks.append(problem.reward(out.x, y).cpu())
        return GuidedStates(torch.cat(xs), torch.cat(ts), torch.cat(ys), torch.cat(us),
                            float(torch.cat(kls).mean()), float(torch.cat(log_liks).mean()),
                            tuple(problem.label_prior.n_classes))

    def _noised(self, problem: Problem, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """x_t = alpha_t x0 + sigma_t eps with t drawn on [t_end, 1] by ``spacing``, and t."""
        t, eps = noise_levels(x0, x0.shape[0], problem.t_end, self.spacing, generator)
        return problem.sde.perturb(x0, t, eps), t

    def control(self, problem: Problem, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """grad_x V(x_t, t, y): the h-transform's control under the fitted value, shape of x_t."""
        return value_gradient(self.value_net, x_t, t, combination_index(y, tuple(problem.label_prior.n_classes)))

    def loss(self, problem: Problem, y: Tensor, generator: torch.Generator) -> Tensor:
        if self.pool is None or self.value_net is None:
            raise RuntimeError("SoftValue.prepare must run before loss")
        if self.distill_on == "none":
            raise RuntimeError("distill_on='none' distils nothing: sample with value_guided_score")
        if self.guided is not None:
            x_t, t, target = self.guided.draw(y, generator)
            return control_regression_loss(problem.model, problem.sde, x_t, t, y, target)
        x_t, t = self._noised(problem, self.pool.draw(y, generator), generator)
        return control_regression_loss(problem.model, problem.sde, x_t, t, y, self.control(problem, x_t, t, y))
