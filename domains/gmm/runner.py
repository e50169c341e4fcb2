"""The gmm suite's rows: the shared context (task, pairs, evaluation) and the runner that trains and samples each
row's method; used by :mod:`domains.gmm.suite` and :mod:`domains.gmm.sweeps` alike."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.blackbox import CallableReward
from ctrl_bio.estimators import Objective, uses_pool
from ctrl_bio.finetune import finetune, sample_pretrained_pool
from ctrl_bio.guidance import (
    NoisyMLPClassifier,
    best_of_n,
    classifier_free_guidance,
    classifier_guidance,
    reconstruction_guidance,
    train_conditional_pathway,
    train_noisy_classifier,
)
from ctrl_bio.labels import (
    LabelledPairs,
    exact_log_prob,
    fit_reward_classifier,
    fit_reward_classifiers,
    load_label,
    split_pairs,
)
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.policy_gradient import finetune_policy_gradient
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import ScoreFn, euler_maruyama, time_grid
from ctrl_bio.settings import settings_for
from domains.gmm.evaluation import LabelTask, distribution_metrics, label_metrics
from domains.gmm.labels import exact_guidance
from domains.gmm.testbed import Testbed

log = logging.getLogger(__name__)


def component_label_spec(testbed: Testbed, n_pairs: int = 2000) -> dict[str, Any]:
    """The definition of ``configs/label/component.yaml``, for callers that run the suite from Python."""
    return {"name": "component", "domain": "gmm", "type": "categorical",
            "classes": testbed.component_label.n_classes,
            "pairs": {"callable": "domains.gmm.pairs:component_pairs", "n": n_pairs},
            "exact": {"callable": "domains.gmm.pairs:component_log_prob"}}


class SuiteContext:
    """What every row of one run shares: the testbed, labels, requests, targets and settings."""

    def __init__(self, testbed: Testbed, task: LabelTask, pairs: list[LabelledPairs], specs: list[dict], *,
                 n_eval: int, n_steps: int, t_end: float, alpha: float, gamma: float, n_floor_draws: int,
                 n_joint_pairs: int):
        self.testbed, self.task, self.pairs, self.specs = testbed, task, pairs, specs
        self.n_joint_pairs = n_joint_pairs
        self.n_steps, self.t_end, self.alpha, self.gamma = n_steps, t_end, alpha, gamma
        seed = testbed.seed
        g_eval = torch.Generator().manual_seed(seed + 1000)
        self.y_eval = task.request_prior().sample(n_eval, g_eval)
        # Guidance scales are chosen on requests of their own, never on the evaluation requests.
        self.y_select = task.request_prior().sample(min(n_eval, 1000), torch.Generator().manual_seed(seed + 1500))
        self.target = task.sample_target(self.y_eval, g_eval)
        self.twins = [task.sample_target(self.y_eval, g_eval) for _ in range(n_floor_draws)] if task.exact else []
        self.times = time_grid(n_steps, t_end)

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self.testbed.x_shape

    def sample(self, score_fn_for: Callable[[Tensor], ScoreFn], y: Tensor, seed_offset: int = 2000,
               times: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples and path KLs for requests y with the score callable built for them (default: the suite's grid)."""
        g = torch.Generator().manual_seed(self.testbed.seed + seed_offset)
        x_init = self.testbed.sde.prior_sampling((y.shape[0], *self.x_shape), generator=g)
        with torch.no_grad():
            out = euler_maruyama(self.testbed.sde, score_fn_for(y), x_init, self.times if times is None else times,
                                 generator=g, keep_trajectory=False)
        return out.x, out.kl

    def score(self, x: Tensor, kl: Tensor | None, y: Tensor) -> dict[str, float]:
        """Every metric of samples x for requests y; J and KL when the samples have paths."""
        metrics = label_metrics(self.task, x, y)
        if self.target is not None:
            metrics |= distribution_metrics(self.task, x, y, self.target, self.twins)
        if kl is not None:
            metrics["objective"] = float((self.gamma * self.task.log_likelihood(x, y) - self.alpha * kl).mean())
            metrics["kl"] = float(kl.mean())
        return metrics


