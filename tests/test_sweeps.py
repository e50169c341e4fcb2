"""Sweeps of the gmm suite: the budget summary, and a tiny sweep end to end."""

import json

from ctrl_bio.cli import main
from ctrl_bio.harness import Row
from domains.gmm.sweeps import budget_to_reach, summarise_budgets


def rows(method, series):
    return [Row(method, "l", {"n_pairs": n, "accuracy": a, "distance_to_target": d, "noise_floor": 0.01})
            for n, a, d in series]


def test_budget_to_reach_needs_every_larger_budget_to_stay_at_the_target():
    ctrl = rows("ctrl", [(25, 0.9, 0.5), (100, 0.995, 0.015), (500, 0.996, 0.01)])
    # A memorising conditional model: perfect accuracy from 25 pairs, far from the target until 500 (a dip at 100).
    cfg = rows("cfg", [(25, 1.0, 1.2), (100, 1.0, 0.019), (250, 1.0, 0.3), (500, 0.999, 0.012)])
    assert budget_to_reach(ctrl, "ctrl") == {"distance": 100, "accuracy_099": 100}
    assert budget_to_reach(cfg, "cfg") == {"distance": 500, "accuracy_099": 25}
    summary = summarise_budgets(ctrl + cfg, ["ctrl", "cfg"])
    assert summary["pairs_ratio_to_ctrl"]["cfg"] == {"distance": 5.0, "accuracy_099": 0.25}
    never = rows("x", [(25, 0.5, 1.0), (100, 0.5, 1.0)])
    assert budget_to_reach(never, "x") == {"distance": None, "accuracy_099": None}


def test_tiny_gamma_sweep_writes_table_and_plot(tmp_path):
    run_dir = tmp_path / "run"
    code = main(["benchmark", "suite=gmm", "sweep=gamma", "sweep.values=[1.0,4.0]", "domain.dim=2",
                 "domain.n_components=4", "domain.n_classes=2", "data.n_pairs=200", "suite.n_eval=300",
                 "suite.n_steps=20", "method.sm_steps=200", "method.pool_size=2000", "suite.pathway.hidden=32",
                 "label.component.training.epochs=20", "progress=false", f"hydra.run.dir={run_dir}"])
    assert code == 0
    result = json.loads((run_dir / "results.json").read_text())
    gammas = [r["metrics"]["gamma"] for r in result["rows"]]
    assert gammas == [1.0, 4.0] and {r["method"] for r in result["rows"]} == {"ctrl"}
    low, high = (r["metrics"] for r in result["rows"])
    # A larger reward weight sharpens: the likelihood of the requested label rises.
    assert high["likelihood"] > low["likelihood"]
    assert (run_dir / "sweep_gamma.png").stat().st_size > 0
