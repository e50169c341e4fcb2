"""Plots every suite shares: objective, reward and KL over fine-tuning."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


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
    """Reward and path KL against the number of reward queries, one line per method.

    For black-box rewards the query count, not the update count, is the cost (``PolicyGradientResult.history``).
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for name, history in histories.items():
        queries = [h["reward_queries"] for h in history]
        for ax, key in zip(axes, ("reward", "kl")):
            if len(set(queries)) == 1:  # every query made up front (score matching on a scored pool): its end point
                ax.plot(queries[-1:], [history[-1][key]], marker="*", ms=12, ls="none", label=f"{name} (final)")
            else:
                ax.plot(queries, [h[key] for h in history], lw=1.2, label=name)
    for ax, title in zip(axes, ("reward of on-policy samples", "path KL to pre-trained")):
        ax.set_title(title)
        ax.set_xlabel("reward queries")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
