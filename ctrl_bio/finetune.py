"""``finetune``: CTRL fine-tuning of an augmented model from Python with plain arguments.

The estimators live in :mod:`ctrl_bio.estimators`, one file each: ``score_matching`` (the default; off-policy
regression onto the reward-tilted pre-trained pool, keeps every mode), ``pathwise`` (backpropagation of J through
the sampler, CTRL's own algorithm), ``adjoint_matching`` (regression onto the lean adjoint of the reward gradient),
each optionally after a score-matching warm start (``hybrid`` = ``pathwise`` with it). :func:`train` runs any list of
them; :func:`finetune` builds that list from flat settings, as the configs name them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.estimators import (
    ALIASES,
    ESTIMATORS,
    AdjointMatching,
    Estimator,
    Objective,
    Pathwise,
    Problem,
    RolloutControl,
    ScoreMatching,
    SoftValue,
    sample_pretrained_pool,
    uses_pool,
)
from ctrl_bio.estimators.rollout_control import DEFAULT_TIMES
from ctrl_bio.model import ConditionalScore
from ctrl_bio.objective import MemoryMode, ScoreTarget, WeightedPool, control_fit, pathwise_loss
from ctrl_bio.pathway_seed import reseed_untrained_pathway
from ctrl_bio.plain_reward import PlainReward, plain_prior
from ctrl_bio.progress import progress_bar
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward, Reward
from ctrl_bio.sampling import Spacing
from ctrl_bio.sde import SDE

__all__ = ["FinetuneResult", "NonFiniteLossError", "TrainingMonitor", "build_phases", "finetune",
           "measure_control_fit",
           "sample_pretrained_pool", "save_pathway_checkpoint", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the parameters were restored to the last good state."""


@dataclass
class FinetuneResult:
    """Training record of :func:`finetune`.

    Attributes:
        history: one dict per evaluation: ``step``, ``phase``, ``loss`` and the no-grad estimates of
            ``reward``, ``kl`` and ``objective`` (J) on an evaluation batch.
        seconds: wall-clock time of the whole call, pool generation included.
        pool_ess: smallest effective sample size of the tilted pool over label combinations (score matching).
        prepared: per estimator, what its preparation recorded (the soft value network's losses and seconds, ...).
        stopped_by: per estimator, ``criterion`` (``budget`` or ``converged``) and the ``update`` it stopped at.
        control_fit: per noise level asked for (``control_fit_times``), the trained control against the optimum's on
            the pool: ``t``, ``signal`` (mean sigma_t^2 ||u*||^2), ``error`` (mean sigma_t^2 ||u_theta - u*||^2) and
            ``explained`` = 1 - error / signal, ``pretrained_error`` (mean sigma_t^2 ||s_pre - s_pool||^2;
            :func:`ctrl_bio.objective.control_fit`).
        kept: with ``keep_best``, the evaluation whose parameters the model ends with (its ``step``, ``phase`` and
            ``objective``); None otherwise.
    """

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    pool_ess: float | None = None
    prepared: dict[str, dict] = field(default_factory=dict)
    stopped_by: dict[str, dict] = field(default_factory=dict)
    control_fit: list[dict] = field(default_factory=list)
    kept: dict | None = None


@dataclass
class Plateau:
    """J has levelled off: no new best (by more than ``tolerance``) in ``patience`` evaluations; never if None."""

    patience: int | None
    tolerance: float = 0.0
    best: float = float("-inf")
    since_best: int = 0

    def levelled_off(self, objective: float) -> bool:
        if self.patience is None:
            return False
        if objective > self.best + self.tolerance:
            self.best, self.since_best = objective, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


def save_pathway_checkpoint(params: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(path))


