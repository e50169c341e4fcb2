"""Label pair callables and exact label functions of the molecule domain (used by ``configs/label/*.yaml``).

Every pair set is drawn from the training split's labelled-pairs pool (:meth:`MoleculeTable.pairs_pool`), never
from the molecules the evaluation oracle learns from (:meth:`MoleculeTable.oracle_pool`), and each label draws
from its own seed, so several labels come from separate pair data sets (CTRL Sec. 5). All labels are binned at
about the tertiles of the QM9 training split (:data:`BIN_EDGES`; rings: by count).

RDKit-exact labels, functions of the decoded molecule (:func:`domains.molecules.data.decode`):

- ``qed``: RDKit's quantitative estimate of drug-likeness (Bickerton et al. 2012), ``rdkit.Chem.QED.qed``.
- ``logp``: Wildman-Crippen logP, ``rdkit.Chem.Crippen.MolLogP``.
- ``rings``: the number of rings (SSSR), ``rdkit.Chem.rdMolDescriptors.CalcNumRings``; classes 0, 1, 2, 3+.

A sample RDKit rejects has no value (NaN) and belongs to no class: its exact log-probability is
:data:`ctrl_bio.labels.LOG_EPS` for every class, so it counts as wrong whatever label was requested.

DFT labels, QM9's B3LYP/6-31G(2df,p) values for the pairs; evaluated by the property oracle
(:mod:`domains.molecules.oracle`), which never saw a pair:

- ``gap``: HOMO-LUMO gap (eV); ``mu``: dipole moment (D); ``alpha``: isotropic polarizability (bohr^3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.labels import LOG_EPS, bin_log_prob
from domains.molecules.data import PROPERTIES, MoleculeTable, decode

#: Bin edges of every label (class k = number of edges <= value), as in ``configs/label/<name>.yaml``: about the
#: tertiles of the QM9 training split (117,288 molecules); rings: 0, 1, 2, 3 or more rings.
BIN_EDGES: dict[str, tuple[float, ...]] = {
    "qed": (0.445, 0.5),
    "logp": (-0.1, 0.7),
    "rings": (1, 2, 3),
    "gap": (6.15, 7.49),
    "mu": (1.82, 3.17),
    "alpha": (72.3, 78.8),
}


def _rdkit_descriptors() -> dict[str, Callable]:
    from rdkit.Chem import QED, Crippen, rdMolDescriptors

    return {"qed": QED.qed, "logp": Crippen.MolLogP, "rings": rdMolDescriptors.CalcNumRings}


#: The RDKit-exact labels.
EXACT = ("qed", "logp", "rings")


def rdkit_values(mols: Sequence, name: str) -> Tensor:
    """An RDKit label of molecules (N,) in float64; NaN for None (a molecule RDKit rejected)."""
    fn = _rdkit_descriptors()[name]
    return torch.tensor([float("nan") if m is None else float(fn(m)) for m in mols], dtype=torch.float64)


def exact_values(x: Tensor, name: str) -> Tensor:
    """An RDKit label (``qed``, ``logp``, ``rings``) of the decoded samples x (N, 189): float64 (N,), NaN if invalid."""
    if name not in EXACT:
        raise ValueError(f"unknown RDKit label '{name}' (one of {', '.join(EXACT)})")
    return rdkit_values(decode(x), name)


def _pool(domain, n: int | None, generator: torch.Generator) -> MoleculeTable:
    table = domain.table
    idx = np.flatnonzero(table.pairs_pool())
    if n is not None:
        if n > idx.size:
            raise ValueError(f"asked for {n} pairs but the labelled-pairs pool holds {idx.size} molecules")
        idx = np.sort(idx[torch.randperm(idx.size, generator=generator)[:n].numpy()])
    mask = np.zeros(len(table), dtype=bool)
    mask[idx] = True
    return table.select(mask)


def rdkit_pairs(domain, n: int | None, generator: torch.Generator, name: str) -> tuple[Tensor, Tensor]:
    """n (molecule x, RDKit value) pairs from the labelled-pairs pool; the label config bins the value."""
    sub = _pool(domain, n, generator)
    x = sub.x()
    return x, exact_values(x, name)


def qed_pairs(domain, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n (molecule, QED) pairs."""
    return rdkit_pairs(domain, n, generator, "qed")


def logp_pairs(domain, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n (molecule, Crippen logP) pairs."""
    return rdkit_pairs(domain, n, generator, "logp")


def rings_pairs(domain, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n (molecule, ring count) pairs."""
    return rdkit_pairs(domain, n, generator, "rings")


def property_pairs(domain, n: int | None, generator: torch.Generator, property: str  # noqa: A002
                   ) -> tuple[Tensor, Tensor]:
    """n (molecule, DFT value) pairs: ``gap`` (eV), ``mu`` (D) or ``alpha`` (bohr^3) from QM9."""
    if property not in PROPERTIES:
        raise ValueError(f"unknown QM9 property '{property}' (one of {', '.join(PROPERTIES)})")
    sub = _pool(domain, n, generator)
    return sub.x(), torch.from_numpy(sub.properties[property])


def valid_bin_log_prob(values: Callable[[Tensor], Tensor], edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """:func:`ctrl_bio.labels.bin_log_prob` where a NaN value (an invalid molecule) belongs to no bin.

    ``bin_log_prob`` alone would put NaN in the last bin (``torch.bucketize`` sorts NaN above every edge).
    """

    def log_prob(x: Tensor) -> Tensor:
        v = values(x)
        invalid = torch.isnan(v)
        out = bin_log_prob(lambda _: torch.nan_to_num(v, nan=0.0), edges)(x)
        out[invalid.to(out.device)] = LOG_EPS
        return out

    return log_prob


def exact_log_prob(domain, name: str, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact binned RDKit label ``name``: x -> log p(y | x) (N, len(edges) + 1); invalid molecules: no class."""
    if name not in EXACT:
        raise ValueError(f"unknown RDKit label '{name}' (one of {', '.join(EXACT)})")
    return valid_bin_log_prob(lambda x: exact_values(x, name), edges)


def qed_log_prob(domain, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact QED bin."""
    return exact_log_prob(domain, "qed", edges)


def logp_log_prob(domain, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact Crippen logP bin."""
    return exact_log_prob(domain, "logp", edges)


def rings_log_prob(domain, edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """The exact ring-count class."""
    return exact_log_prob(domain, "rings", edges)
