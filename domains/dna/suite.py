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

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.harness import SuiteResult
from ctrl_bio.labels import LabelledPairs
from ctrl_bio.objective import Objective
from ctrl_bio.plots import plot_per_class_accuracy
from ctrl_bio.rows import (
    METHODS,
    BaseSuiteContext,
    RowRunner,
    label_metrics,
    load_task,
    objective_metrics,
    plot_histories,
    run_rows,
)
from domains.dna.data import CELL_TYPES, base_indices, decode, from_indices, one_hot
from domains.dna.domain import DNADomain
from domains.dna.nets import NoisySequenceCNN

log = logging.getLogger(__name__)

LogProbFn = Callable[[Tensor], Tensor]


class DNAContext(BaseSuiteContext):
    """What every row shares: domain, pre-trained network, labels, requests, real test data, metrics."""

    def __init__(self, domain: DNADomain, specs: list[dict], pairs: list[LabelledPairs], eval_fns: list[LogProbFn],
                 *, n_eval: int, n_select: int, n_steps: int, t_end: float, seed: int, batch_size: int,
                 motif_ids: list[str] | None, objective: Objective = Objective(), device: str = "cpu",
                 precision: str = "32"):
        super().__init__(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps,
                         t_end=t_end, spacing="uniform", seed=seed, batch_size=batch_size, objective=objective,
                         device=device, precision=precision)
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
        log_probs = [f(x) for f in self.eval_fns]  # each evaluation model runs once per row
        metrics, details = label_metrics(log_probs, y, self.names, self.n_classes)
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
        # J under the evaluation likelihood (the oracle / exact labels), with the run's gamma and alpha.
        metrics |= objective_metrics(log_probs, y, kl, self.objective)
        return metrics, details

    def noisy_classifier(self, n_classes: int, hidden: int = 64) -> NoisySequenceCNN:
        """Classifier guidance's network of noisy sequences."""
        return NoisySequenceCNN(n_classes, hidden=hidden)


def run_suite(domain: DNADomain, *, run_dir: str | Path, labels: list[dict[str, Any]], n_eval: int = 512,
              n_select: int = 128, n_steps: int = 100, t_end: float = 1e-3, batch_size: int = 256,
              method: dict[str, Any] | None = None, alpha0: dict[str, Any] | None = None,
              baselines: dict[str, Any] | None = None, methods: tuple[str, ...] = METHODS,
              motifs: list[str] | None = None, seed: int = 0, progress: bool = True, device: str = "cpu",
              precision: str = "32",
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
        device, precision: where the pre-trained network sits and the rows are sampled, and whether under
            bfloat16 autocast (``device=``, ``precision=``; :class:`ctrl_bio.rows.BaseSuiteContext`).
    """
    run_dir = Path(run_dir)
    method, baselines = dict(method or {}), dict(baselines or {})
    specs, pairs, eval_fns, info = load_task(labels, domain, seed)
    info |= {"n_eval": n_eval, "n_steps": n_steps}
    ctx = DNAContext(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps, t_end=t_end,
                     seed=seed, batch_size=batch_size, motif_ids=motifs, objective=Objective.of(method),
                      device=device,
                     precision=precision)
    nat = ctx.markov.log_likelihood_per_base(ctx.x_test)
    # The spread of naturalness between real test sequences: the yardstick a row's loss of naturalness is read against.
    info["naturalness_real_test"] = {"mean": float(nat.mean()), "std": float(nat.std())}
    runner = RowRunner(ctx, method, dict(alpha0 or {}), baselines, run_dir, progress, info)
    title = " + ".join(f"{n} ({c} classes)" for n, c in zip(ctx.names, ctx.n_classes))
    write = (lambda name, x: write_rows_fasta(run_dir / "samples" / f"{name}.fasta", x, ctx.y_eval, ctx.names)
             ) if write_fasta else None
    rows, details = run_rows(runner, methods, title, ctx.score, write)
    info["details"] = details
    info["motifs"] = [m.id for m in ctx.scanner.motifs]
    from domains.dna.plots import plot_motif_scatter

    for name in ctx.names:
        plot_per_class_accuracy({m: d[f"per_class_accuracy_{name}"] for m, d in details.items()}, name,
                                run_dir / f"per_class_accuracy_{name}.png",
                                class_names=list(CELL_TYPES) if name == "celltype" else None)
    if ctx.celltype_k is not None:  # motif frequencies are per cell type: only tasks with that label have them
        scatter = {m: np.array(d["motif_frequencies"]) for m, d in details.items()
                   if m in ("pretrained", "ctrl", "cfg") and "motif_frequencies" in d}
        if scatter:
            plot_motif_scatter(scatter, ctx.real_motif_freq, run_dir / "motif_scatter.png")
    plot_histories(runner, rows, run_dir)
    return SuiteResult("dna", rows, info)


def write_rows_fasta(path: Path, x: Tensor, y: Tensor, names: list[str]) -> Path:
    """FASTA of one row's samples, the requested labels in each record name (``seq12|celltype=K562``)."""
    from domains.dna.data import write_fasta

    records = []
    for i, row in enumerate(y.tolist()):
        tags = [f"{n}={CELL_TYPES[v] if n == 'celltype' else v}" for n, v in zip(names, row)]
        records.append(f"seq{i}|" + "|".join(tags))
    return write_fasta(path, decode(x), records)
