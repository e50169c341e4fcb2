"""Plots of the DNA suite: per-class accuracy bars and motif frequencies of generated vs real sequences."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from domains.dna.data import CELL_TYPES  # noqa: E402


def plot_per_class_accuracy(per_class: dict[str, list[float | None]], label: str, path: str | Path) -> Path:
    """Grouped bars: for each requested class, the share of each method's samples scored as that class."""
    methods = list(per_class)
    n_classes = len(next(iter(per_class.values())))
    names = list(CELL_TYPES) if label == "celltype" and n_classes == len(CELL_TYPES) else [str(c) for c in
                                                                                            range(n_classes)]
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


def plot_motif_scatter(generated: dict[str, np.ndarray], real: np.ndarray, path: str | Path) -> Path:
    """One panel per method: motif-hit frequency of generated sequences per cell type against real test ones.

    Each point is one (cell type, motif); points on the diagonal mean the method reproduces the motif content
    of real sequences of the requested cell type.
    """
    fig, axes = plt.subplots(1, len(generated), figsize=(3.6 * len(generated), 3.6), squeeze=False)
    hi = float(np.nanmax([real.max()] + [g.max() for g in generated.values()])) * 1.05
    for ax, (name, freq) in zip(axes[0], generated.items()):
        for c, cell in enumerate(CELL_TYPES):
            ax.scatter(real[c], freq[c], s=10, alpha=0.7, label=cell)
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_title(name)
        ax.set_xlabel("real test sequences")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("generated for that cell type")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("JASPAR motif-hit frequency per cell type", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
