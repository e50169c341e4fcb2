"""``ctrl-bio benchmark suite=images``: JPEG compressibility (and brightness) of real photograph patches on a CPU.

The CTRL paper's image experiment (Zhao et al. 2024, Sec. 6.3) adds JPEG-size classes to Stable Diffusion; this suite
is its CPU-sized counterpart, judged by the real JPEG size of every generated patch (Pillow, quality 75), never by
the reward classifier. The pre-trained model is a pixel-space diffusers ``UNet2DModel`` trained on 16x16 grey patches
of the photographs bundled in scikit-image (:mod:`domains.images.data`); ``label=compress`` is the default task,
``label=[compress,brightness]`` the multi-label task from two disjoint pair sets.

Rows are :mod:`ctrl_bio.rows`' (``pretrained``, ``ctrl``, ``ctrl_alpha0``, ``cfg``, ``classifier_guidance``, ``dps``,
``best_of_n``, ``real_data``), all with the same sampler: Euler-Maruyama on a quadratic time grid (fine steps near
the data, so the last step adds no visible noise). Metrics: ``accuracy`` and ``macro_f1`` of the exact labels (per
label when there are several), ``fd_pooled`` (Frechet distance of 2x2-pooled patches to real held-out patches with
the same requested labels; ``real_data`` gives its finite-sample floor), ``diversity`` (RMS distance between samples of
one request), ``jpeg_bytes``, ``kl`` and ``objective``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ctrl_bio.harness import SuiteResult
from ctrl_bio.labels import LabelledPairs
from ctrl_bio.metrics import frechet_distance
from ctrl_bio.objective import Objective
from ctrl_bio.rows import (
    METHODS,
    BaseSuiteContext,
    RowRunner,
    label_metrics,
    load_task,
    objective_metrics,
    plot_histories,
    run_rows,
)
from ctrl_bio.sampling import Spacing
from domains.images.data import from_uint8, jpeg_bytes, load_patches, to_uint8
from domains.images.domain import ImageDomain
from domains.images.nets import NoisyPatchCNN

log = logging.getLogger(__name__)

LogProbFn = Callable[[Tensor], Tensor]


def diversity(x: Tensor, y: Tensor) -> float:
    """Mean RMS pixel distance between two samples of the same request, averaged over requests (0: mode collapse)."""
    values = []
    for combo in torch.unique(y, dim=0):
        group = x[(y == combo).all(1)].flatten(1).double()
        if group.shape[0] > 1:
            d = torch.cdist(group, group) / group.shape[1] ** 0.5
            values.append(float(d.sum() / (group.shape[0] * (group.shape[0] - 1))))
    return float(np.mean(values)) if values else float("nan")


class ImageContext(BaseSuiteContext):
    """What every row shares: domain, pre-trained network, labels, requests, real held-out patches, metrics."""

    def __init__(self, domain: ImageDomain, specs: list[dict], pairs: list[LabelledPairs], eval_fns: list[LogProbFn],
                 *, n_eval: int, n_select: int, n_steps: int, t_end: float, spacing: Spacing, seed: int,
                 batch_size: int, objective: Objective = Objective(), device: str = "cpu",
                 precision: str = "32"):
        super().__init__(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps,
                         t_end=t_end, spacing=spacing, seed=seed, batch_size=batch_size, objective=objective,
                         device=device, precision=precision)
        self.x_test = load_patches("test").x
        self.test_labels = torch.stack([f(self.x_test).argmax(1) for f in eval_fns], 1)
        self.x_train = domain.training_data()
        # A second draw of real patches for the same requests: what fd_pooled compares every row with.
        self.reference = self.real_requests(self.y_eval, seed + 5000)

    def score(self, x: Tensor, kl: Tensor | None, y: Tensor) -> tuple[dict[str, float], dict[str, Any]]:
        """Every metric of samples x for requests y, and per-class details for the plots."""
        u8 = to_uint8(x)
        x = from_uint8(u8)  # score the 8-bit images that are saved, not the continuous samples
        log_probs = [f(x) for f in self.eval_fns]
        metrics, details = label_metrics(log_probs, y, self.names, self.n_classes)
        metrics["fd_pooled"] = frechet_distance(F.avg_pool2d(x, 2), F.avg_pool2d(self.reference, 2))
        metrics["diversity"] = diversity(x, y)
        sizes = jpeg_bytes(u8)
        metrics["jpeg_bytes"] = float(sizes.mean())
        if "compress" in self.names:
            k = self.names.index("compress")
            details["jpeg_bytes_by_request"] = [sizes[(y[:, k] == c).numpy()].tolist()
                                                for c in range(self.n_classes[k])]
        metrics |= objective_metrics(log_probs, y, kl, self.objective)
        return metrics, details

    def noisy_classifier(self, n_classes: int, hidden: int = 32) -> NoisyPatchCNN:
        """Classifier guidance's network of noisy patches."""
        return NoisyPatchCNN(n_classes, hidden=hidden)


