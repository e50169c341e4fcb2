"""``ctrl-bio benchmark suite=dna``: cell-type-specific regulatory DNA from real ENCODE data.

Rows (DESIGN.md names), all with the same Euler-Maruyama sampler and step count, per label task:
``pretrained`` (the shipped unconditional network; the floor), ``ctrl`` (CTRL with a calibrated reward
classifier per label, each from its own pairs), ``ctrl_alpha0`` (CTRL continued by pathwise gradients with the
KL weight near zero: what the KL protects), ``cfg`` (the same zero-initialised label embedding trained by
denoising score matching on the labelled pairs, scale swept), ``classifier_guidance`` (a classifier of noisy
x_t from the same pairs), ``dps`` (the reward classifier at Tweedie's x0_hat), ``best_of_n`` (N pre-trained
samples per request, the reward classifier picks) and ``real_data`` (held-out test-chromosome sequences with
the requested labels, the ceiling).

Evaluation never uses a reward classifier: cell type is scored by the shipped oracle (trained on sequences
disjoint from every pair), GC content and motif presence by their exact label functions. Guidance scales are
chosen by the reward classifier's J = gamma E[log p(y|x)] - alpha KL (CTRL's own objective, the same gamma and
alpha) on requests of their own: the oracle is never consulted for a choice.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.finetune import finetune
from ctrl_bio.guidance import (
    classifier_free_guidance,
    classifier_guidance,
    reconstruction_guidance,
    train_conditional_pathway,
    train_noisy_classifier,
)
from ctrl_bio.harness import Row, SuiteResult
from ctrl_bio.labels import LabelledPairs, exact_log_prob, fit_reward_classifiers, load_label, resolve_callable
from ctrl_bio.metrics import accuracy, macro_f1
from ctrl_bio.plots import plot_training_curves
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import ScoreFn, euler_maruyama, time_grid
from domains.dna.data import CELL_TYPES, base_indices, decode, from_indices, one_hot
from domains.dna.domain import DNADomain
from domains.dna.nets import NoisySequenceCNN

log = logging.getLogger(__name__)

METHODS = ("pretrained", "ctrl", "ctrl_alpha0", "cfg", "classifier_guidance", "dps", "best_of_n", "real_data")
LogProbFn = Callable[[Tensor], Tensor]


def evaluation_log_prob(spec: dict, domain: DNADomain) -> LogProbFn:
    """The label's evaluation likelihood: its exact function, else its ``oracle`` callable; never a reward model."""
    exact = exact_log_prob(spec, domain)
    if exact is not None:
        return exact
    oracle = spec.get("oracle")
    if not oracle:
        raise ValueError(f"label '{spec['name']}' has neither 'exact' nor 'oracle': the dna suite cannot score it")
    return resolve_callable(oracle["callable"])(domain, **dict(oracle.get("kwargs") or {}))


