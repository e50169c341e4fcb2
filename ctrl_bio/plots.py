"""Plots every suite shares: objective, reward and KL over fine-tuning; accuracy per requested class."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(histories: dict[str, list[dict]], path: str | Path, optimum: float | None = None) -> Path:
    """J, reward and KL against the update count, one line per method (from ``FinetuneResult.history``)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("objective", "reward", "kl")):
            ax.plot(steps, [h[key] for h in history], marker="o", ms=3, label=name)
    if optimum is not None:
        axes[0].axhline(optimum, color="k", ls="--", lw=1, label="optimum E log p(y)")
    for ax, title in zip(axes, ("objective J", "reward E[log p(y|x0)]", "path KL to pre-trained")):
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    if optimum is not None:  # keep the optimum in view without letting a bad first estimate squash the curves
        axes[0].set_ylim(bottom=max(axes[0].get_ylim()[0], optimum - 10))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_reward_vs_queries(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """Reward and path KL against the number of reward queries, one line per method (each batch faint, the running
    mean over 10 batches bold).

    For black-box rewards the query count, not the update count, is the cost (``PolicyGradientResult.history``).
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for name, history in histories.items():
        queries = [h["reward_queries"] for h in history]
        for ax, key in zip(axes, ("reward", "kl")):
            if len(set(queries)) == 1:  # every query made up front (score matching on a scored pool): its end point
                ax.plot(queries[-1:], [history[-1][key]], marker="*", ms=12, ls="none", label=f"{name} (final)")
            else:
                values = np.array([h[key] for h in history], dtype=float)
                line, = ax.plot(queries, values, lw=0.8, alpha=0.35)
                # Batch estimates are noisy (tens of paths each): the running mean over 10 batches is the trend.
                k = min(10, len(values))
                trend = np.convolve(values, np.ones(k) / k, mode="valid")
                ax.plot(queries[k - 1:], trend, lw=1.8, color=line.get_color(), label=f"{name} ({k}-batch mean)")
    for ax, title in zip(axes, ("reward of on-policy samples", "path KL to pre-trained")):
        ax.set_title(title)
        ax.set_xlabel("reward queries")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_per_class_accuracy(per_class: dict[str, list[float | None]], label: str, path: str | Path,
                            class_names: list[str] | None = None) -> Path:
    """Grouped bars: for each requested class, the share of each method's samples scored as that class."""
    methods = list(per_class)
    n_classes = len(next(iter(per_class.values())))
    names = class_names if class_names and len(class_names) == n_classes else [str(c) for c in range(n_classes)]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * n_classes, 3.6))
    for i, m in enumerate(methods):
        values = [np.nan if v is None else v for v in per_class[m]]
        ax.bar(np.arange(n_classes) + (i - (len(methods) - 1) / 2) * width, values, width, label=m)
    ax.set_xticks(np.arange(n_classes), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (evaluation oracle / exact)")
    ax.set_title(f"{label}: accuracy per requested class")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_fraction_of_optimum(rows: list, path: str | Path, metric: str = "accuracy") -> Path | None:
    """Each row's ``metric`` as a bar between the pre-trained floor and the optimum of J (dashed lines), the learned
    rows annotated with ``fraction_of_optimum``; None (no file) when the suite ran no ``optimum`` row."""
    named = {r.method: r.metrics for r in rows if r.metrics.get(metric) is not None}
    if "optimum" not in named or "pretrained" not in named:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 0.9 * len(named)), 3.6))
    names = list(named)
    ax.bar(range(len(names)), [named[n][metric] for n in names], color="tab:blue", alpha=0.7)
    for level, style, label in ((named["pretrained"][metric], ":", "pre-trained"),
                                (named["optimum"][metric], "--", "optimum of J")):
        ax.axhline(level, color="k", ls=style, lw=1, label=label)
    for i, n in enumerate(names):
        frac = named[n].get("fraction_of_optimum")
        if frac is not None:
            ax.annotate(f"{frac:.2f}", (i, named[n][metric]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (numbers: fraction_of_optimum)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
