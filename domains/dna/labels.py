"""Label pair callables and exact label functions of the DNA domain (used by ``configs/label/*.yaml``).

Every pair set is drawn from the training split's labelled-pairs pool (:meth:`DHSTable.pairs_pool`), never
from the sequences the evaluation oracle learns from, and each label draws from its own seed, so several
labels come from separate pair data sets (CTRL Sec. 5).

- ``celltype``: the cell type whose DHS the sequence is (4 classes); evaluated by the oracle.
- ``gc``: GC-content bins, an exact function of the decoded sequence.
- ``motif``: presence of a JASPAR 2024 motif anywhere on either strand, exact by a PSSM scan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.labels import bin_log_prob
from domains.dna.data import base_indices, one_hot


def _pool(domain, n: int | None, generator: torch.Generator):
    table = domain.table
    idx = np.flatnonzero(table.pairs_pool())
    if n is not None:
        if n > idx.size:
            raise ValueError(f"asked for {n} pairs but the labelled-pairs pool holds {idx.size} sequences")
        idx = idx[torch.randperm(idx.size, generator=generator)[:n].numpy()]
    return table.select(np.isin(np.arange(len(table)), idx))


def celltype_pairs(domain, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n (one-hot sequence, cell-type index) pairs from the labelled-pairs pool."""
    sub = _pool(domain, n, generator)
    return one_hot(sub.sequences), torch.from_numpy(sub.celltype)


def gc_content(x: Tensor) -> Tensor:
    """Fraction of G or C in each decoded sequence, (N, 4, L) -> (N,), in float64.

    float64, because bin edges such as 0.42 are hit exactly (84 of 200 bases): in float32 the fraction rounds below
    the float64 edge, and the pairs' labels (read with Python floats) would disagree with the exact evaluation.
    """
    b = base_indices(x)
    return ((b == 1) | (b == 2)).to(torch.float64).mean(dim=1)


def gc_pairs(domain, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n (sequence, GC fraction) pairs; the label config bins the fraction."""
    sub = _pool(domain, n, generator)
    x = one_hot(sub.sequences)
    return x, gc_content(x)


def gc_log_prob(domain, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact GC-bin label (class k = number of edges <= GC fraction, as ``type: bins`` reads them)."""
    return bin_log_prob(gc_content, edges)


def _motif_presence(motif_id: str) -> Callable[[Tensor], Tensor]:
    from domains.dna.motifs import MotifScanner, load_motifs

    scanner = MotifScanner(load_motifs([motif_id]))
    return lambda x: scanner.present(x)[:, 0].float()


def motif_pairs(domain, n: int | None, generator: torch.Generator, motif: str) -> tuple[Tensor, Tensor]:
    """n (sequence, 1 if the JASPAR motif occurs on either strand else 0) pairs."""
    sub = _pool(domain, n, generator)
    x = one_hot(sub.sequences)
    return x, _motif_presence(motif)(x).long()


def motif_log_prob(domain, motif: str) -> Callable[[Tensor], Tensor]:
    """The exact motif-presence label: class 1 when the PSSM scan finds a hit, else class 0."""
    return bin_log_prob(_motif_presence(motif), [0.5])