def run_suite(domain: ImageDomain, *, run_dir: str | Path, labels: list[dict[str, Any]], n_eval: int = 256,
              n_select: int = 64, n_steps: int = 50, t_end: float = 1e-3, spacing: Spacing = "quadratic",
              batch_size: int = 256, method: dict[str, Any] | None = None, alpha0: dict[str, Any] | None = None,
              baselines: dict[str, Any] | None = None, methods: tuple[str, ...] = METHODS, seed: int = 0,
              progress: bool = True, write_samples: bool = True, device: str = "cpu",
              precision: str = "32") -> SuiteResult:
    """Run the image suite's rows for one label task (one label, or several from separate pair sets).

    Args:
        domain: the image domain (its SDE and pre-trained UNet).
        labels: label definitions (``configs/label/{compress,brightness}.yaml`` or a user's own).
        n_eval: evaluation requests, balanced over label combinations; ``n_select``: requests of their own on
            which guidance scales are chosen (by the reward classifier's J).
        n_steps, t_end, spacing: the sampler of every row.
        method, alpha0, baselines: settings of ``ctrl``, ``ctrl_alpha0`` and the baselines (:class:`RowRunner`).
        write_samples: write each row's patches (``samples/<method>.npz``: uint8 images and requested labels) and a
            grid per row (``samples/<method>.png``).
        device, precision: where the pre-trained network sits and the rows are sampled, and whether under
            bfloat16 autocast (``device=``, ``precision=``; :class:`ctrl_bio.rows.BaseSuiteContext`).
    """
    run_dir = Path(run_dir)
    method, baselines = dict(method or {}), dict(baselines or {})
    specs, pairs, eval_fns, info = load_task(labels, domain, seed)
    info |= {"n_eval": n_eval, "n_steps": n_steps, "spacing": spacing}
    ctx = ImageContext(domain, specs, pairs, eval_fns, n_eval=n_eval, n_select=n_select, n_steps=n_steps,
                       t_end=t_end, spacing=spacing, seed=seed, batch_size=batch_size,
                       objective=Objective.of(method), device=device,
                       precision=precision)
    info["test_patches"] = int(ctx.x_test.shape[0])
    runner = RowRunner(ctx, method, dict(alpha0 or {}), baselines, run_dir, progress, info)
    title = " + ".join(f"{n} ({c} classes)" for n, c in zip(ctx.names, ctx.n_classes))

    def write(name: str, x: Tensor) -> None:
        from domains.images.plots import plot_sample_grid

        out = run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / f"{name}.npz", images=to_uint8(x), requested=ctx.y_eval.numpy(),
                            label_names=np.array(ctx.names))
        plot_sample_grid(to_uint8(x), ctx.y_eval, ctx.names, out / f"{name}.png", title=name)

    rows, details = run_rows(runner, methods, title, ctx.score, write if write_samples else None)
    info["details"] = details
    from domains.images.plots import plot_confusion, plot_jpeg_sizes

    for name in ctx.names:
        plot_confusion({m: d[f"confusion_{name}"] for m, d in details.items()}, name, run_dir / f"confusion_{name}.png")
    if "compress" in ctx.names:
        edges = ctx.specs[ctx.names.index("compress")]["bins"]
        plot_jpeg_sizes({m: d["jpeg_bytes_by_request"] for m, d in details.items()}, edges,
                        run_dir / "jpeg_sizes.png")
    plot_histories(runner, rows, run_dir)
    return SuiteResult("images", rows, info)
