"""``ctrl-bio benchmark suite=gmm``: every method against the exact conditional of a Gaussian mixture.

Rows (DESIGN.md names), all with the same Euler-Maruyama sampler and step count:
``pretrained`` (the floor), ``exact_guidance`` (the Doob h-transform, the limit; component label only),
``ctrl_oracle_reward`` (CTRL with the true log p(y|x) as reward), ``ctrl`` (CTRL with calibrated classifiers
learned from each label's own pairs), ``cfg`` (the same pathway trained by denoising score matching on
pairs, guidance scale swept), ``classifier_guidance`` (a classifier of noisy x_t from the same pairs),
``dps`` (the reward classifier at Tweedie's x0_hat), ``best_of_n`` (N pre-trained samples per request,
the reward classifier picks), ``ctrl_pg`` and ``ddpo`` (policy gradients from reward values only, the
label likelihood given as a black box; :mod:`ctrl_bio.policy_gradient`) and ``real_data`` (exact target samples
scored the same way, the ceiling).

Labels come from label configs (``label=component``, ``label=[logistic_a,logistic_b]``, a user's own);
several labels are learned from separate pair sets and combined by conditional independence.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ctrl_bio.estimators import Objective
from ctrl_bio.harness import Row, SuiteResult
from ctrl_bio.plots import plot_reward_vs_queries, plot_training_curves
from domains.gmm.evaluation import combination_index
from domains.gmm.plots import plot_samples
from domains.gmm.runner import (  # re-exported: the row machinery lived here before domains.gmm.runner
    RowRunner,
    SuiteContext,
    build_task,
    component_label_spec,
    joint_pairs,
    sweep_scale,
)
from domains.gmm.testbed import Testbed

__all__ = ["EXACT_ONLY", "METHODS", "RowRunner", "SuiteContext", "build_task", "component_label_spec", "joint_pairs",
           "run_suite", "sweep_scale"]

log = logging.getLogger(__name__)

#: Every method in this suite, in table order.
METHODS = ("pretrained", "exact_guidance", "ctrl_oracle_reward", "ctrl", "ctrl_pg", "ddpo", "cfg",
           "classifier_guidance", "dps", "best_of_n", "real_data")
#: Rows that need the exact label likelihood.
EXACT_ONLY = ("exact_guidance", "ctrl_oracle_reward", "real_data")


def run_suite(testbed: Testbed, *, run_dir: str | Path, labels: list[dict[str, Any]] | None = None, n_pairs: int = 2000,
              n_joint_pairs: int = 200, n_eval: int = 3000, n_steps: int = 200, t_end: float = 1e-3,
              method: dict[str, Any] | None = None, pathway: dict[str, Any] | None = None,
              baselines: dict[str, Any] | None = None, methods: tuple[str, ...] = METHODS,
              oracle_fraction: float = 0.3, n_floor_draws: int = 5, progress: bool = True, device: str = "cpu",
              precision: str = "32",
              sweep: dict[str, Any] | None = None,
              pretrained: Callable[..., Callable[[Tensor, Tensor], Tensor]] | None = None,
              policy_gradient: dict[str, Any] | None = None) -> SuiteResult:
    """Run the gmm suite's rows and write its plots into ``run_dir``.

    Args:
        testbed: the mixture, its SDE and labels (``domains.gmm.make_testbed``).
        labels: one or several label definitions (see :mod:`ctrl_bio.labels`); default: the component label.
        n_pairs: pairs per label for the default component label (label configs carry their own ``pairs.n``).
        n_joint_pairs: with several labels, pairs carrying all of them that ``cfg`` and ``classifier_guidance``
            learn from (CTRL needs none).
        n_eval: evaluation requests, drawn from the label prior.
        method: keyword arguments of :func:`ctrl_bio.finetune.finetune` (alpha, gamma, estimator, ...).
        pathway: keyword arguments of :class:`ctrl_bio.model.VectorPathway` (hidden, depth, n_fourier).
        baselines: settings of the baselines (``cfg``, ``classifier_guidance``, ``dps``, ``best_of_n``).
        methods: which rows to run.
        policy_gradient: settings of the ``ctrl_pg`` and ``ddpo`` rows: ``settings`` (keyword arguments of
            :func:`ctrl_bio.policy_gradient.finetune_policy_gradient`), ``pathway``, ``ddpo`` (overrides of the
            settings for ``ddpo``); both rows train with ``settings.n_steps`` sampler steps and are scored at
            the suite's ``n_steps`` and again at the training step count (``*_train_steps`` metrics).
        oracle_fraction: share of a label's pairs held out to train its oracle when it has no exact likelihood.
        n_floor_draws: independent exact sample sets the noise floor averages over.
        sweep: ``{"name": "n_pairs" | "gamma", ...}`` runs a sweep (:mod:`domains.gmm.sweeps`) instead.
        pretrained: ``(testbed, cache_dir=...) -> score`` replacing the exact mixture score as the pre-trained
            model (``pretrained=learned``: a network trained on mixture samples, as users have in practice).
            Targets, labels and evaluation stay exact; ``exact_guidance`` then adds the exact h-transform to
            the learned score, so it is no longer the limit.
        device, precision: accepted and logged only: the testbed's exact score and its low-dimensional paths run on
            the CPU in float32, where a GPU would add kernel-launch latency and no speed.
    """
    if (device, str(precision)) != ("cpu", "32"):
        log.info("suite gmm runs on the CPU in float32 (device=%s precision=%s are for the network domains)", device,
                 precision)
    if pretrained is not None:
        testbed = dataclasses.replace(testbed, pretrained=pretrained(testbed, cache_dir=str(run_dir)))
    if sweep and sweep.get("name") not in (None, "none"):
        from domains.gmm.sweeps import run_sweep

        return run_sweep(testbed, run_dir=run_dir, labels=labels, n_pairs=n_pairs, n_joint_pairs=n_joint_pairs,
                         n_eval=n_eval, n_steps=n_steps, t_end=t_end, method=method, pathway=pathway,
                         baselines=baselines, oracle_fraction=oracle_fraction, n_floor_draws=n_floor_draws,
                         progress=progress, sweep=sweep)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)} for suite gmm; known: {', '.join(METHODS)}")
    if n_steps < 1 or n_eval < 2 or n_pairs < 10:
        raise ValueError(f"need n_steps >= 1, n_eval >= 2 and data.n_pairs >= 10, got {n_steps}, {n_eval}, {n_pairs}")
    method, pathway, baselines = dict(method or {}), dict(pathway or {}), dict(baselines or {})
    specs = copy.deepcopy(labels) if labels else [component_label_spec(testbed, n_pairs)]
    task, pairs, info = build_task(testbed, specs, oracle_fraction)
    objective = Objective.of(method)
    ctx = SuiteContext(testbed, task, pairs, specs, n_eval=n_eval, n_steps=n_steps, t_end=t_end,
                       alpha=objective.alpha, gamma=objective.gamma,
                       n_floor_draws=n_floor_draws, n_joint_pairs=n_joint_pairs)
    rows, samples, histories = [], {}, {}
    if ctx.target is not None:
        samples["exact target"] = ctx.target
    info |= {"dim": testbed.dim, "n_components": testbed.mixture.n_components, "labels": task.names,
             "n_classes": list(task.n_classes),
             "optimum_objective": task.optimum(ctx.y_eval) if ctx.alpha == ctx.gamma == 1 else None}
    runner = RowRunner(ctx, method, pathway, baselines | {"policy_gradient": dict(policy_gradient or {})},
                       Path(run_dir), progress, info, histories)
    for name in methods:
        if name in EXACT_ONLY and not task.exact or name == "exact_guidance" and not task.component_label:
            log.info("%s: skipped (needs %s)", name, "the component label" if task.exact else "exact labels")
            continue
        start = time.perf_counter()
        x, kl, extra = runner.run(name)
        metrics = ctx.score(x, kl, ctx.y_eval) | extra
        # Wall time of the row, plus the reward classifiers' training when an earlier row built them.
        metrics["seconds"] = time.perf_counter() - start + metrics.pop("shared_seconds", 0.0)
        rows.append(Row(name, task.title, metrics))
        samples[name] = x
        log.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    plot_samples(testbed.mixture, samples, combination_index(ctx.y_eval), Path(run_dir) / "samples.png")
    ctrl_histories = {k: v for k, v in histories.items() if k not in ("ctrl_pg", "ddpo")}
    if ctrl_histories:
        plot_training_curves(ctrl_histories, Path(run_dir) / "training.png", optimum=info["optimum_objective"])
    if len(ctrl_histories) < len(histories):
        plot_reward_vs_queries(histories, Path(run_dir) / "reward_vs_queries.png")
    info["histories"] = histories  # the curves behind the plots, to replot or compare runs
    return SuiteResult("gmm", rows, info)
