"""The rows every domain suite shares: CTRL, its ablation and the baselines, trained and sampled the same way.

A domain suite (DNA, images, ...) supplies a :class:`SuiteContext`: its domain, labels and pairs, requests, sampler
and real held-out data. :class:`RowRunner` builds each row on it (DESIGN.md's method names):

- ``pretrained``: the frozen network; the floor. ``real_data``: held-out real samples with the requested labels.
- ``optimum``: J's optimum, pre-trained samples tilted by p(y|x)^(gamma/alpha) (:mod:`ctrl_bio.optimum`).
- ``ctrl``: :func:`ctrl_bio.finetune.finetune` with one calibrated reward classifier per label, each from its own pairs.
- ``ctrl_alpha0``: ``ctrl``'s pathway continued by pathwise gradients with the KL weight near zero (what the KL holds).
- the baselines ``cfg``, ``classifier_guidance``, ``dps``, ``best_of_n`` and, when asked, ``ctrl_pg`` and ``ddpo``
  (:mod:`ctrl_bio.baseline_rows`).

Guidance scales are chosen by the reward classifier's J = gamma E[log p(y|x)] - alpha KL on requests of their own,
CTRL's own objective with its gamma and alpha: the evaluation oracle or exact label is never consulted for a choice.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ctrl_bio.baseline_rows import BaselineRows, RowOutput
from ctrl_bio.domain import Domain
from ctrl_bio.estimators import uses_pool
from ctrl_bio.estimators.soft_value import DenoisedRewardValue, value_guided_score
from ctrl_bio.finetune import finetune, save_pathway_checkpoint
from ctrl_bio.guidance import classifier_free_guidance, train_conditional_pathway
from ctrl_bio.harness import Row
from ctrl_bio.label_space import CategoricalLabels
from ctrl_bio.labels import LabelledPairs, evaluation_log_prob, fit_reward_classifiers, load_label
from ctrl_bio.metrics import label_metrics, objective_metrics  # noqa: F401  (the suites import them from here)
from ctrl_bio.objective import Objective, WeightedPool
from ctrl_bio.optimum import add_fraction_of_optimum, ctrl_pool, draw_tilted
from ctrl_bio.plots import plot_fraction_of_optimum, plot_reward_vs_queries, plot_training_curves
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import ScoreFn, Spacing, sample_in_batches, time_grid
from ctrl_bio.settings import autocast, check_precision, resolve_device

log = logging.getLogger(__name__)

METHODS = ("pretrained", "optimum", "ctrl", "ctrl_alpha0", "cfg", "classifier_guidance", "dps", "best_of_n",
           "real_data")
#: Rows a suite runs only when asked (``suite.methods``): policy gradients on the exact label as a black-box reward.
POLICY_GRADIENT_METHODS = ("ctrl_pg", "ddpo")
KNOWN_METHODS = METHODS + POLICY_GRADIENT_METHODS
#: What each baseline row reads from ``suite.baselines.<row>``. ``cfg`` passes the rest of its keys to
#: :func:`ctrl_bio.guidance.train_conditional_pathway`; ``classifier_guidance`` passes its network's keys to the
#: domain's ``noisy_classifier`` (open: a domain's own), which refuses what it does not take.
BASELINE_KEYS: dict[str, frozenset[str] | None] = {
    "cfg": frozenset({"scales"} | set(inspect.signature(train_conditional_pathway).parameters)
                     - {"model", "sde", "x", "y", "t_end", "generator", "progress"}),
    "classifier_guidance": None, "dps": frozenset({"scales"}), "best_of_n": frozenset({"n"}),
    "optimum": frozenset({"n", "reward"}), "policy_gradient": frozenset({"settings", "ddpo"})}


def check_baselines(baselines: dict[str, Any]) -> None:
    """Refuse, in one line, a baseline or a baseline setting that no row reads (a silently ignored key)."""
    for row, settings in baselines.items():
        if row not in BASELINE_KEYS:
            raise ValueError(f"suite.baselines.{row}: no such baseline row (known: {', '.join(BASELINE_KEYS)})")
        known = BASELINE_KEYS[row]
        unknown = sorted(set(settings or {}) - known) if known is not None else []
        if unknown:
            raise ValueError(f"suite.baselines.{row}.{unknown[0]}: the {row} row reads only {', '.join(sorted(known))}")


def load_task(labels: Sequence[dict[str, Any]], domain: Any, seed: int
              ) -> tuple[list[dict], list[LabelledPairs], list[Callable[[Tensor], Tensor]], dict[str, Any]]:
    """A suite's label task: the definitions, each label's own pairs (its own seed), each label's evaluation
    likelihood (exact function or oracle, never a reward classifier), and an ``info`` record of where the pairs came
    from and what was skipped."""
    if not labels:
        raise ValueError("a suite needs at least one label (label=<name> or label=[<name>,<name>])")
    specs = copy.deepcopy(list(labels))
    pairs, eval_fns, info = [], [], {}
    for k, spec in enumerate(specs):
        p = load_label(spec, domain=domain, seed=seed + 7919 * (k + 1))
        pairs.append(p)
        eval_fns.append(evaluation_log_prob(spec, domain))
        info[f"pairs_{spec['name']}"] = {"n": len(p), "source": p.source, "skipped": p.skipped}
    return specs, pairs, eval_fns, info


def balanced_requests(n_classes: tuple[int, ...], n: int) -> Tensor:
    """n requests cycling through every label combination, (n, K): every class equally often."""
    combos = torch.cartesian_prod(*[torch.arange(c) for c in n_classes]).reshape(-1, len(n_classes))
    return combos.repeat((n + combos.shape[0] - 1) // combos.shape[0], 1)[:n]


class SuiteContext(Protocol):
    """What a domain suite shares between its rows.

    Attributes:
        domain: the domain (its SDE, sample shape and ``augment``).
        specs, pairs: the label definitions and each label's own pairs.
        n_classes: classes per label.
        n_steps, t_end, spacing: the sampler every row uses.
        seed: the suite's seed.
        pretrained: the frozen pre-trained score network.
        y_eval, y_select: evaluation requests, and the separate requests guidance scales are chosen on.
        x_train: the pre-trained model's unlabelled training data (``ctrl``'s ``pool: training``).
        device: where the pre-trained network sits and paths are sampled (``device=``); data, requests, samples
            and scores stay on the CPU, and every generator is a seeded CPU one.
        precision: ``32``, or ``bf16-mixed``: sampling under bfloat16 autocast, samples returned in float32.
    """

    domain: Domain
    specs: list[dict]
    pairs: list[LabelledPairs]
    n_classes: tuple[int, ...]
    n_steps: int
    t_end: float
    spacing: Spacing
    seed: int
    pretrained: nn.Module
    y_eval: Tensor
    y_select: Tensor
    x_train: Tensor
    device: str
    precision: str

    def sample(self, score_fn_for: Callable[[Tensor], ScoreFn], y: Tensor, seed_offset: int = 2000
               ) -> tuple[Tensor, Tensor]:
        """Samples and path KLs for requests y (the same noise for every row at one offset)."""
        ...

    def real_requests(self, y: Tensor, seed: int) -> Tensor:
        """Held-out real samples carrying the requested labels."""
        ...

    def noisy_classifier(self, n_classes: int, **kwargs: Any) -> nn.Module:
        """A fresh classifier of noisy samples ``(x_t, t) -> logits`` for ``classifier_guidance``."""
        ...


class BaseSuiteContext:
    """The part of a :class:`SuiteContext` every domain suite shares: the task, the sampler, the requests, the frozen
    pre-trained network, batched sampling and real held-out requests. A domain's context calls this ``__init__``,
    then sets ``x_test`` (held-out real samples), ``test_labels`` (their classes, (N, K)) and ``x_train``, and adds
    its ``score`` and ``noisy_classifier``.
    """

    x_test: Tensor
    test_labels: Tensor

    def __init__(self, domain: Domain, specs: list[dict], pairs: list[LabelledPairs],
                 eval_fns: list[Callable[[Tensor], Tensor]], *, n_eval: int, n_select: int, n_steps: int,
                 t_end: float, spacing: Spacing, seed: int, batch_size: int, objective: Objective,
                 device: str = "cpu", precision: str = "32"):
        self.domain, self.specs, self.pairs, self.eval_fns = domain, specs, pairs, eval_fns
        self.device, self.precision = resolve_device(device), check_precision(precision)
        self.names = [s["name"] for s in specs]
        self.n_classes = tuple(int(p.n_classes) for p in pairs)
        self.n_steps, self.t_end, self.spacing, self.seed, self.batch_size = n_steps, t_end, spacing, seed, batch_size
        self.objective = objective
        self.times = time_grid(n_steps, t_end, spacing=spacing)
        self.pretrained = domain.pretrained_model().to(self.device)
        self.y_eval = balanced_requests(self.n_classes, n_eval)
        self.y_select = balanced_requests(self.n_classes, n_select)

    def sample(self, score_fn_for: Callable[[Tensor], ScoreFn], y: Tensor, seed_offset: int = 2000
               ) -> tuple[Tensor, Tensor]:
        """Samples and path KLs for requests y, in batches (the same noise for every row at one offset), computed on
        ``device`` from a CPU generator and returned on the CPU."""
        g = torch.Generator().manual_seed(self.seed + seed_offset)
        with autocast(self.device, self.precision):
            x, kl = sample_in_batches(self.domain.sde, score_fn_for, y, self.domain.x_shape, self.times,
                                      self.batch_size, g, device=self.device)
        return x.float().cpu(), kl.float().cpu()

    def real_requests(self, y: Tensor, seed: int) -> Tensor:
        """Held-out real samples with the requested labels, drawn per request (with replacement)."""
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(y.shape[0], *self.domain.x_shape)
        for combo in torch.unique(y, dim=0):
            rows = (y == combo).all(1).nonzero().squeeze(1)
            match = (self.test_labels == combo).all(1).nonzero().squeeze(1)
            if match.numel() == 0:
                raise ValueError(f"no held-out real sample carries the labels {combo.tolist()} of {self.names}")
            out[rows] = self.x_test[match[torch.randint(match.numel(), (rows.numel(),), generator=g)]]
        return out


class RowRunner(BaselineRows):
    """Builds, trains and samples each row; the reward classifiers and the pre-trained samples are shared.

    Args:
        ctx: the domain suite's context.
        method: keyword arguments of :func:`ctrl_bio.finetune.finetune` for ``ctrl`` plus ``pool``: ``training``
            (score matching resamples the pre-trained model's unlabelled training data) or ``pretrained`` (its
            samples, passed through the domain's ``project`` where it has one, e.g. snapped to one-hot graphs), and
            ``pool_size``.
        alpha0: settings of ``ctrl_alpha0``: ``alpha``, ``steps``, ``batch_size``, ``lr``, ``grad_last_k``.
        baselines: settings of ``cfg``, ``classifier_guidance`` (``hidden`` and other keyword arguments go to
            ``ctx.noisy_classifier``), ``dps``, ``best_of_n`` and ``policy_gradient`` (``settings``: keyword arguments
            of :func:`ctrl_bio.policy_gradient.finetune_policy_gradient` for ``ctrl_pg``; ``ddpo``: overrides for
            ``ddpo``).
        run_dir: where ``ctrl`` writes its checkpoint.
        info: the suite's ``info`` record; rows add what they trained and chose.
    """

    def __init__(self, ctx: SuiteContext, method: dict, alpha0: dict, baselines: dict, run_dir: Path, progress: bool,
                 info: dict):
        check_baselines(baselines)
        self.ctx, self.method, self.alpha0, self.baselines = ctx, method, alpha0, baselines
        self.objective = Objective.of(method)
        self.run_dir, self.progress, self.info = Path(run_dir), progress, info
        # Kept in ``info`` too, so that results.json holds the curves behind training.png and reward_vs_queries.png.
        self.histories: dict[str, list[dict]] = info.setdefault("histories", {})
        self._reward: LogLikelihoodReward | None = None
        self._reward_seconds, self._charged = 0.0, False
        self._chunks: dict[int, Tensor] = {}
        self._chunk_seconds: dict[int, float] = {}
        self._ctrl = None

    def reward(self) -> LogLikelihoodReward:
        """One calibrated classifier per label from its own pairs (CTRL step 1)."""
        if self._reward is None:
            start = time.perf_counter()
            self._reward, _ = fit_reward_classifiers(self.ctx.specs, self.ctx.pairs, seed=self.ctx.seed, info=self.info)
            for f in self._reward.log_prob_fns:  # fitted on the CPU; then beside the rows' models
                if isinstance(f, nn.Module):
                    f.to(self.ctx.device)
            self._reward_seconds = time.perf_counter() - start
        return self._reward

    def shared_seconds(self) -> dict[str, float]:
        """Reward-classifier training time, charged to the row that trained them and again to later rows."""
        if not self._charged:
            self._charged = True
            return {}
        return {"shared_seconds": self._reward_seconds}

    def label_prior(self) -> LabelPrior:
        """p(y): each label's empirical class frequencies in its pairs, independent across labels."""
        return LabelPrior.from_labels([p.y for p in self.ctx.pairs], list(self.ctx.n_classes))

    def pretrained_chunk(self, k: int) -> Tensor:
        """The k-th set of n_eval pre-trained samples (its own noise); chunk 0 is the ``pretrained`` row and
        chunks 0..N-1 are best_of_n's candidates (pre-trained samples do not depend on the request)."""
        if k not in self._chunks:
            ctx, start = self.ctx, time.perf_counter()
            y = torch.zeros(ctx.y_eval.shape[0], len(ctx.n_classes), dtype=torch.long)
            self._chunks[k] = ctx.sample(lambda _y: ctx.pretrained, y, seed_offset=7000 + k)[0]
            self._chunk_seconds[k] = time.perf_counter() - start
        return self._chunks[k]

    def reused_chunk_seconds(self, chunks: Sequence[int]) -> float:
        """Sampling seconds of those of ``chunks`` already drawn by an earlier row (charged again to the row reusing
        them, so that each row's seconds are what it would cost alone)."""
        return sum(self._chunk_seconds[k] for k in chunks if k in self._chunks)

    def new_model(self):
        """The augmented model with a fresh zero-initialised pathway (seeded), on the suite's device."""
        torch.manual_seed(self.ctx.seed)
        return self.ctx.domain.augment(self.ctx.pretrained, self.ctx.n_classes).to(self.ctx.device)

    def select_scale(self, make: Callable[[float], Callable[[Tensor], ScoreFn]], scales: list[float]
                     ) -> tuple[float, dict]:
        """The scale with the best J = gamma E[log p_reward(y|x)] - alpha KL on the selection requests.

        The same objective CTRL maximises, with the reward classifier every learned row has (never the oracle), so
        each baseline is tuned for the same target p_pre(x) p(y|x)^(gamma/alpha) as ``ctrl``.
        """
        ctx, reward, scores = self.ctx, self.reward(), {}
        for w in scales:
            x, kl = ctx.sample(make(w), ctx.y_select, seed_offset=2500)
            scores[str(w)] = float(self.objective.value(reward(x, ctx.y_select), kl).mean())
        return max(scales, key=lambda w: scores[str(w)]), scores

    def run(self, name: str) -> RowOutput:
        ctx = self.ctx
        if name not in KNOWN_METHODS:
            raise ValueError(f"unknown method '{name}'; known: {', '.join(KNOWN_METHODS)}")
        if name == "pretrained":
            return self.pretrained_chunk(0), torch.zeros(ctx.y_eval.shape[0]), {"score_evals": ctx.n_steps}
        if name == "real_data":
            return ctx.real_requests(ctx.y_eval, ctx.seed + 4000), None, {}
        return getattr(self, f"row_{name}")()

    def row_ctrl(self) -> RowOutput:
        ctx, settings = self.ctx, dict(self.method)
        reward = self.reward()
        source = settings.pop("pool", "training")
        pool_size = int(settings.pop("pool_size", 8192))
        scales = [float(w) for w in settings.pop("control_scales", [1.0])]
        # Only the estimators that read a pool get one; the others draw their own trajectories, and the row's
        # info says that method.pool / method.pool_size went unused rather than naming a pool nobody read.
        pooled = uses_pool(settings.get("estimator", "score_matching"), bool(settings.get("warm_start", False)))
        pool = ctrl_pool(ctx, source, pool_size) if pooled else None
        if not pooled:
            log.info("ctrl: estimator %s takes no pool; method.pool and method.pool_size are not used",
                     settings.get("estimator"))
        value_model = settings.pop("value_model", "noisy_classifier")
        if settings.get("estimator") == "soft_value":
            settings["value_net"] = self.value_network(value_model, reward)
        elif value_model != "noisy_classifier":
            raise ValueError(f"method.value_model={value_model!r} is for the soft_value estimator only")
        model = self.new_model()
        result = finetune(model, ctx.domain.sde, reward, self.label_prior(), ctx.domain.x_shape, n_steps=ctx.n_steps,
                          t_end=ctx.t_end, spacing=ctx.spacing, seed=ctx.seed, progress=self.progress, pool_x0=pool,
                          checkpoint_path=self.run_dir / "checkpoints" / "ctrl.safetensors", **settings)
        self.histories["ctrl"] = result.history
        self.info["ctrl"] = {"pool": source if pooled else None, "pool_size": int(pool.shape[0]) if pooled else 0,
                             "pool_ess": result.pool_ess,
                             "train_seconds": result.seconds, "prepared": result.prepared,
                             "stopped_by": result.stopped_by, "kept": result.kept}
        if result.control_fit:
            self.info["ctrl"]["control_fit"] = result.control_fit
        if isinstance(settings.get("value_net"), DenoisedRewardValue):  # the fitted calibration of V in t
            grid = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9], device=ctx.device)
            self.info["ctrl"]["value_scale"] = dict(zip(grid.tolist(), settings["value_net"].scale(grid).tolist()))
        self._ctrl = model
        if settings.get("value_distill") == "none":
            # Nothing was distilled: the control is grad V itself, and the fitted V is what the run saves.
            save_pathway_checkpoint(dict(settings["value_net"].state_dict()),
                                    self.run_dir / "checkpoints" / "ctrl_value.safetensors")
            self.info["ctrl"]["sampling"] = "s_pre + grad V: one gradient of V per sampler step (no distillation)"
            # The denoised-reward V runs the score network forward and backward on top of s_pre (as dps counts).
            score_evals = (4 if isinstance(settings["value_net"], DenoisedRewardValue) else 1) * ctx.n_steps
            n_classes = self.label_prior().n_classes

            def controlled(w: float) -> Callable[[Tensor], ScoreFn]:
                # The frozen network itself for s_pre: the untrained pathway adds nothing but its own cost per step.
                return lambda y: value_guided_score(ctx.pretrained, settings["value_net"], n_classes, y, w)
        else:
            score_evals = ctx.n_steps

            def controlled(w: float) -> Callable[[Tensor], ScoreFn]:
                return lambda y: classifier_free_guidance(model, y, w)
        if scales == [1.0]:
            x, kl = ctx.sample(controlled(1.0), ctx.y_eval)
            return x, kl, {"score_evals": score_evals} | self.shared_seconds()
        # A line search of J along the learned control: s_pre + w u. w = 1 is the fitted optimum; a fit that
        # under-reaches it (a shrunk u) is what w > 1 can correct. Chosen by the same rule as the baselines' scales.
        best, per_scale = self.select_scale(controlled, scales)
        self.info["ctrl"] |= {"per_scale_reward_J": per_scale}
        x, kl = ctx.sample(controlled(best), ctx.y_eval)
        return x, kl, {"score_evals": score_evals, "guidance_scale": best} | self.shared_seconds()

    def value_network(self, value_model: str, reward: LogLikelihoodReward) -> torch.nn.Module:
        """The soft value's V: the domain's noisy-classifier architecture on x_t (``noisy_classifier``), or the reward
        classifier at the pre-trained denoiser's estimate with a fitted calibration in t (``denoised_reward``)."""
        ctx = self.ctx
        torch.manual_seed(ctx.seed + 7300)
        if value_model == "noisy_classifier":
            hidden = {k: v for k, v in self.baselines.get("classifier_guidance", {}).items() if k == "hidden"}
            return ctx.noisy_classifier(math.prod(ctx.n_classes), **hidden)
        if value_model == "denoised_reward":
            combos = CategoricalLabels(ctx.n_classes).combinations().to(ctx.device)
            return DenoisedRewardValue(ctx.pretrained, ctx.domain.sde, reward.log_prob_fns, combos)
        raise ValueError(f"method.value_model must be 'noisy_classifier' or 'denoised_reward', got {value_model!r}")

    def row_optimum(self) -> RowOutput:
        """J's optimum with this pre-trained model and reward classifier: ``n`` pre-trained samples (projected onto
        the data's support where the domain can) resampled per request with weights p(y|x)^(gamma/alpha)
        (:mod:`ctrl_bio.optimum`). Its KL is the tilted pool's. The pool holds the ``pretrained`` row's and
        ``best_of_n``'s pre-trained samples and more, drawn once for the three rows.

        ``reward: exact`` tilts by the labels' exact functions instead: the optimum of the objective ``ctrl_pg`` and
        ``ddpo`` optimise (they query the exact label as their reward); the default, ``classifier``, is ``ctrl``'s."""
        settings = self.baselines.get("optimum", {})
        ctx, n, source = self.ctx, int(settings.get("n", 2048)), settings.get("reward", "classifier")
        if source not in ("classifier", "exact"):
            raise ValueError(f"suite.baselines.optimum.reward must be classifier or exact, got {source!r}")
        log_prob_fns = (self.reward().log_prob_fns if source == "classifier"
                        else self.exact_log_probs("optimum.reward=exact tilts by the label's exact function"))
        chunks = range(math.ceil(n / ctx.y_eval.shape[0]))  # best_of_n's candidates are the first of these
        reused = self.reused_chunk_seconds(chunks)
        pool = torch.cat([self.pretrained_chunk(k) for k in chunks])[:n]
        project = getattr(ctx.domain, "project", None)
        pool = project(pool) if project is not None else pool
        with torch.no_grad():
            weighted = WeightedPool(pool, [f(pool) for f in log_prob_fns], tilt=self.objective.tilt)
        draw = draw_tilted(weighted, ctx.y_eval, torch.Generator().manual_seed(ctx.seed + 7200))
        self.info["optimum"] = {"pool_size": n, "tilt": self.objective.tilt, "ess": draw.ess, "reward": source}
        extra = {"effective_sample_size": draw.ess, "score_evals": ctx.n_steps} | self.shared_seconds()
        if reused:
            extra["shared_seconds"] = extra.get("shared_seconds", 0.0) + reused
        return draw.x, draw.kl, extra

    def row_ctrl_alpha0(self) -> RowOutput:
        """CTRL's pathway, then pathwise updates of J with alpha ~ 0: the reward alone, no KL to hold it."""
        ctx, s = self.ctx, {"alpha": 0.01, "steps": 60, "batch_size": 16, "lr": 1e-3, "grad_last_k": 5} | self.alpha0
        if self.method.get("value_distill") == "none":
            raise ValueError("ctrl_alpha0 continues ctrl's pathway, which method.value_distill=none leaves untrained "
                             "(its control is grad V): leave ctrl_alpha0 out of suite.methods")
        if self._ctrl is None:
            self.row_ctrl()
        model = self.new_model()
        model.load_state_dict(self._ctrl.state_dict())
        result = finetune(model, ctx.domain.sde, self.reward(), self.label_prior(), ctx.domain.x_shape,
                          estimator="pathwise", alpha=float(s["alpha"]), steps=int(s["steps"]),
                          batch_size=int(s["batch_size"]), lr=float(s["lr"]), memory="truncate",
                          grad_last_k=int(s["grad_last_k"]), n_steps=ctx.n_steps, t_end=ctx.t_end, spacing=ctx.spacing,
                          seed=ctx.seed + 1, progress=self.progress, eval_every=max(int(s["steps"]) // 2, 1),
                          eval_batch_size=32)
        self.histories["ctrl_alpha0"] = result.history
        self.info["ctrl_alpha0"] = {k: s[k] for k in s} | {"train_seconds": result.seconds}
        x, kl = ctx.sample(model.conditioned, ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "alpha": float(s["alpha"])} | self.shared_seconds()


def run_rows(runner: RowRunner, methods: Sequence[str], label: str,
             score: Callable[[Tensor, Tensor | None, Tensor], tuple[dict[str, float], dict[str, Any]]],
             write: Callable[[str, Tensor], Any] | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Run each method's row, score its samples for the evaluation requests and time it.

    Args:
        runner: the row runner.
        methods: the rows, in order.
        label: the task's title in the results table.
        score: ``(x, kl, y) -> (metrics, details)``, the domain's evaluation (never a reward classifier).
        write: ``(method, x)`` writes a row's samples in the domain's format.

    Returns:
        The rows, and each method's details (per-class numbers for plots).
    """
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(KNOWN_METHODS)}")
    rows, details = [], {}
    y = runner.ctx.y_eval
    for name in methods:
        start = time.perf_counter()
        x, kl, extra = runner.run(name)
        metrics, detail = score(x, kl, y)
        metrics |= extra
        metrics["seconds"] = time.perf_counter() - start + metrics.pop("shared_seconds", 0.0)
        rows.append(Row(name, label, metrics))
        details[name] = detail
        log.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        if write is not None:
            write(name, x)
    add_fraction_of_optimum(rows)
    return rows, details


def plot_histories(runner: RowRunner, rows: Sequence[Row], run_dir: Path) -> None:
    """``training.png`` (the pathwise and score-matching rows' training curves) and, when ``ctrl_pg`` or ``ddpo``
    ran, ``reward_vs_queries.png``: their on-policy reward and path KL against the number of black-box reward
    queries, with ``ctrl`` as one point at the number of labelled pairs it learned from (every query made up front)
    and at the exact reward and KL of its evaluation samples, in the same units (gamma log p(y|x), nats).
    """
    plot_fraction_of_optimum(list(rows), Path(run_dir) / "fraction_of_optimum.png")
    trained = {k: v for k, v in runner.histories.items() if k not in POLICY_GRADIENT_METHODS}
    if trained:
        plot_training_curves(trained, Path(run_dir) / "training.png")
    if len(trained) == len(runner.histories):
        return
    queries = {k: v for k, v in runner.histories.items() if k in POLICY_GRADIENT_METHODS}
    ctrl = next((r for r in rows if r.method == "ctrl"), None)
    if ctrl is not None and ctrl.metrics.get("kl") is not None:
        n_pairs = sum(int(p.y.shape[0]) for p in runner.ctx.pairs)
        reward = ctrl.metrics["objective"] + runner.objective.alpha * ctrl.metrics["kl"]
        point = {"reward_queries": n_pairs, "reward": reward, "kl": ctrl.metrics["kl"]}
        queries = {"ctrl (at its labelled pairs)": [point]} | queries
    plot_reward_vs_queries(queries, Path(run_dir) / "reward_vs_queries.png")
