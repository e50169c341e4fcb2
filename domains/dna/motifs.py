"""JASPAR 2024 transcription-factor motifs and a torch scanner that counts their hits in one-hot DNA.

Motifs come from the JASPAR 2024 SQLite database bundled with ``pyjaspar`` (read offline, nothing is
downloaded). Each position frequency matrix becomes a log-odds PSSM with Biopython: counts plus the
JASPAR/Biopython pseudocount ``sqrt(column total) / 4`` per base (Wasserman & Sandelin 2004, via
``Bio.motifs.jaspar.calculate_pseudocounts``; it scales with the counts, so count matrices of any depth
are treated alike), log2 odds against a uniform background.

The hit threshold is Biopython's ``pssm.distribution(...).threshold_fpr(1e-4)``: the score that a window
of uniform random DNA reaches with probability 1e-4. A fixed false-positive rate gives every motif the
same chance hit rate (about 400 x 1e-4 = 0.04 per 200 bp sequence, both strands), so hit frequencies of
short, low-information motifs and of long ones (CTCF) stay comparable; patser's threshold depends on the
motif's information content and gives widely different chance rates. This is the motif-frequency view of
generated sequences that DNA-Diffusion (DaSilva et al. 2024) evaluates with.

Motifs with their thresholds are cached as JSON under ``cache_dir()/dna/jaspar`` (thresholds of long
motifs take seconds each) and in memory.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctrl_bio.fetch import cache_dir

#: False-positive rate per window and strand that sets each motif's score threshold.
FPR = 1e-4
BACKGROUND = {"A": 0.25, "C": 0.25, "G": 0.25, "T": 0.25}

#: Default motifs (JASPAR 2024 CORE vertebrates matrix ids): the cell-type drivers of the four DHS classes,
#: then general promoter/insulator factors. Each id was checked to exist in JASPAR2024.
DEFAULT_MOTIFS: tuple[str, ...] = (
    # GM12878 (B lymphoblastoid)
    "MA0080.7",  # Spi1 (PU.1)
    "MA1419.2",  # IRF4
    "MA0652.2",  # IRF8
    "MA0154.5",  # EBF1
    "MA0684.3",  # RUNX3
    "MA0107.1",  # RELA
    "MA0105.4",  # NFKB1
    "MA0507.3",  # POU2F2
    "MA0014.4",  # PAX5
    "MA0497.2",  # MEF2C
    # HepG2 (hepatocyte)
    "MA0114.5",  # HNF4A
    "MA0046.3",  # HNF1A
    "MA0153.2",  # HNF1B
    "MA0047.4",  # FOXA2
    "MA0148.5",  # FOXA1
    "MA0466.4",  # CEBPB
    "MA0102.5",  # CEBPA
    "MA0679.3",  # ONECUT1
    # K562 (erythroleukaemia)
    "MA0035.5",  # GATA1
    "MA0140.3",  # GATA1::TAL1
    "MA0036.4",  # GATA2
    "MA0841.2",  # NFE2
    "MA0496.4",  # MAFK
    "MA1633.2",  # BACH1
    "MA0493.3",  # KLF1
    # hESCT0 (embryonic stem cell)
    "MA0142.1",  # Pou5f1::Sox2
    "MA1115.2",  # POU5F1
    "MA0143.5",  # SOX2
    "MA2339.1",  # Nanog
    "MA0697.3",  # Zic3
    "MA1629.2",  # Zic2
    "MA0712.3",  # OTX2
    "MA0479.2",  # FOXH1
    "MA0141.4",  # ESRRB
    "MA0039.5",  # KLF4
    # general
    "MA0139.2",  # CTCF
    "MA0079.5",  # SP1
    "MA0506.3",  # Nrf1
    "MA0095.4",  # Yy1
    "MA1126.2",  # FOS::JUN (AP-1)
    "MA0028.3",  # ELK1
    "MA0062.4",  # GABPA
    "MA0098.4",  # ETS1
    "MA0060.4",  # NFYA
    "MA0018.5",  # CREB1
    "MA0138.3",  # REST
    "MA0090.4",  # TEAD1
    "MA0809.3",  # TEAD4
    "MA0003.5",  # TFAP2A
    "MA0058.4",  # MAX
    "MA0093.4",  # USF1
    "MA0024.3",  # E2F1
    "MA0088.2",  # ZNF143
    "MA0137.4",  # STAT1
)


@dataclass
class Motif:
    """A PSSM: ``log_odds`` (4, width) in log2 odds, rows A, C, G, T; a hit scores >= ``threshold``."""

    id: str
    name: str
    log_odds: np.ndarray
    threshold: float

    @property
    def width(self) -> int:
        return self.log_odds.shape[1]


@functools.lru_cache(maxsize=1)
def _database(release: str):
    from pyjaspar import jaspardb

    return jaspardb(release=release)


def _build(matrix_id: str, release: str) -> Motif:
    """Read one matrix from JASPAR and compute its PSSM and FPR threshold with Biopython."""
    from Bio.motifs.jaspar import calculate_pseudocounts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyjaspar warns and returns None for an unknown id; we raise instead
        motif = _database(release).fetch_motif_by_id(matrix_id)
    if motif is None:
        raise ValueError(f"unknown motif id {matrix_id!r}: not in {release}")
    pssm = motif.counts.normalize(pseudocounts=calculate_pseudocounts(motif)).log_odds(BACKGROUND)
    threshold = pssm.distribution(background=BACKGROUND, precision=10**3).threshold_fpr(FPR)
    log_odds = np.array([pssm[b] for b in "ACGT"], dtype=np.float64)
    return Motif(matrix_id, motif.name, log_odds, float(threshold))


@functools.cache
def _load_one(matrix_id: str, release: str) -> Motif:
    path = cache_dir() / "dna" / "jaspar" / f"{release}_{matrix_id}.json"
    if path.is_file():
        d = json.loads(path.read_text())
        return Motif(d["id"], d["name"], np.array(d["log_odds"], dtype=np.float64), d["threshold"])
    motif = _build(matrix_id, release)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps({"id": motif.id, "name": motif.name, "log_odds": motif.log_odds.tolist(),
                               "threshold": motif.threshold, "fpr": FPR}))
    tmp.replace(path)
    return motif


def load_motifs(ids: Sequence[str] | None = None, *, release: str = "JASPAR2024") -> list[Motif]:
    """JASPAR motifs by matrix id (``None``: :data:`DEFAULT_MOTIFS`), cached on disk and in memory.

    Raises:
        ValueError: an id is not in the release (one line).
    """
    return [_load_one(i, release) for i in (DEFAULT_MOTIFS if ids is None else ids)]


def _one_hot01(x: Tensor) -> Tensor:
    """(N, 4, L) in any encoding ({-1, +1}, {0, 1}, continuous samples) -> float64 {0, 1} of the argmax."""
    return F.one_hot(x.argmax(dim=1), 4).permute(0, 2, 1).to(torch.float64)


class MotifScanner:
    """Counts PSSM hits on both strands with one conv1d over the argmax one-hot.

    The forward PSSMs and their reverse complements (both axes flipped: A<->T, C<->G is the reversed
    channel order) are zero-padded on the right to the widest motif; the input is zero-padded by as much,
    and windows that run past the sequence end are masked per motif, so every motif is scored at exactly
    the ``L - width + 1`` positions that Biopython's ``pssm.search(seq, both=True)`` scores.
    Scores are float64 so that comparisons against the thresholds match Biopython's.
    """

    def __init__(self, motifs: Sequence[Motif]):
        if not motifs:
            raise ValueError("MotifScanner needs at least one motif")
        self.motifs = list(motifs)
        self.width = max(m.width for m in self.motifs)
        w = torch.zeros(2 * len(self.motifs), 4, self.width, dtype=torch.float64)
        for i, m in enumerate(self.motifs):
            lo = torch.from_numpy(m.log_odds)
            w[i, :, : m.width] = lo
            w[len(self.motifs) + i, :, : m.width] = lo.flip(0, 1)
        self.weight = w
        self.thresholds = torch.tensor([m.threshold for m in self.motifs] * 2, dtype=torch.float64)
        self.widths = torch.tensor([m.width for m in self.motifs] * 2)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.motifs]

    def scores(self, x: Tensor) -> Tensor:
        """(N, 4, L) -> (N, 2M, L) PSSM scores at each start (forward motifs, then reverse complements);
        windows that do not fit are ``-inf``."""
        h = F.pad(_one_hot01(x), (0, self.width - 1))
        s = F.conv1d(h, self.weight)
        length = x.shape[-1]
        fits = torch.arange(length)[None, :] <= (length - self.widths)[:, None]
        return s.masked_fill(~fits, float("-inf"))

    def hits(self, x: Tensor, chunk: int = 512) -> Tensor:
        """(N, 4, L) -> (N, M) number of (position, strand) pairs scoring >= the motif's threshold,
        the count of Biopython's ``pssm.search(seq, threshold, both=True)``."""
        out = []
        for part in x.split(chunk):  # bounds the (chunk, 2M, L) float64 score tensor
            above = (self.scores(part) >= self.thresholds[None, :, None]).sum(-1)
            m = len(self.motifs)
            out.append(above[:, :m] + above[:, m:])
        return torch.cat(out) if out else torch.zeros(0, len(self.motifs), dtype=torch.long)

    def present(self, x: Tensor) -> Tensor:
        """(N, 4, L) -> (N, M) bool: at least one hit on either strand."""
        return self.hits(x) > 0

    def hit_frequencies(self, x: Tensor) -> Tensor:
        """(N, 4, L) -> (M,) fraction of sequences with at least one hit."""
        return self.present(x).double().mean(0)
