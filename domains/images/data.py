"""Real image patches for the CPU image suite, cut from the photographs that ship inside scikit-image.

Why these: scikit-image's ``skimage.data`` bundles about twenty real photographs and micrographs in its wheel (no
download), with every kind of texture from flat sky to gravel, so the JPEG size of a patch, the label of the CTRL
paper's compressibility task, spreads over a wide range. sklearn's digits were the other candidate, but upscaled
8x8 strokes on a flat background give JPEG sizes that differ by a few bytes only.

Patches are 16x16 grey levels (colour photographs enter as their ITU-R 601 luminance), cut on a non-overlapping grid
from each image at full size and at half size (2x2 mean pooling), so they hold both fine texture and larger
structure. The split is fixed by a crc32 of each patch's name (image, scale, row, column): a tenth is ``test``
(held-out real data, the suite's ceiling), the rest ``training`` (what the pre-trained model learns). Pixels are
x = u / 127.5 - 1 in [-1, 1] for grey level u in 0..255.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

PATCH = 16
#: skimage.data images used, all real photographs or micrographs bundled in the scikit-image wheel.
IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel", "text", "clock", "cell")
JPEG_QUALITY = 75
#: Patches kept per image (both scales together): the large retina and Hubble images would otherwise make up half
#: the set, most of it black background.
MAX_PER_IMAGE = 1500


@dataclass(frozen=True)
class PatchSet:
    """Grey-level patches (N, 1, 16, 16) in [-1, 1] with their names ``image:scale:row:col``."""

    x: Tensor
    names: tuple[str, ...]

    def __len__(self) -> int:
        return self.x.shape[0]


def luminance(image: np.ndarray) -> np.ndarray:
    """Grey levels (H, W) uint8 of a grey or RGB(A) image (ITU-R 601 weights, as Pillow's ``convert('L')``)."""
    if image.ndim == 2:
        return image.astype(np.uint8) if image.dtype != bool else (image * 255).astype(np.uint8)
    rgb = image[..., :3].astype(np.float64)
    return np.clip(np.rint(rgb @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 mean pooling of a grey image, rounded back to uint8."""
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    pooled = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return np.rint(pooled).astype(np.uint8)


def split_of(name: str) -> str:
    """``test`` for a tenth of the patches (by crc32 of the name), else ``training``."""
    return "test" if zlib.crc32(name.encode()) % 10 == 0 else "training"


@lru_cache(maxsize=1)
def _all_patches() -> tuple[np.ndarray, tuple[str, ...]]:
    import skimage.data

    patches, names = [], []
    for image_name in IMAGES:
        grey = luminance(getattr(skimage.data, image_name)())
        mine: list[tuple[int, str, np.ndarray]] = []
        for scale, img in ((1, grey), (2, halve(grey))):
            rows, cols = img.shape[0] // PATCH, img.shape[1] // PATCH
            grid = img[:rows * PATCH, :cols * PATCH].reshape(rows, PATCH, cols, PATCH).transpose(0, 2, 1, 3)
            for r in range(rows):
                for c in range(cols):
                    name = f"{image_name}:{scale}:{r}:{c}"
                    mine.append((zlib.crc32(name.encode() + b"keep"), name, grid[r, c]))
        for _, name, patch in sorted(mine, key=lambda m: m[0])[:MAX_PER_IMAGE]:  # a fixed pseudo-random subset
            patches.append(patch)
            names.append(name)
    return np.stack(patches), tuple(names)


def load_patches(split: str = "training") -> PatchSet:
    """The patches of one split (``training``, ``test`` or ``all``), in a fixed order."""
    if split not in ("training", "test", "all"):
        raise ValueError(f"split must be 'training', 'test' or 'all', got {split!r}")
    u8, names = _all_patches()
    keep = [i for i, n in enumerate(names) if split == "all" or split_of(n) == split]
    return PatchSet(from_uint8(u8[keep]), tuple(names[i] for i in keep))


def from_uint8(u8: np.ndarray) -> Tensor:
    """Grey levels (N, H, W) uint8 -> (N, 1, H, W) float in [-1, 1]."""
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W) uint8, clipped and rounded (what is saved and JPEG-encoded)."""
    u = torch.clamp(torch.round((x.detach().float().cpu()[:, 0] + 1.0) * 127.5), 0, 255)
    return u.to(torch.uint8).numpy()


def jpeg_bytes(u8: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Size in bytes of each image encoded by Pillow as baseline JPEG at ``quality``: the one JPEG sizer of the domain.

    Grey images (N, H, W) or RGB images (N, H, W, 3), uint8. The encoder's settings are fixed (no optimised Huffman
    tables, no progressive mode; Pillow's default 4:2:0 chroma subsampling for RGB), so the size is a deterministic
    function of the pixels: the exact label of the compressibility tasks (this suite's patches, Stable Diffusion's
    :func:`domains.images.stable_diffusion.jpeg_kb`).
    """
    from PIL import Image

    u8 = np.asarray(u8)
    if u8.dtype != np.uint8 or not (u8.ndim == 3 or (u8.ndim == 4 and u8.shape[-1] == 3)):
        raise ValueError(f"jpeg_bytes needs uint8 images of shape (N, H, W) or (N, H, W, 3), got {u8.dtype} {u8.shape}")
    sizes = np.empty(len(u8), dtype=np.int64)
    for i, img in enumerate(u8):
        buf = io.BytesIO()
        # Mode from the array: "L" for (H, W), "RGB" for (H, W, 3).
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, optimize=False)
        sizes[i] = buf.tell()
    return sizes


def brightness(u8: np.ndarray) -> np.ndarray:
    """Mean grey level of each image (N, H, W) uint8, in [0, 1]."""
    return u8.reshape(len(u8), -1).mean(axis=1) / 255.0