def balanced_requests(n_classes: tuple[int, ...], n: int) -> Tensor:
    """n requests cycling through every label combination, (n, K): every class equally often."""
    combos = torch.cartesian_prod(*[torch.arange(c) for c in n_classes]).reshape(-1, len(n_classes))
    return combos.repeat((n + combos.shape[0] - 1) // combos.shape[0], 1)[:n]


class DNAContext:
    """What every row shares: domain, pre-trained network, labels, requests, real test data, metrics."""

    def __init__(self, domain: DNADomain, specs: list[dict], pairs: list[LabelledPairs], eval_fns: list[LogProbFn],
                 *, n_eval: int, n_select: int, n_steps: int, t_end: float, seed: int, batch_size: int,
                 motif_ids: list[str] | None, gamma: float = 1.0, alpha: float = 1.0):
        self.domain, self.specs, self.pairs, self.eval_fns = domain, specs, pairs, eval_fns
        self.names = [s["name"] for s in specs]
        self.n_classes = tuple(int(p.n_classes) for p in pairs)
        self.n_steps, self.t_end, self.seed, self.batch_size = n_steps, t_end, seed, batch_size
        self.gamma, self.alpha = gamma, alpha
        self.times = time_grid(n_steps, t_end)
        self.pretrained = domain.pretrained_model()
        self.y_eval = balanced_requests(self.n_classes, n_eval)
        self.y_select = balanced_requests(self.n_classes, n_select)
        table = domain.table
        test = table.of_split("test")
        self.x_test = one_hot(test.sequences)
        # Labels of the real test sequences that `real_data` draws from: the table's own cell types, else the
        # label's evaluation function (exact for gc and motif; for a user label scored by an oracle this makes
        # `real_data` that oracle's agreement with itself, 1.0, so read it as no ceiling).
        self.test_labels = torch.stack([f(self.x_test).argmax(1) if s["name"] != "celltype" else
                                        torch.from_numpy(test.celltype) for s, f in zip(specs, eval_fns)], 1)
        self.x_train = domain.training_data()
        self.celltype_k = self.names.index("celltype") if "celltype" in self.names else None
        from domains.dna.metrics import MarkovModel
        from domains.dna.motifs import MotifScanner, load_motifs

        self.markov = MarkovModel(self.x_train)
        self.scanner = MotifScanner(load_motifs(motif_ids))
        if self.celltype_k is not None:
            self.real_motif_freq = self.motif_frequencies(self.x_test, self.test_labels[:, self.celltype_k])

    def motif_frequencies(self, x: Tensor, celltype: Tensor) -> np.ndarray:
        """(cell types, motifs) fraction of the sequences of each cell type with a motif hit."""
        present = self.scanner.present(x).float()
        return np.stack([present[celltype == c].mean(0).numpy() if (celltype == c).any() else
                         np.full(present.shape[1], np.nan) for c in range(len(CELL_TYPES))])

    def sample(self, score_fn_for: Callable[[Tensor], ScoreFn], y: Tensor, seed_offset: int = 2000
               ) -> tuple[Tensor, Tensor]:
        """Samples and path KLs for requests y, in batches (the same noise for every row at one offset)."""
        g = torch.Generator().manual_seed(self.seed + seed_offset)
        xs, kls = [], []
        for start in range(0, y.shape[0], self.batch_size):
            yb = y[start:start + self.batch_size]
            x_init = self.domain.sde.prior_sampling((yb.shape[0], *self.domain.x_shape), generator=g)
            with torch.no_grad():
                out = euler_maruyama(self.domain.sde, score_fn_for(yb), x_init, self.times, generator=g,
                                     keep_trajectory=False)
            xs.append(out.x)
            kls.append(out.kl)
        return torch.cat(xs), torch.cat(kls)

    def score(self, x: Tensor, kl: Tensor | None, y: Tensor) -> tuple[dict[str, float], dict[str, Any]]:
        """Every metric of samples x for requests y, and per-class details for the plots."""
        from domains.dna.metrics import (
            diversity,
            kmer_correlation,
            kmer_entropy,
            motif_contrast_correlation,
            motif_correlation,
            novelty,
        )

        x = from_indices(base_indices(x))  # score the decoded sequences, not the continuous samples
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        accs, f1s = [], []
        log_probs = [f(x) for f in self.eval_fns]  # each evaluation model runs once per row
        for k, (name, n, lp) in enumerate(zip(self.names, self.n_classes, log_probs)):
            pred = lp.argmax(1)
            accs.append(accuracy(pred, y[:, k]))
            f1s.append(macro_f1(pred, y[:, k], n))
            details[f"per_class_accuracy_{name}"] = [accuracy(pred[y[:, k] == c], y[y[:, k] == c, k])
                                                     if (y[:, k] == c).any() else None for c in range(n)]
            if len(self.names) > 1:
                metrics[f"accuracy_{name}"] = accs[-1]
        metrics["accuracy"] = float(np.mean(accs))
        metrics["macro_f1"] = float(np.mean(f1s))
        if self.celltype_k is not None:
            freq = self.motif_frequencies(x, y[:, self.celltype_k])
            gen, real = torch.as_tensor(freq), torch.as_tensor(self.real_motif_freq)
            metrics["motif_correlation"] = motif_correlation(gen, real)
            metrics["motif_contrast_correlation"] = motif_contrast_correlation(gen, real)
            details["motif_frequencies"] = freq.tolist()
        metrics["kmer_correlation"] = kmer_correlation(x, self.x_test)
        metrics["diversity"] = diversity(x)
        metrics["novelty"] = novelty(x, self.x_train)
        metrics["naturalness"] = float(self.markov.log_likelihood_per_base(x).mean())
        metrics["kmer_entropy"] = float(kmer_entropy(x).mean())
        if kl is not None:
            metrics["kl"] = float(kl.mean())
            # J under the evaluation likelihood (the oracle / exact labels), with the run's gamma and alpha.
            log_likelihood = sum(lp.gather(1, y[:, k:k + 1]).squeeze(1) for k, lp in enumerate(log_probs))
            metrics["objective"] = float((self.gamma * log_likelihood - self.alpha * kl).mean())
        return metrics, details

    def real_requests(self, y: Tensor, seed: int) -> Tensor:
        """Test-chromosome sequences with the requested labels, drawn per request (with replacement)."""
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(y.shape[0], *self.domain.x_shape)
        for combo in torch.unique(y, dim=0):
            rows = (y == combo).all(1).nonzero().squeeze(1)
            match = (self.test_labels == combo).all(1).nonzero().squeeze(1)
            if match.numel() == 0:
                raise ValueError(f"no test sequence carries the labels {combo.tolist()} of {self.names}")
            out[rows] = self.x_test[match[torch.randint(match.numel(), (rows.numel(),), generator=g)]]
        return out


def run_suite(domain: DNADomain, *, run_dir: str | Path, labels: list[dict[str, Any]], n_eval: int = 512,
              n_select: int = 128, n_steps: int = 100, t_end: float = 1e-3, batch_size: int = 256,
              method: dict[str, Any] | None = None, alpha0: dict[str, Any] | None = None,
              baselines: dict[str, Any] | None = None, methods: tuple[str, ...] = METHODS,
              motifs: list[str] | None = None, seed: int = 0, progress: bool = True,
              write_fasta: bool = True) -> SuiteResult:
    """Run the DNA suite's rows for one label task (one label, or several from separate pair sets).

    Args:
        domain: the DNA domain (its table, SDE and pre-trained network).
        labels: label definitions (``configs/label/{celltype,gc,motif}.yaml`` or a user's own).
        n_eval: evaluation requests, balanced over label combinations; ``n_select``: requests of their own on
            which guidance scales are chosen.
        n_steps: sampler steps of every row.
        method: keyword arguments of :func:`ctrl_bio.finetune.finetune` for ``ctrl`` plus ``pool``: ``pretrained``
            (score matching resamples pre-trained samples) or ``training`` (the pre-trained model's own
            unlabelled training sequences), and ``pool_size``.
        alpha0: settings of ``ctrl_alpha0``: ``alpha`` (KL weight), ``steps``, ``batch_size``, ``lr``,
            ``grad_last_k`` of pathwise updates continued from ``ctrl``'s pathway.
        baselines: settings of ``cfg``, ``classifier_guidance``, ``dps`` and ``best_of_n``.
        motifs: JASPAR ids that ``motif_correlation`` counts (None: the domain's default list).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)} for suite dna; known: {', '.join(METHODS)}")
    if not labels:
        raise ValueError("suite dna needs at least one label (label=celltype, label=[celltype,gc], ...)")
    run_dir = Path(run_dir)
    method, baselines = dict(method or {}), dict(baselines or {})
    specs = copy.deepcopy(labels)
    pairs, eval_fns, info = [], [], {"n_eval": n_eval, "n_steps": n_steps}
    for k, spec in enumerate(specs):
        p = load_label(spec, domain=domain, seed=seed + 7919 * (k + 1))
        pairs.append(p)
        eval_fns.append(evaluation_log_prob(spec, domain))
        info[f"pairs_{spec['name']}"] = {"n": len(p), "source": p.source, "skipped": p.skipped}
    ctx = DNAContext(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps, t_end=t_end,
                     seed=seed, batch_size=batch_size, motif_ids=motifs, gamma=float(method.get("gamma", 1.0)),
                     alpha=float(method.get("alpha", 1.0)))
    nat = ctx.markov.log_likelihood_per_base(ctx.x_test)
    # The spread of naturalness between real test sequences: the yardstick a row's loss of naturalness is read against.
    info["naturalness_real_test"] = {"mean": float(nat.mean()), "std": float(nat.std())}
    runner = DNARowRunner(ctx, method, dict(alpha0 or {}), baselines, run_dir, progress, info)
    title = " + ".join(f"{n} ({c} classes)" for n, c in zip(ctx.names, ctx.n_classes))
    rows, details = [], {}
    for name in methods:
        start = time.perf_counter()
        x, kl, extra = runner.run(name)
        metrics, detail = ctx.score(x, kl, ctx.y_eval)
        metrics |= extra
        metrics["seconds"] = time.perf_counter() - start + metrics.pop("shared_seconds", 0.0)
        rows.append(Row(name, title, metrics))
        details[name] = detail
        log.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        if write_fasta:
            write_rows_fasta(run_dir / "samples" / f"{name}.fasta", x, ctx.y_eval, ctx.names)
    info["details"] = details
    info["motifs"] = [m.id for m in ctx.scanner.motifs]
    from domains.dna.plots import plot_motif_scatter, plot_per_class_accuracy

    for name in ctx.names:
        plot_per_class_accuracy({m: d[f"per_class_accuracy_{name}"] for m, d in details.items()}, name,
                                run_dir / f"per_class_accuracy_{name}.png")
    if ctx.celltype_k is not None:  # motif frequencies are per cell type: only tasks with that label have them
        scatter = {m: np.array(d["motif_frequencies"]) for m, d in details.items()
                   if m in ("pretrained", "ctrl", "cfg") and "motif_frequencies" in d}
        if scatter:
            plot_motif_scatter(scatter, ctx.real_motif_freq, run_dir / "motif_scatter.png")
    if runner.histories:
        plot_training_curves(runner.histories, run_dir / "training.png")
    return SuiteResult("dna", rows, info)


def write_rows_fasta(path: Path, x: Tensor, y: Tensor, names: list[str]) -> Path:
    """FASTA of one row's samples, the requested labels in each record name (``seq12|celltype=K562``)."""
    from domains.dna.data import write_fasta

    records = []
    for i, row in enumerate(y.tolist()):
        tags = [f"{n}={CELL_TYPES[v] if n == 'celltype' else v}" for n, v in zip(names, row)]
        records.append(f"seq{i}|" + "|".join(tags))
    return write_fasta(path, decode(x), records)


class DNARowRunner:
    """Builds, trains and samples each row; the reward classifiers and the pre-trained pool are shared."""

    def __init__(self, ctx: DNAContext, method: dict, alpha0: dict, baselines: dict, run_dir: Path, progress: bool,
                 info: dict):
        self.ctx, self.method, self.alpha0, self.baselines = ctx, method, alpha0, baselines
        self.run_dir, self.progress, self.info = run_dir, progress, info
        self.histories: dict[str, list[dict]] = {}
        self._reward: LogLikelihoodReward | None = None
        self._reward_seconds, self._charged = 0.0, False
        self._chunks: dict[int, Tensor] = {}
        self._chunk_seconds: dict[int, float] = {}
        self._ctrl = None

    def reward(self) -> LogLikelihoodReward:
        """One calibrated classifier per label from its own pairs (CTRL step 1)."""
        if self._reward is None:
            start = time.perf_counter()
            self._reward, reports = fit_reward_classifiers(self.ctx.specs, self.ctx.pairs, seed=self.ctx.seed)
            for name, report in reports.items():
                self.info[f"classifier_{name}"] = asdict(report)
                log.info("reward classifier %s: %s", name, report)
            self._reward_seconds = time.perf_counter() - start
        return self._reward

    def shared_seconds(self) -> dict[str, float]:
        """Reward-classifier training time, charged to the row that trained them and again to later rows."""
        if not self._charged:
            self._charged = True
            return {}
        return {"shared_seconds": self._reward_seconds}

    def pretrained_chunk(self, k: int) -> Tensor:
        """The k-th set of n_eval pre-trained samples (its own noise); chunk 0 is the ``pretrained`` row and
        chunks 0..N-1 are best_of_n's candidates (pre-trained samples do not depend on the request)."""
        if k not in self._chunks:
            ctx, start = self.ctx, time.perf_counter()
            y = torch.zeros(ctx.y_eval.shape[0], len(ctx.n_classes), dtype=torch.long)
            self._chunks[k] = ctx.sample(lambda _y: ctx.pretrained, y, seed_offset=7000 + k)[0]
            self._chunk_seconds[k] = time.perf_counter() - start
        return self._chunks[k]

    def new_model(self):
        torch.manual_seed(self.ctx.seed)
        return self.ctx.domain.augment(self.ctx.pretrained, self.ctx.n_classes)

    def select_scale(self, make: Callable[[float], Callable[[Tensor], ScoreFn]], scales: list[float]
                     ) -> tuple[float, dict]:
        """The scale with the best J = gamma E[log p_reward(y|x)] - alpha KL on the selection requests.

        The same objective CTRL maximises, with the reward classifier every learned row has (never the oracle), so
        each baseline is tuned for the same target p_pre(x) p(y|x)^(gamma/alpha) as ``ctrl``.
        """
        ctx, reward, scores = self.ctx, self.reward(), {}
        gamma, alpha = float(self.method.get("gamma", 1.0)), float(self.method.get("alpha", 1.0))
        for w in scales:
            x, kl = ctx.sample(make(w), ctx.y_select, seed_offset=2500)
            scores[str(w)] = float((gamma * reward(x, ctx.y_select) - alpha * kl).mean())
        return max(scales, key=lambda w: scores[str(w)]), scores

    def run(self, name: str) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        ctx = self.ctx
        evals = {"score_evals": ctx.n_steps}
        if name == "pretrained":
            return self.pretrained_chunk(0), torch.zeros(ctx.y_eval.shape[0]), evals
        if name == "real_data":
            return ctx.real_requests(ctx.y_eval, ctx.seed + 4000), None, {}
        return getattr(self, f"row_{name}")()

    def row_ctrl(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx, settings = self.ctx, dict(self.method)
        reward = self.reward()
        source = settings.pop("pool", "training")
        pool_size = int(settings.pop("pool_size", 8192))
        g = torch.Generator().manual_seed(ctx.seed + 7100)
        if source == "training":
            pool = ctx.x_train[torch.randperm(ctx.x_train.shape[0], generator=g)[:pool_size]]
        elif source == "pretrained":
            pool = ctx.sample(lambda _y: ctx.pretrained, torch.zeros(pool_size, len(ctx.n_classes), dtype=torch.long),
                              seed_offset=7100)[0]
        else:
            raise ValueError(f"suite.method.pool must be 'training' or 'pretrained', got {source!r}")
        prior = LabelPrior.from_labels([p.y for p in ctx.pairs], list(ctx.n_classes))
        model = self.new_model()
        result = finetune(model, ctx.domain.sde, reward, prior, ctx.domain.x_shape, n_steps=ctx.n_steps,
                          t_end=ctx.t_end, seed=ctx.seed, progress=self.progress, pool_x0=pool,
                          checkpoint_path=self.run_dir / "checkpoints" / "ctrl.safetensors", **settings)
        self.histories["ctrl"] = result.history
        self.info["ctrl"] = {"pool": source, "pool_size": int(pool.shape[0]), "pool_ess": result.pool_ess,
                             "train_seconds": result.seconds}
        self._ctrl = model
        x, kl = ctx.sample(model.conditioned, ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps} | self.shared_seconds()

    def row_ctrl_alpha0(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        """CTRL's pathway, then pathwise updates of J with alpha ~ 0: the reward alone, no KL to hold it."""
        ctx, s = self.ctx, {"alpha": 0.01, "steps": 60, "batch_size": 16, "lr": 1e-3, "grad_last_k": 5} | self.alpha0
        if self._ctrl is None:
            self.row_ctrl()
        model = self.new_model()
        model.load_state_dict(self._ctrl.state_dict())
        prior = LabelPrior.from_labels([p.y for p in ctx.pairs], list(ctx.n_classes))
        result = finetune(model, ctx.domain.sde, self.reward(), prior, ctx.domain.x_shape, estimator="pathwise",
                          alpha=float(s["alpha"]), steps=int(s["steps"]), batch_size=int(s["batch_size"]),
                          lr=float(s["lr"]), memory="truncate", grad_last_k=int(s["grad_last_k"]),
                          n_steps=ctx.n_steps, t_end=ctx.t_end, seed=ctx.seed + 1, progress=self.progress,
                          eval_every=max(int(s["steps"]) // 2, 1), eval_batch_size=32)
        self.histories["ctrl_alpha0"] = result.history
        self.info["ctrl_alpha0"] = {k: s[k] for k in s} | {"train_seconds": result.seconds}
        x, kl = ctx.sample(model.conditioned, ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "alpha": float(s["alpha"])} | self.shared_seconds()

    def row_cfg(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx, cfg = self.ctx, {"steps": 600, "batch_size": 128, "lr": 2e-3, "label_dropout": 0.1} | dict(
            self.baselines.get("cfg", {}))
        scales = list(cfg.pop("scales", [1.0, 2.0, 4.0]))
        x_pairs, y_pairs = self.joint_pairs()
        model = self.new_model()
        record = train_conditional_pathway(model, ctx.domain.sde, x_pairs, y_pairs, t_end=ctx.t_end,
                                           generator=torch.Generator().manual_seed(ctx.seed + 8000),
                                           progress=self.progress, **cfg)
        best, per_scale = self.select_scale(lambda w: lambda y: classifier_free_guidance(model, y, w), scales)
        self.info["cfg"] = {"pairs": int(x_pairs.shape[0]), "per_scale_reward_J": per_scale, "losses": record.losses}
        x, kl = ctx.sample(lambda y: classifier_free_guidance(model, y, best), ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "guidance_scale": best, "pairs_used": int(x_pairs.shape[0])}

    def joint_pairs(self) -> tuple[Tensor, Tensor]:
        """Pairs carrying every label at once, what cfg and classifier guidance learn from.

        One label: its own pairs. Several: the first label's pair sequences with every other label read off by
        that label's exact function (only exact labels can be added this way; CTRL itself needs none of it).
        """
        ctx = self.ctx
        x = ctx.pairs[0].x
        ys = [ctx.pairs[0].y]
        for spec in ctx.specs[1:]:
            exact = exact_log_prob(spec, ctx.domain)
            if exact is None:
                raise ValueError(f"cfg with several labels needs joint pairs; label '{spec['name']}' has no exact "
                                 "function to label the first label's sequences with")
            ys.append(exact(x).argmax(1))
        return x, torch.stack(ys, 1)

    def row_classifier_guidance(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx = self.ctx
        cg = {"steps": 1500, "batch_size": 128, "lr": 2e-3, "hidden": 64} | dict(
            self.baselines.get("classifier_guidance", {}))
        scales = list(cg.pop("scales", [1.0, 2.0, 4.0]))
        hidden = int(cg.pop("hidden"))
        x_pairs, y_pairs = self.joint_pairs()
        nets = []
        for k, n in enumerate(ctx.n_classes):
            torch.manual_seed(ctx.seed + k)
            net = NoisySequenceCNN(n, hidden=hidden)
            train_noisy_classifier(net, ctx.domain.sde, x_pairs, y_pairs[:, k], t_end=ctx.t_end,
                                   generator=torch.Generator().manual_seed(ctx.seed + 8100 + k),
                                   progress=self.progress, **cg)
            nets.append(net)

        def noisy_ll(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return sum(net(x, t).log_softmax(1).gather(1, y[:, k:k + 1]).squeeze(1) for k, net in enumerate(nets))

        pre = ctx.pretrained
        best, per_scale = self.select_scale(lambda w: lambda y: classifier_guidance(pre, noisy_ll, y, w), scales)
        self.info["classifier_guidance"] = {"pairs": int(x_pairs.shape[0]), "per_scale_reward_J": per_scale}
        x, kl = ctx.sample(lambda y: classifier_guidance(pre, noisy_ll, y, best), ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "guidance_scale": best, "pairs_used": int(x_pairs.shape[0])}

    def row_dps(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        ctx = self.ctx
        scales = list(self.baselines.get("dps", {}).get("scales", [0.3, 1.0, 3.0]))
        reward, pre, sde = self.reward(), ctx.pretrained, ctx.domain.sde
        best, per_scale = self.select_scale(lambda w: lambda y: reconstruction_guidance(pre, sde, reward, y, w),
                                            scales)
        self.info["dps"] = {"per_scale_reward_J": per_scale}
        x, kl = ctx.sample(lambda y: reconstruction_guidance(pre, sde, reward, y, best), ctx.y_eval)
        # A forward and a backward pass through the score network per step: about three evaluations.
        return x, kl, {"score_evals": 3 * ctx.n_steps, "guidance_scale": best} | self.shared_seconds()

    def row_best_of_n(self) -> tuple[Tensor, None, dict[str, float]]:
        """N pre-trained samples per request, the one the reward classifier likes best; selection has no path KL.

        The candidates are the ``pretrained`` row's samples plus N - 1 more sets; their sampling time is charged here.
        """
        ctx, reward = self.ctx, self.reward()
        n = int(self.baselines.get("best_of_n", {}).get("n", 4))
        b = ctx.y_eval.shape[0]
        reused = 0 in self._chunks
        candidates = torch.stack([self.pretrained_chunk(k) for k in range(n)])  # (n, b, 4, L)
        with torch.no_grad():
            scores = torch.stack([reward(c, ctx.y_eval) for c in candidates])
        x = candidates[scores.argmax(0), torch.arange(b)]
        extra = {"score_evals": n * ctx.n_steps, "n": n} | self.shared_seconds()
        if reused:  # the pretrained row drew chunk 0 and was charged for it; so is this row
            extra["shared_seconds"] = extra.get("shared_seconds", 0.0) + self._chunk_seconds[0]
        return x, None, extra


