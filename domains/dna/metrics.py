"""Sample-quality metrics for generated DNA: k-mer and motif statistics, diversity, novelty, naturalness.

Every function takes sequences as (N, 4, L) tensors in any encoding (the argmax base is used, so the
{-1, +1} one-hot of :mod:`domains.dna.data` and continuous diffusion samples both work) or as ACGT strings.

- k-mer spectrum correlation: DRAKES (Wang et al. 2024, "Fine-tuning discrete diffusion models via reward
  optimization with applications to DNA and protein design") reports the Pearson correlation of 3-mer
  frequencies between generated and real enhancers.
- motif frequency correlation: DNA-Diffusion (DaSilva et al. 2024) compares per-cell-type JASPAR motif
  hit frequencies of generated and real sequences (:mod:`domains.dna.motifs` computes the frequencies).
- diversity, novelty (distance to the training set), GC content, and ``naturalness``: the per-base
  log-likelihood under a k-th order Markov model of real training DNA, which does not use the diffusion
  model and so does not favour the pre-trained model's own samples. It falls for random, GC-only and
  dinucleotide-repeat sequences but RISES for homopolymers (poly-A scores far above real DHSs, since
  A-runs are common in the genome), so read it together with :func:`kmer_entropy`, which is near 0 for
  any short-period repeat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from domains.dna.data import base_indices, one_hot

Seqs = Tensor | Sequence[str]


def _indices(x: Seqs) -> Tensor:
    """Sequences -> (N, L) int64 base indices 0..3 (A, C, G, T)."""
    if not isinstance(x, Tensor):
        x = one_hot(list(x))
    return base_indices(x).long()


def _pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors; 0.0 when either has zero variance.

    A constant vector carries no pattern to agree with, so it counts as uncorrelated rather than NaN:
    e.g. class contrasts of label-ignoring (class-independent) frequencies are all zero and score 0.
    """
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return 0.0 if denom < 1e-12 else float((a @ b).item() / denom)


def kmer_codes(idx: Tensor, k: int) -> Tensor:
    """(N, L) base indices -> (N, L - k + 1) codes 0..4**k - 1 of the overlapping k-mers (ACGT base 4)."""
    n = idx.shape[1] - k + 1
    codes = torch.zeros(idx.shape[0], n, dtype=torch.long)
    for j in range(k):
        codes = codes * 4 + idx[:, j: j + n]
    return codes


def kmer_spectrum(x: Seqs, k: int = 3) -> Tensor:
    """(4**k,) frequencies of overlapping k-mers over all sequences (sum 1), in lexicographic ACGT order."""
    counts = torch.bincount(kmer_codes(_indices(x), k).flatten(), minlength=4**k).double()
    return counts / counts.sum().clamp_min(1)


def kmer_correlation(x_gen: Seqs, x_real: Seqs, k: int = 3) -> float:
    """Pearson correlation of the k-mer spectra of generated and real sequences (DRAKES, k = 3)."""
    return _pearson(kmer_spectrum(x_gen, k), kmer_spectrum(x_real, k))


def motif_correlation(freq_gen: Tensor, freq_real: Tensor) -> float:
    """Mean over classes of the Pearson correlation, across motifs, of hit frequencies (C, M) of generated
    and real sequences of that class (DNA-Diffusion, DaSilva et al. 2024).

    Raw frequencies are dominated by each motif's length and information content, so even uniform random
    sequences correlate with real ones; :func:`motif_contrast_correlation` removes that.
    """
    return float(np.mean([_pearson(g, r) for g, r in zip(freq_gen, freq_real)]))


def motif_contrast_correlation(freq_gen: Tensor, freq_real: Tensor) -> float:
    """:func:`motif_correlation` of class contrasts: each class's frequencies minus their mean over classes.

    The contrast isolates cell-type-specific motif content: sequences that ignore the label have zero
    contrast and score 0 (zero variance counts as uncorrelated, see :func:`_pearson`).
    """
    freq_gen, freq_real = torch.as_tensor(freq_gen).double(), torch.as_tensor(freq_real).double()
    return motif_correlation(freq_gen - freq_gen.mean(0), freq_real - freq_real.mean(0))


