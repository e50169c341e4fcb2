"""Summarise recorded gmm runs against the acceptance criteria of the Foundation and Harness issues.

Usage: python benchmarks/gmm/summarize.py benchmarks/gmm/<run> [...]   (prints Markdown)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def criteria(rows: dict[str, dict]) -> list[tuple[str, float, float, bool]]:
    """(check, value, bound, passed) for every criterion whose rows are present."""
    exact, pre = rows.get("exact_guidance"), rows.get("pretrained")
    checks = []
    oracle = rows.get("ctrl_oracle_reward")
    if oracle and exact:
        checks += [
            ("ctrl_oracle_reward accuracy >= exact - 0.03", oracle["accuracy"], exact["accuracy"] - 0.03,
             oracle["accuracy"] >= exact["accuracy"] - 0.03),
            ("ctrl_oracle_reward component_tv <= 0.1", oracle["component_tv"], 0.1, oracle["component_tv"] <= 0.1),
            ("ctrl_oracle_reward distance <= 2 x noise_floor", oracle["distance_to_target"],
             2 * oracle["noise_floor"], oracle["distance_to_target"] <= 2 * oracle["noise_floor"]),
            ("ctrl_oracle_reward objective >= exact - 0.1", oracle["objective"], exact["objective"] - 0.1,
             oracle["objective"] >= exact["objective"] - 0.1),
        ]
    ctrl = rows.get("ctrl")
    if ctrl and exact and pre:
        checks += [
            ("ctrl accuracy >= exact - 0.06", ctrl["accuracy"], exact["accuracy"] - 0.06,
             ctrl["accuracy"] >= exact["accuracy"] - 0.06),
            ("ctrl accuracy >= pretrained + 0.2", ctrl["accuracy"], pre["accuracy"] + 0.2,
             ctrl["accuracy"] >= pre["accuracy"] + 0.2),
        ]
    for baseline in ("cfg", "dps", "classifier_guidance", "best_of_n"):  # issue 4: CTRL against the baselines
        other = rows.get(baseline)
        if ctrl and other:
            checks.append((f"ctrl accuracy >= {baseline} accuracy", ctrl["accuracy"], other["accuracy"],
                           ctrl["accuracy"] >= other["accuracy"]))
            if "objective" in other:
                checks.append((f"ctrl objective >= {baseline} objective", ctrl["objective"], other["objective"],
                               ctrl["objective"] >= other["objective"]))
    return checks


def main(paths: list[str]) -> None:
    for path in paths:
        result = json.loads((Path(path) / "results.json").read_text())
        rows = {r["method"]: r["metrics"] for r in result["rows"]}
        info = result.get("info", {})
        optimum = info.get("optimum_objective")
        n_classes = info.get("n_classes")
        n_classes = " x ".join(map(str, n_classes)) if isinstance(n_classes, list) else n_classes
        print(f"### `{Path(path).name}` (d={info.get('dim')}, {info.get('n_components')} components, "
              f"{n_classes} classes; optimum J = {'-' if optimum is None else f'{optimum:.4g}'})\n")
        print((Path(path) / "results.md").read_text().split("\n", 2)[2])
        print("| criterion | value | bound | pass |\n|---|---|---|---|")
        for name, value, bound, ok in criteria(rows):
            print(f"| {name} | {value:.4g} | {bound:.4g} | {'yes' if ok else 'NO'} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
