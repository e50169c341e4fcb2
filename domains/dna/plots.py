"""Plots of the DNA suite: motif frequencies of generated vs real sequences (accuracy bars: ctrl_bio.plots)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from domains.dna.data import CELL_TYPES  # noqa: E402


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
