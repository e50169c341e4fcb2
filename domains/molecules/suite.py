"""``ctrl-bio benchmark suite=molecules``: QM9 molecules with RDKit-exact and quantum-chemical labels.

The pre-trained model is the unconditional graph diffusion of :mod:`domains.molecules.domain` (nodes and bonds
diffused jointly, decoded with no valency correction). A label is added by the rows of :mod:`ctrl_bio.rows`
(``pretrained``, ``ctrl``, ``ctrl_alpha0``, ``cfg``, ``classifier_guidance``, ``dps``, ``best_of_n``,
``real_data``), all with the same Euler-Maruyama sampler. Default task: ``label=logp`` (logP bins, exact by RDKit);
``label=gap`` / ``mu`` / ``alpha`` are DFT-property bins judged by the evaluation oracle (a GNN trained on molecules
disjoint from every pair, :mod:`domains.molecules.oracle`), ``label=[gap,logp]`` the two-label task from separate
pair sets.

Metrics of every row: ``accuracy`` and ``macro_f1`` of the requested bins (an invalid molecule is wrong for every
request), ``validity`` (RDKit sanitisation of the raw decode), ``connected``, ``uniqueness``, ``novelty`` against the
training SMILES, ``fcd`` (Frechet ChemNet Distance to a second draw of real test molecules with the same requests;
``real_data`` gives its floor), ``kl`` and ``objective``. Each row's molecules are written as SMILES (CSV with the
requested labels and measured QED and logP), SDF (RDKit 3-D embedding) and a PNG grid, one row per requested class.
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
from ctrl_bio.labels import LOG_EPS, LabelledPairs
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
from domains.molecules.data import PROPERTIES, decode, encode, graph_types, to_smiles
from domains.molecules.domain import MoleculeDomain, write_smiles_csv
from domains.molecules.metrics import generation_metrics
from domains.molecules.nets import GraphClassifier

log = logging.getLogger(__name__)

LogProbFn = Callable[[Tensor], Tensor]


def invalid_is_wrong(log_prob: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Log-likelihoods where an invalid molecule belongs to no requested class: its row puts all mass on a class other
    than the requested one (so it counts as wrong) and :data:`LOG_EPS` on the requested one (so J pays for it)."""
    out = log_prob.clone()
    invalid = ~valid
    if invalid.any():
        n = log_prob.shape[1]
        wrong = torch.full_like(out[invalid], LOG_EPS)
        wrong[torch.arange(wrong.shape[0]), (y[invalid] + 1) % n] = 0.0
        out[invalid] = wrong
    return out


class MoleculeContext(BaseSuiteContext):
    """What every row shares: domain, pre-trained network, labels, requests, real test molecules, metrics."""

    def __init__(self, domain: MoleculeDomain, specs: list[dict], pairs: list[LabelledPairs], eval_fns: list[LogProbFn],
                 *, n_eval: int, n_select: int, n_steps: int, t_end: float, seed: int, batch_size: int,
                 objective: Objective = Objective(), device: str = "cpu",
                 precision: str = "32"):
        super().__init__(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps,
                         t_end=t_end, spacing="uniform", seed=seed, batch_size=batch_size, objective=objective,
                         device=device, precision=precision)
        table = domain.table
        test = table.of_split("test")
        self.x_test = test.x()
        # The real test molecules' labels, for real_data: a DFT label's true (DFT) bin, so that real_data's accuracy is
        # the oracle's own accuracy on real molecules (the ceiling); an RDKit label's exact value.
        labels = []
        for spec, f in zip(specs, eval_fns):
            if spec["name"] in PROPERTIES and spec.get("type") == "bins":
                values = torch.from_numpy(test.properties[spec["name"]])
                labels.append(torch.bucketize(values, torch.tensor(spec["bins"], dtype=torch.float64), right=True))
            else:
                labels.append(f(self.x_test).argmax(1))
        self.test_labels = torch.stack(labels, 1)
        self.x_train = domain.training_data()
        self.train_smiles = set(table.of_split("training").smiles)
        # A second draw of real test molecules for the same requests: what every row's FCD is measured against
        # (real_data's FCD is the finite-sample floor).
        self.reference_smiles = to_smiles(decode(self.real_requests(self.y_eval, seed + 5000)))

    def score(self, x: Tensor, kl: Tensor | None, y: Tensor) -> tuple[dict[str, float], dict[str, Any]]:
        """Every metric of samples x for requests y, and per-class details for the plots."""
        x = encode(*graph_types(x))  # score the decoded graphs, not the continuous samples
        mols = decode(x)
        valid = torch.tensor([m is not None for m in mols])
        log_probs = [invalid_is_wrong(f(x), y[:, k], valid) for k, f in enumerate(self.eval_fns)]
        metrics, details = label_metrics(log_probs, y, self.names, self.n_classes)
        metrics |= generation_metrics(mols, self.train_smiles)
        metrics["fcd"] = self.fcd(to_smiles(mols))
        metrics |= objective_metrics(log_probs, y, kl, self.objective)
        return metrics, details

    def fcd(self, smiles: list[str | None]) -> float:
        """FCD of the valid samples against the reference molecules; NaN without ``fcd_torch`` or valid samples."""
        from domains.molecules.fcd import fcd

        if sum(s is not None for s in smiles) < 2:
            return float("nan")
        try:
            return fcd(smiles, self.reference_smiles)
        except ImportError:
            log.warning("fcd_torch is not installed: no FCD (pip install 'ctrl-bio[mol]')")
            return float("nan")

    def noisy_classifier(self, n_classes: int, hidden: int = 64, n_layers: int = 3) -> GraphClassifier:
        """Classifier guidance's network of noisy graphs."""
        return GraphClassifier(n_classes, hidden=hidden, edge_hidden=hidden // 2, n_layers=n_layers,
                               time_conditional=True, dropout=0.0)


