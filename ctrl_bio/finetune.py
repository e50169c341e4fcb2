"""``finetune``: CTRL fine-tuning of an augmented model from Python with plain arguments.

Estimators (see :mod:`ctrl_bio.objective`):
- ``pathwise``: maximise J by backpropagating through the sampler (CTRL's own algorithm).
- ``score_matching`` (default): regress the label pathway onto the optimum of J by denoising score matching on
  pre-trained samples importance-resampled by p(y|x0)^(gamma/alpha); off-policy, keeps every mode.
- ``hybrid``: ``score_matching`` first, then ``pathwise`` on J itself from that warm start.

``score_matching`` is the default: it keeps every mode where ``pathwise`` from a cold start collapses
(benchmarks/gmm/ablation.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ctrl_bio.model import NULL_LABEL, ConditionalScore
from ctrl_bio.objective import (
    MemoryMode,
    ScoreTarget,
    WeightedPool,
    control_fit,
    pathwise_loss,
    weighted_score_matching_loss,
)
from ctrl_bio.progress import progress_bar
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward, Reward
from ctrl_bio.sampling import Spacing, euler_maruyama, time_grid
from ctrl_bio.sde import SDE

Estimator = Literal["pathwise", "score_matching", "hybrid"]


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
        control_fit: per noise level asked for (``control_fit_times``), the trained control against the optimum's on
            the pool: ``t``, ``signal`` (mean sigma_t^2 ||u*||^2), ``error`` (mean sigma_t^2 ||u_theta - u*||^2) and
            ``explained`` = 1 - error / signal, ``pretrained_error`` (mean sigma_t^2 ||s_pre - s_pool||^2;
            :func:`ctrl_bio.objective.control_fit`).
    """

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    pool_ess: float | None = None
    control_fit: list[dict] = field(default_factory=list)


@torch.no_grad()
def sample_pretrained_pool(model: ConditionalScore, sde: SDE, x_shape: tuple[int, ...], n: int, *,
                           n_steps: int, t_end: float, batch_size: int = 4096, spacing: Spacing = "uniform",
                           generator: torch.Generator | None = None) -> Tensor:
    """n samples of the pre-trained model: the augmented model with null labels (exactly s_pre)."""
    device = next(model.parameters()).device
    times = time_grid(n_steps, t_end, spacing=spacing, device=device)
    chunks = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y_null = torch.full((b, len(model.n_classes)), NULL_LABEL, dtype=torch.long, device=device)
        x_init = sde.prior_sampling((b, *x_shape), generator=generator, device=device)
        chunks.append(euler_maruyama(sde, model.conditioned(y_null), x_init, times, generator=generator,
                                     keep_trajectory=False).x)
    return torch.cat(chunks)


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
        if not self.named:
            raise ValueError("the model has no trainable parameters: is the label pathway attached?")
        self.last_good = {n: p.detach().clone() for n, p in self.named.items()}
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
            y = self.label_prior.sample(self.eval_batch_size, self.generator)
            est = pathwise_loss(self.model, self.sde, self.reward, y, self.x_shape, memory="full",
                                generator=self.generator, **self.sampler)
        self.history.append({"step": step, "phase": phase, "loss": loss, "reward": float(est.reward),
                             "kl": float(est.kl), "objective": float(est.objective)})
        self.last_good = {n: p.detach().clone() for n, p in self.named.items()}
        if self.path is not None:
            save_pathway_checkpoint(self.last_good, self.path)