class TrainingMonitor:
    """Evaluates J during fine-tuning and guards against a diverging loss.

    ``evaluate`` records a no-grad estimate of J = gamma E[log p(y|x0)] - alpha KL (:func:`pathwise_loss` on
    ``eval_batch_size`` labels) in ``history``, keeps the parameters as the last good ones and saves them to
    ``checkpoint_path``; ``check`` (a loss) and ``evaluate`` (the parameters) restore those and raise
    :class:`NonFiniteLossError` when a loss or a parameter is NaN or infinite, so that a diverged run leaves its last
    evaluated state behind rather than garbage.
    ``label_prior`` is anything with ``sample(n, generator)``: a :class:`LabelPrior`, or a continuous prior.
    """

    def __init__(self, model: ConditionalScore, sde: SDE, reward: Reward, label_prior: LabelPrior | Any,
                 x_shape: tuple[int, ...], *,
                 history: list[dict], alpha: float, gamma: float, n_steps: int, t_end: float, spacing: Spacing,
                 eval_batch_size: int, seed: int, checkpoint_path: str | Path | None):
        self.model, self.sde, self.reward, self.label_prior, self.x_shape = model, sde, reward, label_prior, x_shape
        self.history, self.eval_batch_size = history, eval_batch_size
        self.sampler = dict(alpha=alpha, gamma=gamma, n_steps=n_steps, t_end=t_end, spacing=spacing)
        self.generator = torch.Generator().manual_seed(seed)
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.device = next(model.parameters()).device
        if not self.named:
            raise ValueError("the model has no trainable parameters: is the label pathway attached?")
        self.last_good = {n: p.detach().clone() for n, p in self.named.items()}
        self.best: tuple[dict, dict[str, Tensor]] | None = None  # the evaluation with the highest J, its parameters
        self.path = Path(checkpoint_path) if checkpoint_path is not None else None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.named.values())

    def check(self, loss: Tensor, step: int, phase: str) -> None:
        """Restore the last good parameters and stop if ``loss`` is not finite (one host sync per update).

        Parameters that an update made non-finite give a non-finite loss at the next update; :meth:`evaluate`
        checks them too, so the last update of a phase cannot slip through either.
        """
        if not torch.isfinite(loss):
            self._restore_and_stop(f"loss became {loss.detach().item()}", step, phase)

    def _restore_and_stop(self, what: str, step: int, phase: str) -> None:
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(self.last_good[n])
        where = f"; last good parameters kept in {self.path}" if self.path is not None else ""
        raise NonFiniteLossError(f"{phase} {what} at update {step}: stopped, "
                                 f"parameters restored to the last evaluation{where}")

    def evaluate(self, step: int, phase: str, loss: float) -> None:
        """Record J, reward and KL on a fresh evaluation batch; the parameters become the last good ones."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.named.values()]).all()):
            self._restore_and_stop("parameters became non-finite", step, phase)
        with torch.no_grad():
            y = self.label_prior.sample(self.eval_batch_size, self.generator).to(self.device)
            est = pathwise_loss(self.model, self.sde, self.reward, y, self.x_shape, memory="full",
                                generator=self.generator, **self.sampler)
        self.history.append({"step": step, "phase": phase, "loss": loss, "reward": float(est.reward),
                             "kl": float(est.kl), "objective": float(est.objective)})
        self.last_good = {n: p.detach().clone() for n, p in self.named.items()}
        if self.best is None or self.history[-1]["objective"] > self.best[0]["objective"]:
            self.best = (self.history[-1], self.last_good)
        if self.path is not None:
            save_pathway_checkpoint(self.last_good, self.path)

    @torch.no_grad()
    def restore_best(self) -> dict:
        """Load the parameters of the evaluation with the highest estimate of J (init included) and return that
        evaluation's record (early stopping that keeps the best state, not the last one)."""
        record, params = self.best
        for n, p in self.named.items():
            p.copy_(params[n])
        if self.path is not None:
            save_pathway_checkpoint(params, self.path)
        return record


