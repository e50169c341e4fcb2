"""QM9 for the molecule domain: fetch, read, molecular graphs as tensors, decode to RDKit molecules.

The data are the 130,831 QM9 molecules (Ramakrishnan et al. 2014, "Quantum chemistry structures and
properties of 134 kilo molecules") with their SMILES and DFT properties, as shipped inside the PyPI package
``qm9pack==1.0.3``: :func:`fetch_qm9` downloads that wheel with ``pip download --no-deps`` (never installs it),
checks its sha256 and extracts only the three CSV parts. A 3,000-molecule slice ships in this repository for
tests (:data:`SLICE_PATH`).

A molecule is its kekulised heavy-atom graph, at most :data:`MAX_ATOMS` = 9 atoms of :data:`ATOMS`
(C, N, O, F; hydrogens implicit), as GDSS (Jo et al. 2022) represents QM9. As a tensor it is one flat vector
``x`` of :data:`X_DIM` = 189 numbers in {-1, +1}:

- nodes: (9, 5) one-hot atom types, the fifth type "no atom" pads molecules with fewer than 9 atoms;
- edges: the 36 pairs i < j (upper triangle, row-major), (36, 4) one-hot bond orders (none, single, double,
  triple).

Keeping only the upper triangle makes the forward noise symmetric by construction: every bond is one
coordinate of ``x``. :func:`decode` takes argmaxes, drops "no atom" nodes with their edges and sanitises with
RDKit, without any valency correction, so decode(encode(m)) is m for every molecule in the table.
Molecules that fail to parse, carry a formal charge (0.2% of QM9; no node type holds one), exceed 9 heavy
atoms, use other elements, have several fragments (``CCO.O``) or a radical (``[CH3]``) are skipped and counted
by reason.

Splits are fixed by a hash of the QM9 index: one molecule in ten is ``test``; the rest is ``training``, whose
two halves are the *pairs pool* (the labelled pairs reward classifiers and cfg learn from) and the *oracle
pool* (the evaluation oracle's training data), so that the two never share a molecule (the protocol of EDM,
Hoogeboom et al. 2022, section 4.2).
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.fetch import cache_dir, fetch_wheel_members, sha256
from ctrl_bio.labels import BadRows

log = logging.getLogger(__name__)

ATOMS = ("C", "N", "O", "F")
MAX_ATOMS = 9
#: Node channels: the atom types and "no atom".
N_NODE_TYPES = len(ATOMS) + 1
NO_ATOM = len(ATOMS)
#: Edge channels: no bond, single, double, triple (kekulised, so no aromatic type).
N_EDGE_TYPES = 4
ROWS, COLS = np.triu_indices(MAX_ATOMS, k=1)
N_PAIRS = len(ROWS)
X_DIM = MAX_ATOMS * N_NODE_TYPES + N_PAIRS * N_EDGE_TYPES

#: DFT properties kept, with their CSV column and the factor to the unit used here.
PROPERTIES = {
    "gap": ("HOMO_LUMO_gap_au", 27.211386),  # HOMO-LUMO gap, Hartree -> eV
    "mu": ("Dipole_debye", 1.0),  # dipole moment, Debye
    "alpha": ("Polarizability_bohr3", 1.0),  # isotropic polarizability, bohr^3
}
UNITS = {"gap": "eV", "mu": "D", "alpha": "bohr^3"}

PACKAGE = "qm9pack==1.0.3"
WHEEL_SHA256 = "1d88c2988007c6778e717ee3224cf511bd60e10732ebe3b7ed500ea5af05c9f0"
MEMBERS = {
    "qm9pack/data/qm9_part1.csv": "19f0a5d595462d52cd82eef3370f3e9eb55a1f52cb14985657200349568deff3",
    "qm9pack/data/qm9_part2.csv": "2bca113fdc0b28a13563c80ed9b240e934f3da6c64c64fe74ddb4f0f36036e61",
    "qm9pack/data/qm9_part3.csv": "9c5efb5733d2af149db8d95d36ff198b4ffed12d9f7b344220a1e5877d5c6a43",
}
SLICE_PATH = Path(__file__).parent / "data" / "qm9_slice.csv"
SPLITS = ("training", "test")
TEST_MODULUS = 10


class MoleculeDataError(ValueError):
    """Unusable molecule input; the message is one line naming the file and the reason."""


def fetch_qm9(cache: str | Path | None = None) -> list[Path]:
    """The three QM9 CSV parts of ``qm9pack``, downloaded (104 MB) and checked on first use, then cached."""
    return list(fetch_wheel_members(PACKAGE, WHEEL_SHA256, MEMBERS, "molecules", cache).values())


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as exc:  # pragma: no cover - the extra is part of dev
        raise ImportError("the molecule domain needs RDKit: pip install 'ctrl-bio[mol]'") from exc
    RDLogger.DisableLog("rdApp.*")  # failed sanitisation is counted, not printed once per molecule
    return Chem


def mol_to_graph(mol) -> tuple[np.ndarray, np.ndarray] | str:
    """An RDKit molecule as (node types (9,), edge types (36,)), or the reason it cannot be one."""
    Chem = _rdkit()
    mol = Chem.Mol(mol)
    try:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception:  # noqa: BLE001 - RDKit raises its own exception types
        return "kekulisation failed"
    if mol.GetNumAtoms() > MAX_ATOMS:
        return f"more than {MAX_ATOMS} heavy atoms"
    # A graph of several fragments ("CCO.O": a salt, a solvent) or with a radical ("[CH3]": hydrogens the
    # decoder would restore) encodes fine but is not one QM9 molecule: decode would not give it back.
    if len(Chem.GetMolFrags(mol)) > 1:
        return "several fragments"
    nodes = np.full(MAX_ATOMS, NO_ATOM, dtype=np.int8)
    for atom in mol.GetAtoms():
        if atom.GetSymbol() not in ATOMS:
            return f"element {atom.GetSymbol()}"
        if atom.GetFormalCharge() != 0:
            return "formal charge"
        if atom.GetNumRadicalElectrons() > 0:
            return "radical"
        nodes[atom.GetIdx()] = ATOMS.index(atom.GetSymbol())
    adjacency = np.zeros((MAX_ATOMS, MAX_ATOMS), dtype=np.int8)
    order = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}
    for bond in mol.GetBonds():
        if bond.GetBondType() not in order:
            return f"bond type {bond.GetBondType()}"
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        adjacency[i, j] = adjacency[j, i] = order[bond.GetBondType()]
    return nodes, adjacency[ROWS, COLS]


def _parse_smiles(smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int], dict[int, str]]:
    """Node types (M, 9), edge types (M, 36), the indices of the M usable inputs, and why each other one is not."""
    Chem = _rdkit()
    nodes, edges, good, reasons = [], [], [], {}
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s) if isinstance(s, str) and s.strip() else None
        graph = "unparsable SMILES" if mol is None else mol_to_graph(mol)
        if isinstance(graph, str):
            reasons[i] = graph
            continue
        nodes.append(graph[0])
        edges.append(graph[1])
        good.append(i)
    shape_n, shape_e = (0, MAX_ATOMS), (0, N_PAIRS)
    return (np.stack(nodes) if nodes else np.zeros(shape_n, np.int8),
            np.stack(edges) if edges else np.zeros(shape_e, np.int8), good, reasons)


def smiles_to_graphs(smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int], Counter]:
    """Parse SMILES into graphs.

    Returns:
        node types (M, 9) int8, edge types (M, 36) int8, the indices of the M usable inputs, and the skipped
        inputs counted by reason.
    """
    nodes, edges, good, reasons = _parse_smiles(smiles)
    return nodes, edges, good, Counter(reasons.values())


def encode_smiles(smiles: Sequence[str]) -> tuple[Tensor, BadRows]:
    """SMILES as x (M, 189) for the usable ones, and the others' indices with the reason each was refused."""
    nodes, edges, _, reasons = _parse_smiles(smiles)
    return encode(nodes, edges), BadRows(reasons)


