"""Small shape and random-draw helpers shared by the core (seeding: Lightning's ``seed_everything``)."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(v: Tensor, target_ndim: int) -> Tensor:
    """Append trailing singleton dimensions so that ``v`` broadcasts against a (B, ...) tensor.

    Works for any data shape (vectors, sequences, images), following k-diffusion's ``append_dims``,
    so that no code assumes 4-D image batches.

    Args:
        v: tensor of shape (batch_size,) or a scalar tensor.
        target_ndim: number of dimensions of the tensor ``v`` must broadcast against.
    """
    missing = target_ndim - v.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor against {target_ndim} dimensions")
    return v.reshape(*v.shape, *([1] * missing))


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None, *,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal draws made on the generator's device and moved to ``device``.

    Seeded CPU generators then give the same numbers whether the model runs on a CPU or a GPU, and a CPU
    generator never meets a CUDA tensor (torch refuses that pairing).
    """
    on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=on, dtype=dtype).to(device)


def rand(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None, *,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Uniform draws on [0, 1), made on the generator's device and moved to ``device`` (see :func:`randn`)."""
    on = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=on, dtype=dtype).to(device)
