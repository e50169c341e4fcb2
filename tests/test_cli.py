"""The ``ctrl-bio`` entry point: one-line errors, and a tiny end-to-end gmm benchmark."""

import json
import subprocess
import sys

import pytest
import torch

from ctrl_bio.cli import main


@pytest.mark.parametrize("args,needle", [
    (["benchmark", "suite=nope"], "suite/nope"),
    (["benchmark", "method=nope"], "method/nope"),
    (["benchmark", "nope=1"], "unknown config key 'nope'"),
    (["benchmark", "domain.n_components=3", "domain.n_classes=2"], "at least twice"),
    (["benchmark", "domain.dim=0"], "domain.dim must be a positive integer"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle, capsys, tmp_path):
    code = main(args + [f"hydra.run.dir={tmp_path}/run"] if args[0] == "benchmark" else args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "benchmark" in capsys.readouterr().out


def test_console_script_reports_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ctrl_bio.cli", "benchmark", "suite.n_steps=0",
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "n_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_gmm_benchmark_writes_results(tmp_path):
    run_dir = tmp_path / "run"
    code = main(["benchmark", "suite=gmm", "domain.dim=2", "domain.n_components=4", "domain.n_classes=2",
                 "data.n_pairs=200", "suite.n_eval=300", "suite.n_steps=20", "method.sm_steps=100",
                 "method.pool_size=1000", "suite.pathway.hidden=32", "label.component.training.epochs=20",
                 "suite.baselines.cfg.steps=50", "suite.baselines.classifier_guidance.steps=50", "progress=false",
                 f"hydra.run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["suite"] == "gmm"
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["pretrained", "exact_guidance", "ctrl_oracle_reward", "ctrl", "cfg", "classifier_guidance",
                       "dps", "best_of_n", "real_data"]
    rows = {r["method"]: r["metrics"] for r in results["rows"]}
    assert rows["best_of_n"]["score_evals"] == 8 * 20 and rows["dps"]["score_evals"] == 3 * 20
    assert rows["cfg"]["guidance_scale"] in (1.0, 1.5, 2.0, 3.0, 5.0)
    for row in results["rows"]:
        for key in ("accuracy", "macro_f1", "distance_to_target", "noise_floor", "component_tv"):
            assert key in row["metrics"]
    pre, exact = results["rows"][0]["metrics"], results["rows"][1]["metrics"]
    assert exact["accuracy"] > pre["accuracy"] + 0.3
    assert (run_dir / "results.md").read_text().startswith("# Suite `gmm`")
    assert (run_dir / "samples.png").stat().st_size > 0 and (run_dir / "training.png").stat().st_size > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "ctrl.safetensors").exists()


TINY = ["suite=gmm", "domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "suite.n_eval=200",
        "suite.n_steps=10", "method.sm_steps=30", "method.pool_size=500", "suite.pathway.hidden=16",
        "suite.baselines.cfg.steps=20", "suite.baselines.classifier_guidance.steps=20", "progress=false"]


def test_two_labels_from_separate_pair_sets(tmp_path):
    run_dir = tmp_path / "run"
    code = main(["benchmark", *TINY, "label=[logistic_a,logistic_b]", "data.n_pairs=300", "data.n_joint_pairs=40",
                 "label.logistic_a.training.epochs=5", "label.logistic_b.training.epochs=5",
                 "suite.methods=[pretrained,ctrl,cfg,real_data]", f"hydra.run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["method"]: r["metrics"] for r in results["rows"]}
    assert {"accuracy_logistic_a", "accuracy_logistic_b", "likelihood"} <= set(rows["ctrl"])
    assert rows["cfg"]["pairs_used"] == 40
    info = results["info"]
    assert info["pairs_logistic_a"]["n"] == 300 and info["pairs_logistic_b"]["n"] == 300
    assert info["labels"] == ["logistic_a", "logistic_b"] and info["optimum_objective"] < 0


def test_a_user_label_from_a_folder_needs_no_python(tmp_path):
    """A new label: a CSV of pairs and a YAML file in the user's own config folder (hydra.searchpath)."""
    from domains.gmm import make_testbed

    tb = make_testbed(dim=2, n_components=4, n_classes=2, seed=0)
    x, _ = tb.mixture.sample(400, torch.Generator().manual_seed(5))
    lines = ["a,b,value"] + [f"{u:.4f},{v:.4f},{u + v:.4f}" for u, v in x.tolist()] + ["bad,row,1", "0.1,0.2,"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "diagonal.yaml").write_text(f"""# @package label.diagonal
name: diagonal
domain: gmm
type: bins
bins: [0.0]
pairs: {{file: {tmp_path / 'pairs.csv'}, x_columns: [a, b], y_column: value}}
training: {{epochs: 30}}
""")
    run_dir = tmp_path / "run"
    code = main(["benchmark", *TINY, "label=diagonal", f"hydra.searchpath=[file://{tmp_path}]",
                 "suite.methods=[pretrained,ctrl]", f"hydra.run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    pairs = results["info"]["pairs_diagonal"]
    assert pairs["skipped"] == {"unparseable x": 1, "missing y": 1}
    assert pairs["n"] == 280  # 400 usable rows, 30% held out for the evaluation oracle
    assert "oracle_diagonal" in results["info"]
    rows = {r["method"]: r["metrics"] for r in results["rows"]}
    assert "distance_to_target" not in rows["ctrl"]  # no exact target without an exact label likelihood


def test_bad_label_value_is_one_line(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("a,b,y\n0,0,0\n1,1,7\n2,2,1\n")
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "mine.yaml").write_text(f"""# @package label.mine
name: mine
type: categorical
classes: 2
pairs: {{file: {tmp_path / 'pairs.csv'}, x_columns: [a, b], y_column: y}}
""")
    code = main(["benchmark", *TINY, "label=mine", f"hydra.searchpath=[file://{tmp_path}]",
                 f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pairs.csv" in err and "field 'y'" in err and "value '7'" in err


def test_policy_gradient_rows_report_both_step_counts(tmp_path):
    run_dir = tmp_path / "run"
    pg = "suite.policy_gradient"
    code = main(["benchmark", *TINY, "suite=gmm_pg", "suite.methods=[ctrl_oracle_reward,ctrl_pg,ddpo]",
                 f"{pg}.pathway.hidden=16", f"{pg}.settings.iterations=3", f"{pg}.settings.reference_pool=128",
                 f"{pg}.settings.reference_updates=5", f"{pg}.settings.n_steps=5", f"{pg}.ddpo.iterations=3",
                 f"hydra.run.dir={run_dir}"])
    assert code == 0
    rows = {r["method"]: r["metrics"] for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    for name in ("ctrl_pg", "ddpo"):
        assert rows[name]["train_steps"] == 5 and rows[name]["score_evals"] == 10
        assert {"accuracy_train_steps", "distance_to_target_train_steps"} <= set(rows[name])
        assert rows[name]["failed_rewards"] == 0
    # ctrl_pg scores its pool of pre-trained paths once (128) plus 3 batches of on-policy paths.
    assert rows["ctrl_pg"]["reward_queries"] > rows["ddpo"]["reward_queries"]
    assert (run_dir / "reward_vs_queries.png").stat().st_size > 0 and (run_dir / "training.png").exists()