def finetune(model: ConditionalScore, sde: SDE, reward: LogLikelihoodReward | Callable[[Tensor], Tensor],
             label_prior: LabelPrior | None, x_shape: tuple[int, ...], *, estimator: str = "score_matching",
             warm_start: bool = False,
             alpha: float = 1.0, gamma: float = 1.0,
             steps: int = 200, batch_size: int = 128, lr: float = 1e-3, n_steps: int = 100, t_end: float = 1e-3,
             memory: MemoryMode = "checkpoint", grad_last_k: int = 10, grad_clip: float | None = 1.0,
             sm_steps: int = 2000, sm_batch_size: int = 512, sm_lr: float = 2e-3, pool_size: int = 20000,
             eval_every: int = 100, eval_batch_size: int = 512, checkpoint_path: str | Path | None = None,
             seed: int = 0, progress: bool = True, pool_x0: Tensor | None = None,
             spacing: Spacing = "uniform", sm_spacing: Spacing = "uniform",
             sm_target: ScoreTarget = "denoising", control_fit_times: Sequence[float] = (),
             am_time_samples: int = 10, max_adjoint: float | None = None, value_steps: int = 2000,
             value_batch_size: int = 256, value_lr: float = 2e-3, value_net: torch.nn.Module | None = None,
             value_spacing: Spacing = "uniform", value_distill: str = "pool", value_guided_paths: int = 512,
             rollout_anchors: int = 256, rollout_k: int = 16, rollout_times: Sequence[float] = DEFAULT_TIMES,
             patience: int | None = None, tolerance: float = 0.0, keep_best: bool = False) -> FinetuneResult:
    """Fine-tune the label pathway of ``model`` so that it samples p_pre(x) p(y|x)^(gamma/alpha).

    The flat settings below build the estimators (:mod:`ctrl_bio.estimators`) and hand them to :func:`train`;
    research code can build them itself and call :func:`train` directly.

    Args:
        model: augmented model (frozen pre-trained score + zero-initialised pathway), trained in place.
        sde: the SDE of the pre-trained model.
        reward: log p(y | x0) per label (a learned, calibrated classifier, or an exact likelihood); with
            ``label_prior=None``, a plain reward ``x0 -> (B,)``, log r(x0) up to a constant
            (:mod:`ctrl_bio.plain_reward`: the pathway then has ``PLAIN_LABELS`` and samples with ``plain_requests``).
        label_prior: p(y) that training labels are drawn from; None for a plain reward.
        x_shape: shape of one sample, e.g. ``(d,)`` or ``(4, 200)``.
        estimator: ``score_matching`` (default), ``pathwise``, ``adjoint_matching``, ``soft_value``,
            ``rollout_control``, or ``hybrid`` (``pathwise`` with ``warm_start``).
        warm_start: run ``sm_steps`` of score matching before ``pathwise`` or ``adjoint_matching``.
        alpha: KL weight; gamma: reward weight (gamma > 1 sharpens like a guidance scale).
        steps, batch_size, lr: updates, labels per update and learning rate of ``pathwise`` / ``adjoint_matching``;
            ``sm_steps``, ``sm_batch_size``, ``sm_lr``: the same for score matching.
        memory, grad_last_k: how the pathwise gradient is stored (see :func:`ctrl_bio.objective.pathwise_loss`).
        pool_size: pre-trained samples the score-matching phase resamples from.
        pool_x0: those samples, if already drawn. They set score matching's target (p_pre tilted needs samples of
            p_pre): default ``pool_size`` fresh samples of the pre-trained sampler with ``n_steps`` steps.
        eval_every: record a no-grad estimate of J, reward and KL every this many updates.
        spacing: the sampler's time grid, ``uniform`` or ``quadratic`` (:func:`ctrl_bio.sampling.time_grid`).
        sm_spacing: how score matching draws t (:func:`ctrl_bio.objective.denoising_score_matching_loss`).
        sm_target: the score-matching regression target, ``denoising``, ``posterior`` or ``control``
            (:func:`ctrl_bio.objective.weighted_score_matching_loss`).
        control_fit_times: noise levels t at which the trained control is compared with the optimum's on the pool
            after training (``FinetuneResult.control_fit``; needs a score-matching phase); empty: not measured.
        am_time_samples, max_adjoint: adjoint matching's grid points per trajectory and adjoint clip
            (:class:`ctrl_bio.estimators.AdjointMatching`).
        value_steps, value_batch_size, value_lr, value_net, value_spacing: the soft value network's regression, its
            architecture and how its t is drawn (:class:`ctrl_bio.estimators.SoftValue`; its pool is ``pool_x0`` /
            ``pool_size``); value_distill, value_guided_paths: where the pathway is regressed onto grad V (``pool``:
            the tilted pool's forward marginals; ``guided``: the states of that many trajectories guided by grad V;
            ``none``: nowhere, with ``steps=0``: ``value_net`` is fitted and the pathway stays untrained).
        rollout_anchors, rollout_k, rollout_times: ``rollout_control``'s pre-trained trajectories, continuations per
            anchor state, and anchor noise levels (:class:`ctrl_bio.estimators.RolloutControl`).
        checkpoint_path: where the trainable parameters are saved (safetensors) at each evaluation;
            a NaN loss restores the last good ones, keeps that file and raises :class:`NonFiniteLossError`.
        seed: seeds every draw of the run (pool, labels, noise, evaluation) and the random weights of an untrained
            pathway (:func:`ctrl_bio.pathway_seed.reseed_untrained_pathway`: drawn again as if the model had been
            built under ``torch.manual_seed(seed)``), so a run is a function of its arguments alone.
        patience, tolerance: stop a phase once J has levelled off (:func:`train`); None: run every update.
        keep_best: end with the parameters of the evaluation with the highest J (:func:`train`).
    """
    if label_prior is None:  # a plain reward: one label of one class that every request asks for
        label_prior, reward = plain_prior(), reward if isinstance(reward, PlainReward) else PlainReward(reward)
    if pool_x0 is not None and not uses_pool(estimator, warm_start):
        raise ValueError(f"estimator {estimator!r} (warm_start={warm_start}) takes no pool of pre-trained samples: "
                         "pass pool_x0 only to score_matching, soft_value or a warm-started estimator")
    phases = build_phases(estimator, warm_start=warm_start, steps=steps, batch_size=batch_size, lr=lr, memory=memory,
                          grad_last_k=grad_last_k, sm_steps=sm_steps, sm_batch_size=sm_batch_size, sm_lr=sm_lr,
                          pool_size=pool_size, pool_x0=pool_x0, sm_target=sm_target, sm_spacing=sm_spacing,
                          am_time_samples=am_time_samples, max_adjoint=max_adjoint, value_steps=value_steps,
                          value_batch_size=value_batch_size, value_lr=value_lr, value_net=value_net,
                          value_spacing=value_spacing, value_distill=value_distill,
                          value_guided_paths=value_guided_paths, rollout_anchors=rollout_anchors, rollout_k=rollout_k,
                          rollout_times=rollout_times, progress=progress)
    problem = Problem(model, sde, reward, label_prior, x_shape, Objective(alpha=alpha, gamma=gamma),
                      n_steps=n_steps, t_end=t_end, spacing=spacing)
    return train(problem, phases, grad_clip=grad_clip, eval_every=eval_every, eval_batch_size=eval_batch_size,
                 checkpoint_path=checkpoint_path, seed=seed, progress=progress, control_fit_times=control_fit_times,
                 patience=patience, tolerance=tolerance, keep_best=keep_best)


