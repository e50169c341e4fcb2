"""Sequence classifiers of the DNA domain: clean-sequence CNNs (reward classifiers, the oracle) and a noisy one.

:class:`SequenceCNN` is a Basset-style network (Kelley et al. 2016): wide first-layer filters that act as
learned motif detectors, max-pooling, then global max and mean pooling so that a motif counts wherever it
sits. It reads the domain's {-1, +1} one-hot directly and is differentiable in x (DPS and CTRL's pathwise
estimator take gradients through it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.model import fourier_features


def reverse_complement(x: Tensor) -> Tensor:
    """Reverse complement of one-hot sequences (B, 4, L) in A, C, G, T order: swap A-T and C-G, reverse L."""
    return x.flip(1).flip(2)


class SequenceCNN(nn.Module):
    """Logits (B, n_classes) of a one-hot sequence (B, 4, L).

    Args:
        n_classes: number of classes.
        hidden: channels of every convolution.
        kernel_size: width of the first (motif) layer.
        dropout: dropout before the linear head.
        strand_average: average the logits of the sequence and its reverse complement (regulatory
            activity does not depend on the strand a sequence is read from).
    """

    def __init__(self, n_classes: int, hidden: int = 64, kernel_size: int = 15, dropout: float = 0.2,
                 strand_average: bool = True):
        super().__init__()
        self.strand_average = strand_average
        self.conv1 = nn.Conv1d(4, hidden, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv1d(hidden, hidden, 7, padding=3)
        self.conv3 = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, n_classes))

    def _logits(self, x: Tensor) -> Tensor:
        h = F.max_pool1d(F.silu(self.conv1(x)), 4)
        h = F.max_pool1d(F.silu(self.conv2(h)), 2)
        h = F.silu(self.conv3(h))
        return self.head(torch.cat([h.amax(dim=2), h.mean(dim=2)], dim=1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[1] != 4:
            raise ValueError(f"expected one-hot sequences of shape (batch_size, 4, length), got {tuple(x.shape)}")
        if not self.strand_average:
            return self._logits(x)
        return 0.5 * (self._logits(x) + self._logits(reverse_complement(x)))


def sequence_classifier(x_shape: tuple[int, ...], n_classes: int, hidden: int = 64, kernel_size: int = 15,
                        dropout: float = 0.2) -> SequenceCNN:
    """The label config's classifier factory (``_target_: domains.dna.nets.sequence_classifier``)."""
    if len(x_shape) != 2 or x_shape[0] != 4:
        raise ValueError(f"sequence_classifier expects samples of shape (4, length), got {tuple(x_shape)}")
    return SequenceCNN(n_classes, hidden=hidden, kernel_size=kernel_size, dropout=dropout)


class NoisySequenceCNN(nn.Module):
    """Logits of p(y | x_t, t) for classifier guidance: :class:`SequenceCNN` whose features are shifted by
    an embedding of t (the noisy classifier of Dhariwal & Nichol 2021, in 1-D)."""

    def __init__(self, n_classes: int, hidden: int = 64, kernel_size: int = 15, n_fourier: int = 32):
        super().__init__()
        self.n_fourier = n_fourier
        self.cnn = SequenceCNN(n_classes, hidden=hidden, kernel_size=kernel_size, dropout=0.0, strand_average=False)
        self.time = nn.Sequential(nn.Linear(n_fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        shift = self.time(fourier_features(t_vec.to(x.dtype), self.n_fourier)).unsqueeze(-1)
        c = self.cnn
        h = F.max_pool1d(F.silu(c.conv1(x) + shift), 4)
        h = F.max_pool1d(F.silu(c.conv2(h) + shift), 2)
        h = F.silu(c.conv3(h) + shift)
        return c.head(torch.cat([h.amax(dim=2), h.mean(dim=2)], dim=1))
