"""Patch classifiers of the image domain: a clean-patch CNN (reward classifiers) and a noisy one (classifier guidance).

Both are small all-convolutional networks ending in global mean and max pooling: JPEG size and brightness are sums
over the patch (of quantised DCT coefficients, of grey levels), so the features are pooled wherever they sit. They
are differentiable in x: DPS and CTRL's pathwise estimator take gradients through them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.model import fourier_features


class PatchCNN(nn.Module):
    """Logits (B, n_classes) of grey patches (B, 1, H, W).

    Args:
        n_classes: number of classes.
        hidden: channels of the first two convolutions (the third has twice as many).
        dropout: dropout before the linear head.
    """

    def __init__(self, n_classes: int, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, 2 * hidden, 3, padding=1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, n_classes))

    def features(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        """Pooled features; ``shift`` (B, hidden) is added after the first two convolutions (a time embedding)."""
        s = 0.0 if shift is None else shift[:, :, None, None]
        h = F.silu(self.conv1(x) + s)
        h = F.avg_pool2d(F.silu(self.conv2(h) + s), 2)
        h = F.silu(self.conv3(h))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grey patches of shape (batch_size, 1, H, W), got {tuple(x.shape)}")
        return self.head(self.features(x))


def patch_classifier(x_shape: tuple[int, ...], n_classes: int, hidden: int = 32, dropout: float = 0.1) -> PatchCNN:
    """The label config's classifier factory (``_target_: domains.images.nets.patch_classifier``)."""
    if len(x_shape) != 3 or x_shape[0] != 1:
        raise ValueError(f"patch_classifier expects samples of shape (1, H, W), got {tuple(x_shape)}")
    return PatchCNN(n_classes, hidden=hidden, dropout=dropout)


class NoisyPatchCNN(nn.Module):
    """Logits of p(y | x_t, t) for classifier guidance: :class:`PatchCNN` whose features are shifted by an embedding
    of t (the noisy classifier of Dhariwal & Nichol 2021, scaled down)."""

    def __init__(self, n_classes: int, hidden: int = 32, n_fourier: int = 32):
        super().__init__()
        self.n_fourier = n_fourier
        self.cnn = PatchCNN(n_classes, hidden=hidden, dropout=0.0)
        self.time = nn.Sequential(nn.Linear(n_fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        shift = self.time(fourier_features(t_vec.to(x.dtype), self.n_fourier))
        return self.cnn.head(self.cnn.features(x, shift))