def finetune(model: ConditionalScore, sde: SDE, reward: LogLikelihoodReward, label_prior: LabelPrior,
             x_shape: tuple[int, ...], *, estimator: Estimator = "score_matching", alpha: float = 1.0,
             gamma: float = 1.0,
             steps: int = 200, batch_size: int = 128, lr: float = 1e-3, n_steps: int = 100, t_end: float = 1e-3,
             memory: MemoryMode = "checkpoint", grad_last_k: int = 10, grad_clip: float | None = 1.0,
             sm_steps: int = 2000, sm_batch_size: int = 512, sm_lr: float = 2e-3, pool_size: int = 20000,
             eval_every: int = 100, eval_batch_size: int = 512, checkpoint_path: str | Path | None = None,
             seed: int = 0, progress: bool = True, pool_x0: Tensor | None = None,
             spacing: Spacing = "uniform", sm_spacing: Spacing = "uniform",
             sm_target: ScoreTarget = "denoising", control_fit_times: Sequence[float] = ()) -> FinetuneResult:
    """Fine-tune the label pathway of ``model`` so that it samples p_pre(x) p(y|x)^(gamma/alpha).

    Args:
        model: augmented model (frozen pre-trained score + zero-initialised pathway), trained in place.
        sde: the SDE of the pre-trained model.
        reward: log p(y | x0) per label (a learned, calibrated classifier, or an exact likelihood).
        label_prior: p(y) that training labels are drawn from.
        x_shape: shape of one sample, e.g. ``(d,)`` or ``(4, 200)``.
        estimator: ``score_matching`` (default), ``pathwise`` or ``hybrid`` (score matching, then pathwise).
        alpha: KL weight; gamma: reward weight (gamma > 1 sharpens like a guidance scale).
        steps: pathwise updates; ``sm_steps``: score-matching updates.
        memory, grad_last_k: how the pathwise gradient is stored (see :func:`pathwise_loss`).
        pool_size: pre-trained samples the score-matching phase resamples from.
        pool_x0: those samples, if already drawn (several fine-tunings of one pre-trained model share them);
            default: ``pool_size`` fresh samples of the pre-trained sampler with ``n_steps`` steps.
        eval_every: record a no-grad estimate of J, reward and KL every this many updates.
        spacing: the sampler's time grid, ``uniform`` or ``quadratic`` (:func:`ctrl_bio.sampling.time_grid`).
        sm_spacing: how score matching draws t (:func:`ctrl_bio.objective.denoising_score_matching_loss`);
            ``quadratic`` concentrates the fit near the data, as a quadratic sampler grid concentrates its steps.
        sm_target: the score-matching regression target, ``denoising`` (the drawn noise), ``posterior`` (its
            exact expectation over the pool: same optimum, lower variance) or ``control`` (the control alone onto
            the pool's optimal control, without the pool-versus-network gap; :func:`weighted_score_matching_loss`).
        control_fit_times: noise levels t at which the trained control is compared with the optimum's on the pool
            after training (``FinetuneResult.control_fit``; score matching and hybrid only, one batch of
            ``sm_batch_size`` per t); empty: not measured.
        checkpoint_path: where the trainable parameters are saved (safetensors) at each evaluation;
            a NaN loss restores the last good ones, keeps that file and raises :class:`NonFiniteLossError`.
    """
    if estimator not in ("pathwise", "score_matching", "hybrid"):
        raise ValueError(f"estimator must be 'pathwise', 'score_matching' or 'hybrid', got {estimator!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    result = FinetuneResult()
    monitor = TrainingMonitor(model, sde, reward, label_prior, x_shape, history=result.history, alpha=alpha,
                              gamma=gamma, n_steps=n_steps, t_end=t_end, spacing=spacing,
                              eval_batch_size=eval_batch_size, seed=seed + 1, checkpoint_path=checkpoint_path)
    step = 0
    pool: WeightedPool | None = None
    monitor.evaluate(step, "init", float("nan"))
    phases = [] if estimator == "pathwise" else [("score_matching", sm_steps)]
    if estimator != "score_matching":
        phases.append(("pathwise", steps))
    for phase, n_updates in phases:
        if n_updates <= 0:
            continue
        params = monitor.params
        opt = torch.optim.Adam(params, lr=sm_lr if phase == "score_matching" else lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_updates)
        if phase == "score_matching":
            x0 = pool_x0 if pool_x0 is not None else sample_pretrained_pool(
                model, sde, x_shape, pool_size, n_steps=n_steps, t_end=t_end, spacing=spacing, generator=generator)
            with torch.no_grad():
                pool = WeightedPool(x0, [f(x0) for f in reward.log_prob_fns], tilt=gamma / alpha)
            combos = torch.cartesian_prod(*[torch.arange(n) for n in label_prior.n_classes]).reshape(
                -1, len(label_prior.n_classes))
            result.pool_ess = min(pool.effective_sample_size(c) for c in combos[:64])
        with progress_bar(n_updates, f"ctrl {phase}", enabled=progress) as advance:
            for _ in range(n_updates):
                y = label_prior.sample(sm_batch_size if phase == "score_matching" else batch_size, generator)
                if phase == "score_matching":
                    loss = weighted_score_matching_loss(model, sde, pool, y, t_end=t_end, spacing=sm_spacing,
                                                        target=sm_target, generator=generator)
                else:
                    loss = pathwise_loss(model, sde, reward, y, x_shape, n_steps=n_steps, t_end=t_end, alpha=alpha,
                                         gamma=gamma, memory=memory, grad_last_k=grad_last_k, spacing=spacing,
                                         generator=generator).loss
                step += 1
                monitor.check(loss, step, phase)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                sched.step()
                advance(loss=loss.detach().item())
                if step % eval_every == 0:
                    monitor.evaluate(step, phase, loss.detach().item())
    if not result.history or result.history[-1]["step"] != step:
        monitor.evaluate(step, phases[-1][0] if phases else "init", float("nan"))
    if control_fit_times and pool is not None:
        result.control_fit = measure_control_fit(model, sde, pool, label_prior, control_fit_times, sm_batch_size,
                                                 generator)
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
