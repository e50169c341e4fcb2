"""Fréchet ChemNet Distance (Preuer et al. 2018) between two sets of SMILES, fully offline.

FCD compares the Gaussians fitted to ChemNet's penultimate activations (512 numbers per molecule) of two sets:
0 for identical sets, growing as the chemistry of the sets drifts apart. The graph-generation literature GDSS
reports on QM9 (Jo et al. 2022, against the test set) computes it with ``fcd_torch`` (the MOSES port), which ships
the ChemNet weights inside its wheel, so nothing is downloaded at run time.

The package's ChemNet and SMILES encoding (canonicalised, one-hot, padded to 350) are used as they are; the batch
loop is written here and the distance is :func:`ctrl_bio.metrics.frechet_distance`, because the package's own versions
call ``np.row_stack`` (deprecated in NumPy 2) and ``scipy.linalg.sqrtm(disp=...)`` (removed in SciPy 1.18).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ctrl_bio.metrics import frechet_distance

#: SMILES per ChemNet forward pass (each is a 350 x 35 one-hot matrix).
BATCH_SIZE = 256


def _fcd_torch():
    try:
        import fcd_torch
    except ImportError as exc:
        raise ImportError("FCD needs fcd_torch (ChemNet weights included): pip install fcd_torch==1.0.7") from exc
    return fcd_torch


@lru_cache(maxsize=1)
def chemnet() -> torch.nn.Module:
    """ChemNet as shipped in ``fcd_torch``, in eval mode on the CPU (loaded once)."""
    return _fcd_torch().FCD(device="cpu", n_jobs=1).model


def chemnet_activations(smiles: Sequence[str]) -> np.ndarray:
    """ChemNet's penultimate activations (N, 512) of SMILES, canonicalised first as ``fcd_torch`` does."""
    from fcd_torch.utils import SmilesDataset

    from domains.molecules.data import _rdkit

    _rdkit()  # silences RDKit's per-molecule log
    dataset = SmilesDataset(list(smiles), canonize=True)
    model, out = chemnet(), []
    with torch.no_grad():
        for start in range(0, len(dataset), BATCH_SIZE):
            batch = np.stack([dataset[i] for i in range(start, min(start + BATCH_SIZE, len(dataset)))])
            out.append(model(torch.as_tensor(batch, dtype=torch.float32).transpose(1, 2)).numpy())
    return np.vstack(out) if out else np.zeros((0, 512), np.float32)


def _activations(smiles: Sequence[str | None]) -> torch.Tensor:
    kept = [s for s in smiles if s is not None]
    if len(kept) < 2:
        raise ValueError(f"FCD needs at least 2 valid SMILES per set, got {len(kept)}")
    return torch.from_numpy(chemnet_activations(kept).astype(np.float64))


def fcd(smiles_a: Sequence[str | None], smiles_b: Sequence[str | None]) -> float:
    """FCD between two sets of SMILES; None entries (invalid samples) are left out, as GDSS reports it.

    Raises ValueError on a SMILES RDKit cannot parse or a set with fewer than 2 molecules.
    """
    return frechet_distance(_activations(smiles_a), _activations(smiles_b))
