"""The estimator ablation as one Markdown table: one run folder per estimator, each with `pretrained`, `optimum` (or
`exact_guidance` on the mixture) and `ctrl` rows.

Usage: python benchmarks/estimators/summarize.py <run folder> [...]   (prints Markdown)

Columns: the suite's headline metric (accuracy), fraction_of_optimum, KL, J under the evaluation likelihoods, the
domain's quality metric where it has one (validity, naturalness, fd_pooled, distance_to_target / noise_floor,
component_tv), and the seconds of the `ctrl` row. The estimator and its budget come from the run's config.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

QUALITY = ("validity", "naturalness", "kmer_correlation", "fd_pooled", "component_tv", "distance_to_target",
           "noise_floor")


def method_of(run: Path) -> dict:
    """The run's method settings, wherever its config keeps them (the older `suite.method`, else `method`)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    return (cfg.get("suite") or {}).get("method") or cfg.get("method") or {}


def row_cells(run: Path) -> list[str]:
    rows = {r["method"]: r["metrics"] for r in json.loads((run / "results.json").read_text())["rows"]}
    ctrl, pre = rows["ctrl"], rows["pretrained"]
    top = rows.get("optimum") or rows.get("exact_guidance") or {}
    method = method_of(run)
    budget = {k: method[k] for k in ("sm_steps", "steps", "value_steps", "warm_start") if k in method}

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    quality = "; ".join(f"{k} {fmt(ctrl[k])} (pre {fmt(pre.get(k))})" for k in QUALITY if k in ctrl)
    return [f"`{method.get('estimator', '?')}` {budget}", fmt(pre.get("accuracy")), fmt(top.get("accuracy")),
            fmt(ctrl.get("accuracy")), fmt(ctrl.get("fraction_of_optimum")), fmt(ctrl.get("kl")),
            fmt(ctrl.get("objective")), quality, fmt(ctrl.get("seconds")), f"`{run}`"]


def main(runs: list[str]) -> str:
    head = ["estimator (budget)", "pretrained", "optimum", "ctrl", "fraction_of_optimum", "KL", "J", "quality",
            "ctrl seconds", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(Path(r))) + " |" for r in runs]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