def _flat01(idx: Tensor) -> Tensor:
    """(N, L) base indices -> (N, 4L) float32 {0, 1}: the dot product of two rows counts matching bases."""
    return torch.nn.functional.one_hot(idx, 4).flatten(1).float()


def diversity(x: Seqs, max_n: int = 500) -> float:
    """Mean pairwise Hamming distance / L among the first ``max_n`` sequences (0 when identical)."""
    idx = _indices(x)[:max_n]
    n, length = idx.shape
    if n < 2:
        return 0.0
    h = _flat01(idx)
    dist = length - h @ h.T  # exact: float32 holds integers up to 2**24
    return float(dist.sum().item() / (n * (n - 1)) / length)


def nearest_distance(x_gen: Seqs, x_train: Seqs, chunk: int = 4096) -> Tensor:
    """(N,) Hamming distance in bases from each generated sequence to its nearest training sequence.

    0 for a memorised training sequence. One matrix product per chunk of training sequences.
    """
    g, t = _indices(x_gen), _indices(x_train)
    hg = _flat01(g)
    best = torch.zeros(g.shape[0])
    for part in t.split(chunk):
        best = torch.maximum(best, (hg @ _flat01(part).T).amax(1))
    return (g.shape[1] - best).round().long()


def novelty(x_gen: Seqs, x_train: Seqs, chunk: int = 4096) -> float:
    """Mean over generated sequences of (min Hamming distance to any training sequence) / L; 0 when memorised."""
    return float((nearest_distance(x_gen, x_train, chunk).double() / _indices(x_gen).shape[1]).mean().item())


def kmer_entropy(x: Seqs, k: int = 3) -> Tensor:
    """(N,) Shannon entropy in bits of each sequence's own k-mer distribution: a low-complexity score
    (0 for a homopolymer, 1 for a dinucleotide repeat, at most ``min(2k, log2(L - k + 1))``)."""
    codes = kmer_codes(_indices(x), k)
    counts = torch.zeros(codes.shape[0], 4**k, dtype=torch.float64)
    counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
    p = counts / codes.shape[1]
    return -(p * p.clamp_min(1e-300).log2()).sum(1)


def gc_content(x: Seqs) -> Tensor:
    """(N,) fraction of G or C per sequence (argmax decode)."""
    idx = _indices(x)
    return ((idx == 1) | (idx == 2)).double().mean(1)


class MarkovModel:
    """k-th order Markov chain of DNA with additive smoothing (Laplace's add-one by default), fitted on real sequences.

    ``log_likelihood_per_base`` is the ``naturalness`` score. It is high for homopolymers and some
    dinucleotide repeats (poly-A, (CA)n score above real DNA), so check :func:`kmer_entropy` alongside it.
    Fitted on both strands by default (the reverse complement of a DHS is as natural as the DHS), so the
    score does not depend on the orientation of a generated sequence.

    Attributes:
        k: the order (context length).
        log_probs: (4**k, 4) natural-log transition probabilities, row = context code (ACGT base 4).
    """

    def __init__(self, sequences: Seqs, k: int = 5, both_strands: bool = True, pseudocount: float = 1.0):
        idx = _indices(sequences)
        if both_strands:
            idx = torch.cat([idx, (3 - idx).flip(1)])  # A<->T, C<->G is 3 - index
        self.k = k
        counts = torch.full((4**k * 4,), pseudocount, dtype=torch.float64)
        counts += torch.bincount(kmer_codes(idx, k + 1).flatten(), minlength=4 ** (k + 1)).double()
        counts = counts.view(4**k, 4)
        self.log_probs = (counts / counts.sum(1, keepdim=True)).log()

    def log_likelihood_per_base(self, x: Seqs) -> Tensor:
        """(N,) naturalness: mean of log P(x_i | x_{i-k..i-1}) over positions i >= k, in nats.

        The first k bases have no full context and are left out; uniform random DNA scores about
        -log 4 = -1.386 under a model of uniform DNA, real DHS sequences more.
        """
        idx = _indices(x)
        context = kmer_codes(idx[:, :-1], self.k)
        return self.log_probs[context, idx[:, self.k:]].mean(1)