def build_task(testbed: Testbed, specs: list[dict], oracle_fraction: float, n_pairs: int | None = None
               ) -> tuple[LabelTask, list[LabelledPairs], dict[str, Any]]:
    """Load every label's pairs (each from its own seed: separate data sets) and its evaluation likelihood.

    ``n_pairs``, if given, replaces every label's own ``pairs.n`` (the label-budget sweep).

    A label without an exact likelihood is evaluated by an oracle classifier trained on a disjoint share of
    its pairs (``oracle_fraction``); the reward classifier never sees those pairs.
    """
    pairs, eval_fns, info, all_exact = [], [], {}, True
    for k, spec in enumerate(specs):
        if n_pairs is not None:
            spec["pairs"]["n"] = n_pairs
        p = load_label(spec, domain=testbed, seed=testbed.seed + 7919 * (k + 1))
        exact = exact_log_prob(spec, testbed)
        all_exact = all_exact and exact is not None
        if exact is None:
            p, held_out = split_pairs(p, oracle_fraction, torch.Generator().manual_seed(testbed.seed + 11 * k))
            oracle, report = fit_reward_classifier(held_out, spec, seed=testbed.seed + 13 * (k + 1))
            info[f"oracle_{spec['name']}"] = asdict(report)
            exact_fn: Callable[[Tensor], Tensor] = oracle
        else:
            exact_fn = exact
        pairs.append(p)
        eval_fns.append(exact_fn)
        info[f"pairs_{spec['name']}"] = {"n": len(p), "source": p.source, "skipped": p.skipped}
        if p.n_skipped:
            log.warning("label %s: %d rows of %s skipped %s", spec["name"], p.n_skipped, p.source, p.skipped)
    component = len(specs) == 1 and specs[0].get("pairs", {}).get("callable", "").endswith(":component_pairs")
    task = LabelTask(testbed, [s["name"] for s in specs], tuple(p.n_classes for p in pairs), eval_fns,
                     exact=all_exact, component_label=component and all_exact)
    return task, pairs, info


def joint_pairs(ctx: SuiteContext, n: int) -> tuple[Tensor, Tensor]:
    """Pairs that carry every label at once: fresh mixture samples with y_k ~ p_k(. | x) for each label.

    With one label these are that label's own pairs; with several, CFG needs them (it models p(x | y_1, y_2)
    directly), while CTRL learns from each label's separate pairs.
    """
    if len(ctx.pairs) == 1:
        return ctx.pairs[0].x, ctx.pairs[0].y[:, None]
    g = torch.Generator().manual_seed(ctx.testbed.seed + 6000)
    x, _ = ctx.testbed.mixture.sample(n, g)
    y = torch.stack([torch.multinomial(f(x).exp(), 1, generator=g).squeeze(1) for f in ctx.task.eval_log_probs], 1)
    return x, y


def sweep_scale(ctx: SuiteContext, make: Callable[[float], Callable[[Tensor], ScoreFn]],
                scales: list[float]) -> tuple[float, dict[str, dict[str, float]]]:
    """The guidance scale with the highest objective J on requests of their own (never the evaluation ones).

    J = E[log p(y|x)] - KL under the evaluation likelihood is what every method is asked to maximise (its
    optimum is the target p(x|y)); accuracy alone would pick the largest scale, which over-sharpens and
    drops the distribution (DESIGN.md). Accuracy per scale is recorded beside J.
    """
    scores = {}
    for w in scales:
        x, kl = ctx.sample(make(w), ctx.y_select, seed_offset=2500)
        objective = (ctx.gamma * ctx.task.log_likelihood(x, ctx.y_select) - ctx.alpha * kl).mean()
        scores[str(w)] = {"accuracy": label_metrics(ctx.task, x, ctx.y_select)["accuracy"],
                          "objective": float(objective)}
    best = max(scales, key=lambda w: scores[str(w)]["objective"])
    return best, scores