def build_phases(estimator: str = "score_matching", *, warm_start: bool = False, steps: int = 200,
                 batch_size: int = 128, lr: float = 1e-3, memory: MemoryMode = "checkpoint", grad_last_k: int = 10,
                 sm_steps: int = 2000, sm_batch_size: int = 512, sm_lr: float = 2e-3, pool_size: int = 20000,
                 pool_x0: Tensor | None = None, sm_target: ScoreTarget = "denoising", sm_spacing: Spacing = "uniform",
                 am_time_samples: int = 10, max_adjoint: float | None = None, value_steps: int = 2000,
                 value_batch_size: int = 256, value_lr: float = 2e-3, value_net: torch.nn.Module | None = None,
                 value_spacing: Spacing = "uniform", value_distill: str = "pool", value_guided_paths: int = 512,
                 rollout_anchors: int = 256, rollout_k: int = 16, rollout_times: Sequence[float] = DEFAULT_TIMES,
                 progress: bool = True) -> list[Estimator]:
    """The estimators that ``method.estimator`` names, in the order they run (the flat settings of the configs, as
    :func:`finetune` documents them): the estimator itself, after ``sm_steps`` of score matching when
    ``warm_start`` is set or the name is an alias (``hybrid``). :func:`finetune` and the Lightning
    :class:`ctrl_bio.training.CTRLModule` both run what this returns."""
    known = (*ESTIMATORS, *ALIASES)
    if estimator not in known:
        raise ValueError(f"estimator must be one of {', '.join(known)}, got {estimator!r}")
    if estimator in ALIASES:
        estimator, warm_start = ALIASES[estimator], True
    if estimator != "soft_value" and value_distill != "pool":
        raise ValueError(f"value_distill={value_distill!r} is a setting of the soft_value estimator, "
                         f"not of {estimator!r}")
    score_matching = ScoreMatching(steps=sm_steps, batch_size=sm_batch_size, lr=sm_lr, pool_size=pool_size,
                                   pool_x0=pool_x0, target=sm_target, spacing=sm_spacing)
    main = {"score_matching": lambda: score_matching,
            "pathwise": lambda: Pathwise(steps=steps, batch_size=batch_size, lr=lr, memory=memory,
                                         grad_last_k=grad_last_k),
            "adjoint_matching": lambda: AdjointMatching(steps=steps, batch_size=batch_size, lr=lr,
                                                        n_time_samples=am_time_samples, max_adjoint=max_adjoint),
            "soft_value": lambda: SoftValue(steps=steps, batch_size=batch_size, lr=lr, value_steps=value_steps,
                                            value_batch_size=value_batch_size, value_lr=value_lr,
                                            value_net=value_net, spacing=value_spacing, pool_size=pool_size,
                                            pool_x0=pool_x0, distill_on=value_distill,
                                            guided_paths=value_guided_paths, progress=progress),
            "rollout_control": lambda: RolloutControl(steps=steps, batch_size=batch_size, lr=lr,
                                                      anchors=rollout_anchors, rollouts=rollout_k,
                                                      times=tuple(rollout_times), progress=progress)}[estimator]()
    return [score_matching, main] if warm_start and estimator != "score_matching" else [main]


