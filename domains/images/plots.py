"""Plots of the image suite: sample grids (a row per requested class), confusion matrices, JPEG sizes per class."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_sample_grid(images: np.ndarray, y: Tensor, names: list[str], path: str | Path, *, per_row: int = 10,
                     title: str = "") -> Path:
    """One row per requested label combination, ``per_row`` of its samples side by side (grey, 0..255)."""
    combos = torch.unique(y, dim=0)
    fig, axes = plt.subplots(len(combos), 1, figsize=(per_row * 0.55 + 1.6, len(combos) * 0.62 + 0.5), squeeze=False)
    for ax, combo in zip(axes[:, 0], combos):
        idx = (y == combo).all(1).nonzero().squeeze(1)[:per_row].numpy()
        strip = np.concatenate([np.pad(images[i], 1, constant_values=255) for i in idx], axis=1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(", ".join(f"{n}={v}" for n, v in zip(names, combo.tolist())), rotation=0, ha="right",
                      va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_confusion(confusions: dict[str, list[list[int]]], label: str, path: str | Path) -> Path:
    """One panel per method: requested class (rows) against measured class (columns), rows normalised."""
    methods = list(confusions)
    fig, axes = plt.subplots(1, len(methods), figsize=(2.3 * len(methods) + 0.6, 2.6), squeeze=False)
    for ax, m in zip(axes[0], methods):
        c = np.array(confusions[m], dtype=float)
        c = c / np.maximum(c.sum(1, keepdims=True), 1)
        ax.imshow(c, vmin=0, vmax=1, cmap="Blues")
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if c[i, j] > 0.5 else "black")
        ax.set_title(m, fontsize=8)
        ax.set_xlabel("measured", fontsize=7)
        ax.set_ylabel("requested", fontsize=7)
        ax.set_xticks(range(c.shape[1]))
        ax.set_yticks(range(c.shape[0]))
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{label}: confusion (exact label of the generated images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_jpeg_sizes(sizes: dict[str, list[list[int]]], edges: list[float], path: str | Path) -> Path:
    """Box plots of the measured JPEG size per requested compressibility class, one group per method; dashed lines
    are the class edges, so a box inside its band means the class was met."""
    methods = list(sizes)
    n_classes = len(next(iter(sizes.values())))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 3.6))
    width = 0.8 / n_classes
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, n_classes))
    for c in range(n_classes):
        data = [sizes[m][c] or [np.nan] for m in methods]
        pos = np.arange(len(methods)) + (c - (n_classes - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for patch in bp["boxes"]:
            patch.set_facecolor(colors[c])
        ax.plot([], [], color=colors[c], lw=6, label=f"requested class {c}")
    for e in edges:
        ax.axhline(e, color="k", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, fontsize=7)
    ax.set_ylabel("JPEG size (bytes, quality 75)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
