"""What every benchmark suite writes: ``results.json``, ``results.md`` and training-curve plots.

A suite returns :class:`SuiteResult`; rows carry DESIGN.md's method and metric names. The harness
knows nothing about domains: suites reach it with plain data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRIC_ORDER = ("accuracy", "macro_f1", "distance_to_target", "noise_floor", "component_tv", "objective", "kl",
                "score_evals", "seconds")


@dataclass
class Row:
    """One method on one label: ``metrics`` maps metric names to numbers (None where it does not apply)."""

    method: str
    label: str
    metrics: dict[str, float | None]


@dataclass
class SuiteResult:
    """A suite's rows plus anything it wants recorded beside them (configuration, classifier reports)."""

    suite: str
    rows: list[Row]
    info: dict[str, Any] = field(default_factory=dict)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[Row]) -> str:
    """Rows as a Markdown table, known metrics first in DESIGN.md's order, then the suite's own."""
    names: list[str] = [m for m in METRIC_ORDER if any(m in r.metrics for r in rows)]
    names += sorted({m for r in rows for m in r.metrics} - set(names))
    lines = ["| method | label | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        lines.append(f"| {r.method} | {r.label} | " + " | ".join(_fmt(r.metrics.get(m)) for m in names) + " |")
    return "\n".join(lines) + "\n"


def write_results(result: SuiteResult, run_dir: str | Path) -> Path:
    """Write ``results.json`` ({"suite", "rows", "info"}) and ``results.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"suite": result.suite, "rows": [asdict(r) for r in result.rows], "info": result.info}
    (run_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (run_dir / "results.md").write_text(f"# Suite `{result.suite}`\n\n" + markdown_table(result.rows))
    return run_dir / "results.json"