def encode(nodes: np.ndarray | Tensor, edges: np.ndarray | Tensor) -> Tensor:
    """Graphs (M, 9) node types and (M, 36) edge types as x (M, 189) in {-1, +1}."""
    nodes, edges = torch.as_tensor(np.asarray(nodes), dtype=torch.long), torch.as_tensor(np.asarray(edges),
                                                                                        dtype=torch.long)
    x_nodes = torch.nn.functional.one_hot(nodes, N_NODE_TYPES).flatten(1)
    x_edges = torch.nn.functional.one_hot(edges, N_EDGE_TYPES).flatten(1)
    return torch.cat([x_nodes, x_edges], dim=1).float() * 2 - 1


def split_x(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., 189) as node channels (..., 9, 5) and upper-triangle edge channels (..., 36, 4)."""
    n = MAX_ATOMS * N_NODE_TYPES
    return (x[..., :n].reshape(*x.shape[:-1], MAX_ATOMS, N_NODE_TYPES),
            x[..., n:].reshape(*x.shape[:-1], N_PAIRS, N_EDGE_TYPES))


def join_x(nodes: Tensor, edges: Tensor) -> Tensor:
    """The inverse of :func:`split_x`."""
    return torch.cat([nodes.flatten(-2), edges.flatten(-2)], dim=-1)


def graph_types(x: Tensor) -> tuple[Tensor, Tensor]:
    """The argmax decode: node types (B, 9) and edge types (B, 36)."""
    nodes, edges = split_x(x)
    return nodes.argmax(-1), edges.argmax(-1)


def graph_to_mol(nodes: Sequence[int], edges: Sequence[int]):
    """A sanitised RDKit molecule from node and edge types, or None when RDKit rejects it.

    No valency correction: a bond order an atom cannot take makes the molecule invalid. Bonds to "no atom"
    nodes are dropped; the molecule may have several fragments (see :func:`is_connected`).
    """
    Chem = _rdkit()
    mol = Chem.RWMol()
    index = {}
    for i, t in enumerate(nodes):
        if int(t) != NO_ATOM:
            index[i] = mol.AddAtom(Chem.Atom(ATOMS[int(t)]))
    if not index:
        return None
    bond = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for k, t in enumerate(edges):
        i, j = int(ROWS[k]), int(COLS[k])
        if int(t) and i in index and j in index:
            mol.AddBond(index[i], index[j], bond[int(t)])
    mol = mol.GetMol()
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # noqa: BLE001 - valence and kekulisation errors are RDKit exceptions
        return None
    return mol


def decode(x: Tensor) -> list:
    """Samples x (B, 189) as RDKit molecules (None where sanitisation fails)."""
    nodes, edges = graph_types(x.detach().cpu())
    return [graph_to_mol(n, e) for n, e in zip(nodes.tolist(), edges.tolist())]


def to_smiles(mols: Iterable) -> list[str | None]:
    """Canonical SMILES of molecules (None stays None)."""
    Chem = _rdkit()
    return [None if m is None else Chem.MolToSmiles(m) for m in mols]


def is_connected(mol) -> bool:
    """Whether a molecule is one fragment."""
    Chem = _rdkit()
    return mol is not None and len(Chem.GetMolFrags(mol)) == 1


def _hash(index: int) -> int:
    return zlib.crc32(f"qm9:{index}".encode())


@dataclass
class MoleculeTable:
    """QM9 molecules as graphs with their DFT properties and split.

    Attributes:
        index: QM9 indices (M,).
        smiles: canonical SMILES of the kept molecules.
        nodes, edges: node types (M, 9) and edge types (M, 36).
        properties: ``gap`` (eV), ``mu`` (D), ``alpha`` (bohr^3), each (M,) float64.
        skipped: rows not kept, counted by reason.
    """

    index: np.ndarray
    smiles: list[str]
    nodes: np.ndarray
    edges: np.ndarray
    properties: dict[str, np.ndarray]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.index)

    def select(self, mask: np.ndarray) -> MoleculeTable:
        keep = np.flatnonzero(mask)
        return MoleculeTable(self.index[keep], [self.smiles[i] for i in keep], self.nodes[keep], self.edges[keep],
                             {k: v[keep] for k, v in self.properties.items()}, self.skipped)

    @property
    def split(self) -> np.ndarray:
        """``training`` or ``test`` per molecule, fixed by a hash of its QM9 index."""
        return np.where([_hash(int(i)) % TEST_MODULUS == 0 for i in self.index], "test", "training")

    def of_split(self, name: str) -> MoleculeTable:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.select(self.split == name)

    def pairs_pool(self) -> np.ndarray:
        """Mask of the training molecules labelled pairs are drawn from (half of them)."""
        return (self.split == "training") & np.array([(_hash(int(i)) // TEST_MODULUS) % 2 == 0 for i in self.index])

    def oracle_pool(self) -> np.ndarray:
        """Mask of the training molecules the evaluation oracle trains on: the other half, disjoint from pairs."""
        return (self.split == "training") & ~self.pairs_pool()

    def x(self) -> Tensor:
        """All molecules as x (M, 189)."""
        return encode(self.nodes, self.edges)


def read_qm9_csv(paths: Sequence[Path]) -> MoleculeTable:
    """Read QM9 CSV files (``qm9pack``'s columns, or the slice's: Index, SMILES and the property columns)."""
    import pandas as pd

    columns = ["Index", "SMILES", *(c for c, _ in PROPERTIES.values())]
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_csv(path, usecols=columns))
        except ValueError as exc:
            raise MoleculeDataError(f"{path}: {exc}") from exc
    frame = pd.concat(frames, ignore_index=True)
    nodes, edges, good, skipped = smiles_to_graphs(frame["SMILES"].tolist())
    frame = frame.iloc[good]
    Chem = _rdkit()
    smiles = [Chem.MolToSmiles(graph_to_mol(n, e)) for n, e in zip(nodes, edges)]
    properties = {k: frame[c].to_numpy(np.float64) * f for k, (c, f) in PROPERTIES.items()}
    if skipped:
        log.info("QM9: kept %d molecules, skipped %s", len(good), dict(skipped))
    return MoleculeTable(frame["Index"].to_numpy(np.int64), smiles, nodes, edges, properties, skipped)


def load_qm9(source: str = "full", cache: str | Path | None = None) -> MoleculeTable:
    """QM9 as a :class:`MoleculeTable`.

    Args:
        source: ``"full"`` (fetched from ``qm9pack``; the parsed graphs are cached as ``.npz``), ``"slice"``
            (the shipped 3,000 molecules) or a path to a CSV with the same columns.
        cache: the cache root; None: :func:`ctrl_bio.fetch.cache_dir`.
    """
    if source == "slice":
        return read_qm9_csv([SLICE_PATH])
    if source != "full":
        path = Path(source)
        if not path.is_file():
            raise MoleculeDataError(f"{path}: no such file")
        return read_qm9_csv([path])
    paths = fetch_qm9(cache)
    parsed = Path(cache or cache_dir()) / "molecules" / f"qm9_graphs_{sha256(paths[0])[:12]}.npz"
    if parsed.is_file():
        z = np.load(parsed, allow_pickle=False)
        return MoleculeTable(z["index"], z["smiles"].tolist(), z["nodes"], z["edges"],
                             {k: z[k] for k in PROPERTIES}, Counter(dict(zip(z["skip_reasons"].tolist(),
                                                                             z["skip_counts"].tolist()))))
    table = read_qm9_csv(paths)
    np.savez_compressed(parsed, index=table.index, smiles=np.array(table.smiles), nodes=table.nodes,
                        edges=table.edges, skip_reasons=np.array(list(table.skipped)),
                        skip_counts=np.array(list(table.skipped.values()), dtype=np.int64), **table.properties)
    return table