def train(problem: Problem, phases: Sequence[Estimator], *, grad_clip: float | None = 1.0, eval_every: int = 100,
          eval_batch_size: int = 512, checkpoint_path: str | Path | None = None, seed: int = 0, progress: bool = True,
          control_fit_times: Sequence[float] = (), patience: int | None = None, tolerance: float = 0.0,
          keep_best: bool = False) -> FinetuneResult:
    """Run each estimator in turn on ``problem``: ``steps`` Adam updates each, a cosine learning-rate decay per phase,
    the gradient norm clipped at ``grad_clip``, J recorded every ``eval_every`` updates (:class:`TrainingMonitor`).

    Stopping: ``steps`` is each phase's budget cap. With ``patience`` set, a phase also stops once its estimate of J
    has not risen above its best by more than ``tolerance`` nats for ``patience`` evaluations in a row (J levelling
    off). ``FinetuneResult.stopped_by`` says, per phase, which criterion ended it and at which update.

    ``keep_best``: the model ends with the parameters of the evaluation (every ``eval_every`` updates, and the
    untrained pathway) whose estimate of J is highest, rather than the last ones: a regression onto noisy targets can
    pass J's maximum and go on fitting the noise. ``FinetuneResult.kept`` names that evaluation.

    ``seed`` seeds every draw, and an untrained pathway's random weights too
    (:func:`ctrl_bio.pathway_seed.reseed_untrained_pathway`).
    """
    start = time.perf_counter()
    p = problem
    reseed_untrained_pathway(p.model, seed, p.x_shape, p.label_prior)
    generator = torch.Generator().manual_seed(seed)
    result = FinetuneResult()
    monitor = TrainingMonitor(p.model, p.sde, p.reward, p.label_prior, p.x_shape, history=result.history,
                              alpha=p.objective.alpha, gamma=p.objective.gamma, n_steps=p.n_steps, t_end=p.t_end,
                              spacing=p.spacing, eval_batch_size=eval_batch_size, seed=seed + 1,
                              checkpoint_path=checkpoint_path)
    step = 0
    device = next(p.model.parameters()).device
    monitor.evaluate(step, "init", float("nan"))
    ran = [est for est in phases if est.steps > 0]
    for est in phases:
        # A phase without updates still prepares: what it prepares may be the result (a soft value with
        # distill_on="none" is its fitted V).
        result.prepared[est.name] = est.prepare(p, generator)
        if "pool_ess" in result.prepared[est.name]:
            result.pool_ess = result.prepared[est.name]["pool_ess"]
        if est.steps == 0:
            continue
        params = monitor.params
        opt = torch.optim.Adam(params, lr=est.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=est.steps)
        plateau = Plateau(patience, tolerance)
        result.stopped_by[est.name] = {"criterion": "budget", "update": step + est.steps}
        with progress_bar(est.steps, f"ctrl {est.name}", enabled=progress) as advance:
            for _ in range(est.steps):
                y = p.label_prior.sample(est.batch_size, generator).to(device)  # drawn on the CPU: seeded alike
                loss = est.loss(p, y, generator)
                step += 1
                monitor.check(loss, step, est.name)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                sched.step()
                advance(loss=loss.detach().item())
                if step % eval_every == 0:
                    monitor.evaluate(step, est.name, loss.detach().item())
                    if plateau.levelled_off(result.history[-1]["objective"]):
                        result.stopped_by[est.name] = {"criterion": "converged", "update": step}
                        break
    if not result.history or result.history[-1]["step"] != step:
        monitor.evaluate(step, ran[-1].name if ran else "init", float("nan"))
    if keep_best:
        result.kept = monitor.restore_best()
    with_pool = [est for est in ran if getattr(est, "pool", None) is not None]
    if control_fit_times and with_pool:
        result.control_fit = measure_control_fit(p.model, p.sde, with_pool[0].pool, p.label_prior, control_fit_times,
                                                 with_pool[0].batch_size, generator)
    result.seconds = time.perf_counter() - start
    return result


def measure_control_fit(model: ConditionalScore, sde: SDE, pool: WeightedPool, label_prior: LabelPrior,
                        times: Sequence[float], batch_size: int, generator: torch.Generator | None = None
                        ) -> list[dict]:
    """:func:`ctrl_bio.objective.control_fit` at each t on ``batch_size`` requests from the label prior, as means."""
    out = []
    for t in times:
        y = label_prior.sample(batch_size, generator)
        signal, error, base = control_fit(model, sde, pool, y, torch.full((batch_size,), float(t)), generator)
        s, e = float(signal.mean()), float(error.mean())
        out.append({"t": float(t), "signal": s, "error": e, "explained": 1.0 - e / s if s > 0 else float("nan"),
                    "pretrained_error": float(base.mean())})
    return out
