"""Label pair callables and exact label functions of the image domain (used by ``configs/label/*.yaml``).

- ``compress``: JPEG compressibility, the size in bytes of the patch encoded by Pillow at quality 75, in four bins at
  the training patches' quartiles (the CTRL paper's compressibility classes, Zhao et al. 2024, Sec. 6.3, scaled down
  to 16x16 patches). Exact: the generated patch is actually encoded.
- ``brightness``: mean grey level in two bins at the training median. Exact.

Each label draws its pairs from its own half of the training patches (split by a crc32 of the patch name), so two
labels come from separate, disjoint pair data sets, as in the paper's multi-label experiment.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.labels import bin_log_prob
from domains.images.data import brightness, jpeg_bytes, load_patches, to_uint8

#: Which half of the training patches each label's pairs come from.
PAIR_HALVES = {"compress": 0, "brightness": 1}


def pair_pool(half: int) -> Tensor:
    """The training patches of one half (0 or 1), fixed by a crc32 of their names."""
    patches = load_patches("training")
    keep = [i for i, n in enumerate(patches.names) if zlib.crc32(n.encode() + b"pairs") % 2 == half]
    return patches.x[keep]


def _draw(n: int | None, generator: torch.Generator, half: int) -> Tensor:
    pool = pair_pool(half)
    if n is None:
        return pool
    if n > pool.shape[0]:
        raise ValueError(f"asked for {n} pairs but half {half} of the training patches holds {pool.shape[0]}")
    return pool[torch.randperm(pool.shape[0], generator=generator)[:n]]


def jpeg_size(x: Tensor) -> Tensor:
    """JPEG size in bytes of each patch (N, 1, H, W) in [-1, 1], after rounding to grey levels, (N,) float64."""
    return torch.from_numpy(jpeg_bytes(to_uint8(x)).astype(np.float64))


def mean_brightness(x: Tensor) -> Tensor:
    """Mean grey level in [0, 1] of each patch after rounding, (N,) float64."""
    return torch.from_numpy(brightness(to_uint8(x)))


def compress_pairs(domain, n: int | None, generator: torch.Generator,
                   half: int = PAIR_HALVES["compress"]) -> tuple[Tensor, Tensor]:
    """n (patch, JPEG bytes) pairs; the label config bins the size."""
    x = _draw(n, generator, half)
    return x, jpeg_size(x)


def brightness_pairs(domain, n: int | None, generator: torch.Generator,
                     half: int = PAIR_HALVES["brightness"]) -> tuple[Tensor, Tensor]:
    """n (patch, mean grey level) pairs; the label config bins it."""
    x = _draw(n, generator, half)
    return x, mean_brightness(x)


def compress_log_prob(domain, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact compressibility label: the bin of the patch's real JPEG size."""
    return bin_log_prob(jpeg_size, edges)


def brightness_log_prob(domain, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact brightness label: the bin of the patch's mean grey level."""
    return bin_log_prob(mean_brightness, edges)
