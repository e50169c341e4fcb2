"""The device check's table: seconds per step of each task on this device, beside the CPU's for the same work.

Called by check.sh. Reads ``<results>/<device>.tsv`` (task, steps, seconds, status), the CPU's record
``benchmarks/gpu/cpu.tsv`` and the speed suite's ``results.json`` of this run, and writes the table between the
markers of ``<results>/README.md`` (copied from ``benchmarks/gpu/README.md`` when the results go elsewhere).
Standard library only: it runs before anything else is known to work.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- table:start -->", "<!-- table:end -->"
SPEED = ("overhead_ratio", "overhead_ratio_checkpointed", "memory_ratio_100_25", "seconds_finetune_step_full",
         "seconds_network_forward_backward")


def read(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["task"]: row for row in csv.DictReader(f, delimiter="\t")}


def per_step(row: dict[str, str] | None, startup: float) -> str:
    """Whole seconds of a one-off task; for a training task, seconds per step after the process's startup."""
    if row is None:
        return "not run"
    if row["status"] != "ok":
        return f"failed ({float(row['seconds']):.1f} s)"
    seconds, steps = float(row["seconds"]), int(row["steps"])
    if steps == 1:
        return f"{seconds:.1f} s"
    return f"{max(seconds - startup, 0.0) / steps:.3f} s/step ({steps} steps, {seconds:.1f} s in all)"


def startup_of(rows: dict[str, dict[str, str]]) -> float:
    return float(rows["startup"]["seconds"]) if "startup" in rows else 0.0


def speed_line(runs: Path, task: str) -> str:
    path = runs / task / "results.json"
    if not path.is_file():
        return ""
    metrics = json.loads(path.read_text())["rows"][0]["metrics"]
    return ", ".join(f"{k} {metrics[k]:.3g}" for k in SPEED if metrics.get(k) is not None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--device", required=True)
    args = parser.parse_args()
    here = read(args.results / f"{args.device}.tsv")
    cpu = read(HERE / "cpu.tsv") if args.device != "cpu" else here
    gpu = here if args.device != "cpu" else read(HERE / "cuda.tsv")
    lines = ["| task | GPU | CPU (same work per step) | speed suite (this device) |", "|---|---|---|---|"]
    gpu_startup, cpu_startup = startup_of(gpu), startup_of(cpu)
    for task in dict.fromkeys([*here, *cpu, *gpu]):
        lines.append(f"| {task} | {per_step(gpu.get(task), gpu_startup)} | {per_step(cpu.get(task), cpu_startup)} | "
                     f"{speed_line(args.runs, task) if task.startswith('speed') else ''} |")
    table = "\n".join(lines)
    print(table)
    readme = args.results / "README.md"
    if not readme.is_file():
        shutil.copy(HERE / "README.md", readme)
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
