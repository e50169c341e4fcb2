"""``ctrl-bio benchmark suite=gmm``: every method against the exact conditional of a Gaussian mixture.

Rows (DESIGN.md names): ``pretrained`` (the floor), ``exact_guidance`` (the Doob h-transform, the limit
no method can beat), ``ctrl_oracle_reward`` (CTRL with the true log p(y|x) as reward), ``ctrl`` (CTRL with
a calibrated classifier learned from ``n_pairs`` pairs) and ``real_data`` (exact target samples scored by
the same evaluation, the ceiling). All sample with the same Euler-Maruyama sampler and step count.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.finetune import FinetuneResult, finetune
from ctrl_bio.harness import Row, SuiteResult
from ctrl_bio.metrics import accuracy, energy_distance, histogram_tv, macro_f1
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.plots import plot_training_curves
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward, mlp_classifier, train_classifier
from ctrl_bio.sampling import ScoreFn, euler_maruyama, time_grid
from domains.gmm.labels import exact_guidance
from domains.gmm.plots import plot_samples
from domains.gmm.testbed import Testbed

log = logging.getLogger(__name__)

#: Every method in this suite, in table order.
METHODS = ("pretrained", "exact_guidance", "ctrl_oracle_reward", "ctrl", "real_data")


def evaluate_samples(testbed: Testbed, x: Tensor, y: Tensor, target: Tensor, twins: list[Tensor]) -> dict[str, float]:
    """Label and distribution metrics of samples x for requested classes y (B,).

    ``target`` and each of ``twins`` are independent exact sample sets for the same requests. The noise
    floor is the mean distance between ``target`` and a twin: a single such distance fluctuates by a
    factor of two at a few hundred samples per class, as much as its own size, so one draw is no floor.
    """
    label, mixture = testbed.component_label, testbed.mixture
    pred = label.bayes_label(x)
    comp, comp_target = mixture.component_log_joint(x).argmax(1), mixture.component_log_joint(target).argmax(1)
    dist, floor, tv = [], [], []
    for c in range(label.n_classes):
        rows = y == c
        if rows.sum() < 2:
            continue
        dist.append(energy_distance(x[rows], target[rows]))
        floor.append(sum(energy_distance(twin[rows], target[rows]) for twin in twins) / len(twins))
        tv.append(histogram_tv(comp[rows], comp_target[rows], mixture.n_components))
    mean = lambda v: float(sum(v) / len(v))  # noqa: E731
    return {"accuracy": accuracy(pred, y), "macro_f1": macro_f1(pred, y, label.n_classes),
            "distance_to_target": mean(dist), "noise_floor": mean(floor), "component_tv": mean(tv)}


def sample_and_score(testbed: Testbed, score_fn: ScoreFn, y: Tensor, *, n_steps: int, t_end: float,
                     alpha: float, gamma: float, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """Sample requests y with ``score_fn`` and estimate J along the method's own paths with the true reward."""
    times = time_grid(n_steps, t_end)
    with torch.no_grad():
        x_init = testbed.sde.prior_sampling((y.shape[0], testbed.dim), generator=generator)
        out = euler_maruyama(testbed.sde, score_fn, x_init, times, generator=generator, keep_trajectory=False)
    true_reward = testbed.component_label.log_prob(out.x).gather(1, y[:, None]).squeeze(1)
    objective = (gamma * true_reward - alpha * out.kl).mean()
    return out.x, {"objective": float(objective), "kl": float(out.kl.mean()), "score_evals": n_steps}


