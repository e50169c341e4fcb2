"""The ``ctrl-bio`` entry point: one-line errors, and a tiny end-to-end gmm benchmark."""

import json
import subprocess
import sys

import pytest

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
                 "method.pool_size=1000", "suite.pathway.hidden=32", "suite.classifier.epochs=20", "progress=false",
                 f"hydra.run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["suite"] == "gmm"
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["pretrained", "exact_guidance", "ctrl_oracle_reward", "ctrl", "real_data"]
    for row in results["rows"]:
        for key in ("accuracy", "macro_f1", "distance_to_target", "noise_floor", "component_tv"):
            assert key in row["metrics"]
    pre, exact = results["rows"][0]["metrics"], results["rows"][1]["metrics"]
    assert exact["accuracy"] > pre["accuracy"] + 0.3
    assert (run_dir / "results.md").read_text().startswith("# Suite `gmm`")
    assert (run_dir / "samples.png").stat().st_size > 0 and (run_dir / "training.png").stat().st_size > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "ctrl.safetensors").exists()
