"""Scatter plots of mixture samples in the plane of the two leading principal axes of the means."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from domains.gmm.mixture import GaussianMixture  # noqa: E402


def projection(mixture: GaussianMixture) -> Tensor:
    """(d, 2) projection onto the top two principal directions of the component means (identity in 2-D)."""
    if mixture.dim <= 2:
        return torch.eye(mixture.dim, 2)
    centred = mixture.means - mixture.means.mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:2].T


def plot_samples(mixture: GaussianMixture, samples: dict[str, Tensor], y: Tensor, path: str | Path,
                 max_points: int = 1500) -> Path:
    """One panel per method, points coloured by the requested class, component means marked."""
    proj = projection(mixture)
    means = mixture.means @ proj
    ncols = min(len(samples), 5)  # rows of five panels stay readable however many methods there are
    nrows = -(-len(samples) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.1 * nrows + 0.3), sharex=True, sharey=True,
                             squeeze=False)
    axes = list(axes.flat)
    for ax in axes[len(samples):]:
        ax.set_visible(False)
    for ax, (name, x) in zip(axes, samples.items()):
        p = (x[:max_points] @ proj).numpy()
        ax.scatter(p[:, 0], p[:, 1], c=y[:max_points].numpy(), cmap="tab10", s=3, alpha=0.5, vmin=0, vmax=9)
        ax.scatter(means[:, 0], means[:, 1], marker="x", c="k", s=30)
        ax.set_title(name, fontsize=9)
    fig.suptitle("samples coloured by requested class (x: component means)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
