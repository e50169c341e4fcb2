"""benchmarks/gpu: the device check's script parses, names only known estimators, and writes its table."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from ctrl_bio.estimators import ALIASES, ESTIMATORS

GPU = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu"


def test_check_script_parses_and_runs_every_estimator_there_is() -> None:
    assert subprocess.run(["bash", "-n", str(GPU / "check.sh")]).returncode == 0
    listed = re.search(r'^ESTIMATORS="([^"]*)"', (GPU / "check.sh").read_text(), re.M).group(1).split()
    assert set(listed) == set(ESTIMATORS) | set(ALIASES)  # ctrl-bio finetune runs every one


def test_table_puts_per_step_seconds_after_startup_beside_the_cpus(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_table", GPU / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = [("startup", 1, 4.0, "ok"), ("pretrain_dna", 200, 24.0, "ok"), ("suite_gmm", 1, 9.5, "failed")]
    (tmp_path / "cuda.tsv").write_text("task\tsteps\tseconds\tstatus\n" + "".join("\t".join(map(str, r)) + "\n"
                                                                                  for r in rows))
    (tmp_path / "README.md").write_text("# t\n<!-- table:start -->\nold\n<!-- table:end -->\nafter\n")
    monkeypatch.setattr(sys, "argv", ["table.py", "--runs", str(tmp_path), "--results", str(tmp_path),
                                      "--device", "cuda"])
    table.main()
    text = (tmp_path / "README.md").read_text()
    assert "old" not in text and text.endswith("<!-- table:end -->\nafter\n")
    assert "| pretrain_dna | 0.100 s/step (200 steps, 24.0 s in all) |" in text  # (24 - 4) / 200
    assert "| suite_gmm | failed (9.5 s) |" in text