def run_suite(testbed: Testbed, *, run_dir: str | Path, n_pairs: int = 2000, n_eval: int = 3000, n_steps: int = 200,
              t_end: float = 1e-3, method: dict[str, Any] | None = None, pathway: dict[str, Any] | None = None,
              classifier: dict[str, Any] | None = None, methods: tuple[str, ...] = METHODS,
              n_floor_draws: int = 5, progress: bool = True) -> SuiteResult:
    """Run the gmm suite's rows on the component label and write its plots into ``run_dir``.

    Args:
        testbed: the mixture, its SDE and labels (``domains.gmm.make_testbed``).
        n_pairs: labelled pairs (x, y) the ``ctrl`` row's classifier learns from.
        n_eval: evaluation requests, drawn from the label prior p(y).
        method: keyword arguments of :func:`ctrl_bio.finetune.finetune` (alpha, gamma, estimator, ...).
        pathway: keyword arguments of :class:`ctrl_bio.model.VectorPathway` (hidden, depth, n_fourier).
        classifier: keyword arguments of :func:`ctrl_bio.reward.train_classifier` plus ``hidden``/``depth``.
        methods: which rows to run.
        n_floor_draws: independent exact sample sets the noise floor averages over.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)} for suite gmm; known: {', '.join(METHODS)}")
    if n_steps < 1 or n_eval < 2 or n_pairs < 10:
        raise ValueError(f"need n_steps >= 1, n_eval >= 2 and data.n_pairs >= 10, got {n_steps}, {n_eval}, {n_pairs}")
    method, pathway, classifier = dict(method or {}), dict(pathway or {}), dict(classifier or {})
    alpha, gamma = float(method.get("alpha", 1.0)), float(method.get("gamma", 1.0))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = testbed.seed
    label, sde, mixture = testbed.component_label, testbed.sde, testbed.mixture
    d, n_classes = testbed.dim, label.n_classes
    true_prior = LabelPrior([label.class_probs()])

    g_eval = torch.Generator().manual_seed(seed + 1000)
    y_eval = true_prior.sample(n_eval, g_eval)[:, 0]
    target = label.sample_target(y_eval, g_eval)
    twins = [label.sample_target(y_eval, g_eval) for _ in range(n_floor_draws)]
    label_name = f"component ({n_classes} classes)"
    rows: list[Row] = []
    samples: dict[str, Tensor] = {"exact target": target}
    histories: dict[str, list[dict]] = {}
    # J* = E_y log p(y) is known only for alpha = gamma = 1 (the target is then exactly p(x|y)).
    optimum = float(true_prior.log_prob(y_eval[:, None]).mean()) if alpha == gamma == 1 else None
    info: dict[str, Any] = {"optimum_objective": optimum, "dim": d, "n_components": mixture.n_components,
                            "n_classes": n_classes}

    def add_row(name: str, score_fn: ScoreFn, seconds: float) -> None:
        start = time.perf_counter()
        g = torch.Generator().manual_seed(seed + 2000)
        x, path_metrics = sample_and_score(testbed, score_fn, y_eval, n_steps=n_steps,
                                           t_end=t_end, alpha=alpha, gamma=gamma, generator=g)
        metrics = evaluate_samples(testbed, x, y_eval, target, twins) | path_metrics
        metrics["seconds"] = seconds + time.perf_counter() - start
        rows.append(Row(name, label_name, metrics))
        samples[name] = x
        log.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})

    def train_ctrl(name: str, reward: LogLikelihoodReward, prior: LabelPrior) -> tuple[AugmentedScore, FinetuneResult]:
        torch.manual_seed(seed)
        model = AugmentedScore(testbed.pretrained, VectorPathway(d, (n_classes,), **pathway), sde)
        result = finetune(model, sde, reward, prior, (d,), n_steps=n_steps, t_end=t_end, seed=seed,
                          checkpoint_path=run_dir / "checkpoints" / f"{name}.safetensors", progress=progress, **method)
        histories[name] = result.history
        info[f"pool_ess_{name}"] = result.pool_ess
        return model, result

    for name in methods:
        if name == "pretrained":
            add_row(name, testbed.pretrained, 0.0)
        elif name == "exact_guidance":
            add_row(name, exact_guidance(testbed.pretrained, label, sde, y_eval), 0.0)
        elif name == "ctrl_oracle_reward":
            model, result = train_ctrl(name, LogLikelihoodReward([label.log_prob]), true_prior)
            add_row(name, model.conditioned(y_eval[:, None]), result.seconds)
        elif name == "ctrl":
            start = time.perf_counter()
            g = torch.Generator().manual_seed(seed + 3000)
            x_pairs, comp = mixture.sample(n_pairs, g)
            y_pairs = label.classes[comp]
            clf_kwargs = {k: v for k, v in classifier.items() if k not in ("hidden", "depth")}
            torch.manual_seed(seed)
            net = mlp_classifier(d, n_classes, hidden=classifier.get("hidden", 128), depth=classifier.get("depth", 2))
            clf, report = train_classifier(net, x_pairs, y_pairs, generator=g, **clf_kwargs)
            info["classifier"] = asdict(report)
            log.info("reward classifier: %s", report)
            prior = LabelPrior.from_labels([y_pairs], (n_classes,))
            model, result = train_ctrl(name, LogLikelihoodReward([clf]), prior)
            add_row(name, model.conditioned(y_eval[:, None]), time.perf_counter() - start)
        elif name == "real_data":
            g = torch.Generator().manual_seed(seed + 4000)
            fresh = label.sample_target(y_eval, g)
            # Exact samples have no paths, hence no KL and no J: only the sample metrics apply.
            metrics = evaluate_samples(testbed, fresh, y_eval, target, twins)
            rows.append(Row(name, label_name, metrics | {"seconds": 0.0}))
    plot_samples(mixture, samples, y_eval, run_dir / "samples.png")
    if histories:
        plot_training_curves(histories, run_dir / "training.png", optimum=info["optimum_objective"])
    return SuiteResult("gmm", rows, info)