def write_row(out: Path, name: str, x: Tensor, y: Tensor, names: list[str], n_classes: tuple[int, ...]) -> None:
    """One row's molecules: ``<name>.csv`` (SMILES, requested labels, QED, logP), ``<name>.sdf`` and ``<name>.png``."""
    from rdkit.Chem import QED, Crippen

    from domains.molecules.io import molecule_grid, write_sdf

    out.mkdir(parents=True, exist_ok=True)
    mols = decode(x)
    smiles = to_smiles(mols)
    measured = {"qed": [f"{QED.qed(m):.4f}" if m is not None else "" for m in mols],
                "logp": [f"{Crippen.MolLogP(m):.4f}" if m is not None else "" for m in mols]}
    write_smiles_csv(out / f"{name}.csv", smiles, y, names, measured)
    record_names = [f"sample{i}|" + "|".join(f"{n}={v}" for n, v in zip(names, row))
                    for i, row in enumerate(y.tolist())]
    write_sdf(out / f"{name}.sdf", mols, record_names, properties=measured)
    rows, titles = [], []
    for c in range(n_classes[0]):  # one grid row per class of the first label
        rows.append([mols[i] for i in np.flatnonzero((y[:, 0] == c).numpy())[:8]])
        titles.append(f"{names[0]}={c}")
    molecule_grid(rows, titles, out / f"{name}.png")


def run_suite(domain: MoleculeDomain, *, run_dir: str | Path, labels: list[dict[str, Any]], n_eval: int = 512,
              n_select: int = 128, n_steps: int = 100, t_end: float = 1e-3, batch_size: int = 256,
              method: dict[str, Any] | None = None, alpha0: dict[str, Any] | None = None,
              baselines: dict[str, Any] | None = None, methods: tuple[str, ...] = METHODS, seed: int = 0,
              progress: bool = True, write_samples: bool = True, device: str = "cpu",
              precision: str = "32") -> SuiteResult:
    """Run the molecule suite's rows for one label task (one label, or several from separate pair sets).

    Args:
        domain: the molecule domain (QM9, its SDE and pre-trained network).
        labels: label definitions (``configs/label/{qed,logp,rings,gap,mu,alpha}.yaml`` or a user's own).
        n_eval: evaluation requests, balanced over label combinations; ``n_select``: requests of their own on
            which guidance scales are chosen (by the reward classifier's J).
        n_steps, t_end: the sampler of every row.
        method, alpha0, baselines: settings of ``ctrl``, ``ctrl_alpha0`` and the baselines (:class:`RowRunner`).
        write_samples: write each row's molecules under ``samples/`` (CSV, SDF, PNG grid).
        device, precision: where the pre-trained network sits and the rows are sampled, and whether under
            bfloat16 autocast (``device=``, ``precision=``; :class:`ctrl_bio.rows.BaseSuiteContext`).
    """
    run_dir = Path(run_dir)
    method, baselines = dict(method or {}), dict(baselines or {})
    specs, pairs, eval_fns, info = load_task(labels, domain, seed)
    info |= {"n_eval": n_eval, "n_steps": n_steps}
    ctx = MoleculeContext(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps,
                          t_end=t_end, seed=seed, batch_size=batch_size, objective=Objective.of(method),
                           device=device,
                          precision=precision)
    info["test_molecules"] = int(ctx.x_test.shape[0])
    runner = RowRunner(ctx, method, dict(alpha0 or {}), baselines, run_dir, progress, info)
    title = " + ".join(f"{n} ({c} classes)" for n, c in zip(ctx.names, ctx.n_classes))
    write = (lambda name, x: write_row(run_dir / "samples", name, x, ctx.y_eval, ctx.names, ctx.n_classes)
             ) if write_samples else None
    rows, details = run_rows(runner, methods, title, ctx.score, write)
    info["details"] = details
    for name in ctx.names:
        plot_per_class_accuracy({m: d[f"per_class_accuracy_{name}"] for m, d in details.items()}, name,
                                run_dir / f"per_class_accuracy_{name}.png")
    plot_histories(runner, rows, run_dir)
    return SuiteResult("molecules", rows, info)