class RowRunner:
    """Builds, trains and samples each row's method; classifiers and pools are built once and shared."""

    def __init__(self, ctx: SuiteContext, method: dict, pathway: dict, baselines: dict, run_dir: Path,
                 progress: bool, info: dict, histories: dict, pool: Tensor | None = None):
        self.ctx, self.method, self.pathway, self.baselines = ctx, method, pathway, baselines
        self.run_dir, self.progress, self.info, self.histories = run_dir, progress, info, histories
        self._reward: LogLikelihoodReward | None = None
        self._reward_seconds = 0.0
        self._reward_charged = False
        self._pool = pool  # pre-trained samples, if a caller already drew them (they do not depend on labels)

    # --- shared pieces -------------------------------------------------------------------------------
    def reward_classifiers(self) -> LogLikelihoodReward:
        """One calibrated classifier per label, each from its own pairs (CTRL step 1)."""
        if self._reward is None:
            start = time.perf_counter()
            self._reward, _ = fit_reward_classifiers(self.ctx.specs, self.ctx.pairs, seed=self.ctx.testbed.seed,
                                                     info=self.info)
            self._reward_seconds = time.perf_counter() - start
        return self._reward

    def shared_seconds(self) -> dict[str, float]:
        """The reward classifiers' training time, charged once to each row that uses them: to the row that
        built them through its wall time, to later rows through this entry."""
        if not self._reward_charged:
            self._reward_charged = True
            return {}
        return {"shared_seconds": self._reward_seconds}

    def pool(self) -> Tensor:
        """Pre-trained samples shared by every score-matching fine-tuning of this run."""
        if self._pool is None:
            ctx = self.ctx
            model = self.new_model()
            self._pool = sample_pretrained_pool(model, ctx.testbed.sde, ctx.x_shape,
                                                int(self.method.get("pool_size", 20000)), n_steps=ctx.n_steps,
                                                t_end=ctx.t_end, generator=torch.Generator().manual_seed(
                                                    ctx.testbed.seed + 7000))
        return self._pool

    @property
    def drawn_pool(self) -> Tensor | None:
        """The pre-trained samples if a row has drawn (or a caller handed) them, else None; draws nothing."""
        return self._pool

    def new_model(self) -> AugmentedScore:
        ctx = self.ctx
        torch.manual_seed(ctx.testbed.seed)
        return AugmentedScore(ctx.testbed.pretrained, VectorPathway(ctx.testbed.dim, ctx.task.n_classes,
                                                                    **self.pathway), ctx.testbed.sde)

    def train_ctrl(self, name: str, reward: LogLikelihoodReward, prior: LabelPrior) -> AugmentedScore:
        ctx = self.ctx
        model = self.new_model()
        # The pool is this suite's own pre-trained samples (pool: pretrained); no line search along the control.
        kwargs = settings_for({k: v for k, v in self.method.items() if k != "pool_size"}, finetune, "suite gmm")
        pooled = uses_pool(kwargs.get("estimator", "score_matching"), bool(kwargs.get("warm_start", False)))
        pool = self.pool() if pooled else None
        result = finetune(model, ctx.testbed.sde, reward, prior, ctx.x_shape, n_steps=ctx.n_steps, t_end=ctx.t_end,
                          seed=ctx.testbed.seed, checkpoint_path=self.run_dir / "checkpoints" / f"{name}.safetensors",
                          progress=self.progress, pool_x0=pool, **kwargs)
        # Score matching asks the reward once per pool sample, all before training (for the queries plot).
        queries = int(pool.shape[0]) if pooled else 0
        self.histories[name] = [h | {"reward_queries": queries} for h in result.history]
        self.info[f"pool_ess_{name}"] = result.pool_ess
        return model

    # --- rows ----------------------------------------------------------------------------------------
    def run(self, name: str) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        """(samples, path KL or None, extra metrics) of one row for the evaluation requests."""
        ctx, pre = self.ctx, self.ctx.testbed.pretrained
        steps = {"score_evals": ctx.n_steps}
        if name == "pretrained":
            x, kl = ctx.sample(lambda y: pre, ctx.y_eval)
            return x, kl, steps
        if name == "exact_guidance":
            label, sde = ctx.testbed.component_label, ctx.testbed.sde
            x, kl = ctx.sample(lambda y: exact_guidance(pre, label, sde, y[:, 0]), ctx.y_eval)
            return x, kl, steps
        if name == "real_data":
            return ctx.task.sample_target(ctx.y_eval, torch.Generator().manual_seed(ctx.testbed.seed + 4000)), \
                None, {}
        if name == "ctrl_oracle_reward":
            model = self.train_ctrl(name, LogLikelihoodReward(ctx.task.eval_log_probs), ctx.task.request_prior())
            x, kl = ctx.sample(model.conditioned, ctx.y_eval)
            return x, kl, steps
        if name == "ctrl":
            reward = self.reward_classifiers()
            prior = LabelPrior.from_labels([p.y for p in ctx.pairs], [p.n_classes for p in ctx.pairs])
            model = self.train_ctrl(name, reward, prior)
            x, kl = ctx.sample(model.conditioned, ctx.y_eval)
            return x, kl, steps | self.shared_seconds()
        return getattr(self, f"row_{name}")()

    def row_ctrl_pg(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        return self.policy_gradient_row("ctrl_pg")

    def row_ddpo(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        return self.policy_gradient_row("ddpo")

    def policy_gradient_row(self, variant: str) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Policy gradient on the evaluation likelihood given as a black box (values only, no gradient)."""
        ctx, cfg = self.ctx, self.baselines["policy_gradient"]
        settings = dict(cfg.get("settings") or {}) | ({"variant": variant} if variant == "ctrl_pg" else
                                                      dict(cfg.get("ddpo") or {}) | {"variant": "ddpo"})
        settings["alpha"] = Objective.of(self.method).alpha  # the run's one KL weight
        if variant == "ddpo":  # published DDPO is on-policy only: no pre-trained pool, no warm start
            settings |= {"reference_pool": 0, "reference_updates": 0}
        n_train = int(settings.pop("n_steps", 50))
        for key in ("seed", "progress", "checkpoint_path", "t_end"):
            settings.pop(key, None)
        # Values only: the scorer sees detached samples and its output is read as plain numbers.
        reward = CallableReward(ctx.task.log_likelihood, decode=lambda x0: x0.detach())
        torch.manual_seed(ctx.testbed.seed)
        model = AugmentedScore(ctx.testbed.pretrained, VectorPathway(ctx.testbed.dim, ctx.task.n_classes,
                                                                     **dict(cfg.get("pathway") or {})), ctx.testbed.sde)
        result = finetune_policy_gradient(
            model, ctx.testbed.sde, reward, ctx.task.request_prior(), ctx.x_shape, n_steps=n_train, t_end=ctx.t_end,
            seed=ctx.testbed.seed, progress=self.progress,
            checkpoint_path=self.run_dir / "checkpoints" / f"{variant}.safetensors", **settings)
        self.histories[variant] = result.history
        # Step-count independence: the same model sampled with the training grid as well.
        x_train, kl_train = ctx.sample(model.conditioned, ctx.y_eval, times=time_grid(n_train, ctx.t_end))
        at_train = {f"{k}_train_steps": v for k, v in ctx.score(x_train, kl_train, ctx.y_eval).items()
                    if k in ("accuracy", "distance_to_target", "component_tv", "objective")}
        x, kl = ctx.sample(model.conditioned, ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "train_steps": n_train, "failed_rewards": result.failed_rewards,
                       "reward_queries": result.history[-1]["reward_queries"]} | at_train

    def row_cfg(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx, cfg = self.ctx, dict(self.baselines.get("cfg", {}))
        scales = list(cfg.pop("scales", [1.0, 1.5, 2.0, 3.0, 5.0]))
        x_pairs, y_pairs = joint_pairs(ctx, ctx.n_joint_pairs)
        model = self.new_model()
        record = train_conditional_pathway(model, ctx.testbed.sde, x_pairs, y_pairs, t_end=ctx.t_end,
                                           generator=torch.Generator().manual_seed(ctx.testbed.seed + 8000),
                                           progress=self.progress, **cfg)
        best, accs = sweep_scale(ctx, lambda w: lambda y: classifier_free_guidance(model, y, w), scales)
        self.info["cfg"] = {"pairs": int(x_pairs.shape[0]), "per_scale": accs, "losses": record.losses}
        x, kl = ctx.sample(lambda y: classifier_free_guidance(model, y, best), ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "guidance_scale": best, "pairs_used": x_pairs.shape[0]}

    def row_classifier_guidance(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx, cg = self.ctx, dict(self.baselines.get("classifier_guidance", {}))
        scales = list(cg.pop("scales", [1.0, 2.0, 4.0]))
        net_kwargs = {k: cg.pop(k) for k in ("hidden", "depth") if k in cg}
        x_pairs, y_pairs = joint_pairs(ctx, ctx.n_joint_pairs)
        nets = []
        for k, n in enumerate(ctx.task.n_classes):
            torch.manual_seed(ctx.testbed.seed + k)
            net = NoisyMLPClassifier(ctx.testbed.dim, n, **net_kwargs)
            # One noisy classifier per label on the pairs carrying it: with several labels, the joint pairs.
            train_noisy_classifier(net, ctx.testbed.sde, x_pairs, y_pairs[:, k], t_end=ctx.t_end,
                                            generator=torch.Generator().manual_seed(ctx.testbed.seed + 8100 + k),
                                            progress=self.progress, **cg)
            nets.append(net)

        def noisy_ll(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return sum(net(x, t).log_softmax(1).gather(1, y[:, k:k + 1]).squeeze(1) for k, net in enumerate(nets))

        pre = ctx.testbed.pretrained
        best, accs = sweep_scale(ctx, lambda w: lambda y: classifier_guidance(pre, noisy_ll, y, w), scales)
        self.info["classifier_guidance"] = {"pairs": int(x_pairs.shape[0]), "per_scale": accs}
        x, kl = ctx.sample(lambda y: classifier_guidance(pre, noisy_ll, y, best), ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "guidance_scale": best, "pairs_used": x_pairs.shape[0]}

    def row_dps(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx = self.ctx
        scales = list(self.baselines.get("dps", {}).get("scales", [0.1, 0.3, 1.0, 3.0]))
        reward, pre, sde = self.reward_classifiers(), ctx.testbed.pretrained, ctx.testbed.sde
        best, accs = sweep_scale(ctx, lambda w: lambda y: reconstruction_guidance(pre, sde, reward, y, w), scales)
        self.info["dps"] = {"per_scale": accs}
        x, kl = ctx.sample(lambda y: reconstruction_guidance(pre, sde, reward, y, best), ctx.y_eval)
        # A forward and a backward pass through the score network per step: about three evaluations.
        return x, kl, {"score_evals": 3 * ctx.n_steps, "guidance_scale": best} | self.shared_seconds()

    def row_best_of_n(self) -> tuple[Tensor, None, dict[str, float]]:
        ctx = self.ctx
        n = int(self.baselines.get("best_of_n", {}).get("n", 8))
        reward = self.reward_classifiers()
        x = best_of_n(ctx.testbed.sde, ctx.testbed.pretrained, reward, ctx.y_eval, ctx.x_shape, ctx.times, n,
                      generator=torch.Generator().manual_seed(ctx.testbed.seed + 9000))
        # Selection is not a path measure: best-of-N has no path KL, so no J either.
        return x, None, {"score_evals": n * ctx.n_steps, "n": n} | self.shared_seconds()
