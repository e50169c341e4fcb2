"""The EDM conditional-generation suite (domains/molecules/edm.py): bounds, fraction closed, end to end on the slice."""

import math

import pytest
import torch

pytest.importorskip("rdkit")

from domains.molecules.edm import bounds, fraction_closed, request_metrics  # noqa: E402


def test_bounds_and_fraction_closed_on_a_toy_case():
    # Real molecules whose predictions are their values plus a known error: mae_lower is that error exactly.
    values = torch.linspace(0.0, 10.0, 101)
    pred = values + torch.where(torch.arange(101) % 2 == 0, 0.5, -0.5)
    lower, upper, shuffled = bounds(pred, values, torch.Generator().manual_seed(0))
    assert lower == pytest.approx(0.5)
    assert sorted(shuffled.tolist()) == values.tolist()  # a permutation of the requests
    assert upper == pytest.approx(float((pred - shuffled).abs().mean()))
    assert upper > 2.0  # uniform on [0, 10]: E|X - Y| = 10/3, far above the oracle's error
    assert fraction_closed(lower, lower, upper) == 1.0
    assert fraction_closed(upper, lower, upper) == 0.0
    assert fraction_closed((lower + upper) / 2, lower, upper) == pytest.approx(0.5)
    assert fraction_closed(upper + 1.0, lower, upper) < 0  # worse than ignoring the request
    assert math.isnan(fraction_closed(1.0, 2.0, 2.0)) and math.isnan(fraction_closed(float("nan"), 0.5, 3.0))


def test_request_metrics_count_only_valid_molecules():
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pred = torch.tensor([1.5, 2.5, 100.0, 3.0])
    valid = torch.tensor([True, True, False, True])
    m = request_metrics(pred, c, valid)
    assert m["n_valid"] == 3
    assert m["mae"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert math.isnan(request_metrics(pred, c, torch.zeros(4, dtype=torch.bool))["mae"])


@pytest.mark.slow
def test_suite_end_to_end_on_the_slice(tmp_path):
    """`ctrl-bio benchmark suite=molecules_edm` with tiny settings and one property: rows, bounds, CSV, plot."""
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    from ctrl_bio.training.runs import export_network
    from domains.molecules.domain import MoleculeDomain
    from domains.molecules.nets import GraphScoreNet
    from domains.molecules.oracle import save_oracle, train_oracle

    domain = MoleculeDomain(data="slice")
    torch.manual_seed(0)
    export_network(GraphScoreNet(domain.sde, hidden=16, edge_hidden=8, n_layers=1, emb_dim=16),
                   tmp_path / "score.safetensors")
    # A tiny oracle of its own (trained on the slice's oracle pool): the test does not depend on the shipped one.
    oracle, report = train_oracle(domain.table, hidden=16, edge_hidden=8, n_layers=1, epochs=3, batch_size=64,
                                  progress=False)
    save_oracle(oracle, report, tmp_path / "oracle.safetensors")
    run_dir = tmp_path / "run"
    overrides = [
        "suite=molecules_edm", "domain.data=slice", f"domain.checkpoint={tmp_path / 'score.safetensors'}",
        f"suite.oracle={tmp_path / 'oracle.safetensors'}",
        "data.n_pairs=60", "suite.properties=[gap]", "suite.n_eval=16", "suite.n_select=6", "suite.n_steps=3",
        "suite.batch_size=16", "suite.regressor.epochs=1", "suite.regressor.hidden=16",
        "suite.regressor.edge_hidden=8", "suite.regressor.n_layers=1", "method.pool_size=32",
        "method.sm_steps=2", "method.sm_batch_size=8", "method.eval_every=2",
        "method.eval_batch_size=4", "method.steps=1", "method.batch_size=2",
        "method.grad_last_k=1", "suite.cfg.steps=2", "suite.cfg.scales=[1.0,2.0]", "suite.optimum.n=24",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ctrl_bio.cli", "benchmark", *overrides], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["suite"] == "molecules_edm"
    rows = {r["method"]: r["metrics"] for r in result["rows"]}
    assert list(rows) == ["real_data", "shuffled", "pretrained", "optimum", "ctrl", "cfg"]
    assert all(r["label"] == "gap" for r in result["rows"])
    info = result["info"]["gap"]
    assert rows["real_data"]["mae"] == pytest.approx(info["mae_lower"])
    assert rows["shuffled"]["mae"] == pytest.approx(info["mae_upper"])
    assert info["mae_lower"] < info["mae_upper"]
    assert rows["real_data"]["fraction_closed"] == pytest.approx(1.0)
    assert rows["shuffled"]["fraction_closed"] == pytest.approx(0.0, abs=1e-6)
    assert rows["real_data"]["validity"] == 1.0
    for name in ("pretrained", "ctrl", "cfg"):
        assert 0.0 <= rows[name]["validity"] <= 1.0 and "kl" in rows[name]
    assert rows["pretrained"]["kl"] == 0.0
    # The optimum resamples the 24 pre-trained graphs per request: its ESS is at most the pool, its KL >= 0, and the
    # learned rows are placed on its scale of fraction_closed (the reference rows are not). This untrained network
    # decodes few valid graphs, so the fractions may be NaN here; test_optimum.py checks the arithmetic.
    assert 1.0 <= rows["optimum"]["effective_sample_size"] <= 24.0 + 1e-6 and rows["optimum"]["kl"] >= 0.0
    assert result["info"]["gap"]["optimum"]["pool_size"] == 24
    gain = rows["optimum"]["fraction_closed"] - rows["pretrained"]["fraction_closed"]
    for name in ("ctrl", "cfg"):
        expected = (rows[name]["fraction_closed"] - rows["pretrained"]["fraction_closed"]) / gain
        assert rows[name]["fraction_of_optimum"] == pytest.approx(expected, nan_ok=True)  # NaN: no valid molecule
    assert not any("fraction_of_optimum" in rows[n] for n in ("optimum", "real_data", "shuffled"))
    assert result["info"]["gap"]["cfg"]["scale"] in (1.0, 2.0)
    with open(run_dir / "samples" / "gap" / "ctrl.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["sample", "smiles", "valid", "requested_gap", "predicted_gap"] and len(table) == 17
    assert (run_dir / "edm_gap.png").is_file()
