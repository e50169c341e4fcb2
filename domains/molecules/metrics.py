"""Generation metrics of molecules as GDSS (Jo et al. 2022) and the graph-generation literature report them.

- ``validity``: fraction of samples whose raw decode RDKit sanitises, with no valency correction;
- ``connected``: fraction of samples that are valid and one fragment (stricter; a valid sample of two
  fragments counts as valid but not connected);
- ``uniqueness``: distinct canonical SMILES among the valid samples, over the valid samples;
- ``novelty``: valid samples whose canonical SMILES is not in the training set, over the valid samples.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from domains.molecules.data import is_connected, to_smiles


def generation_metrics(mols: Sequence, train_smiles: Collection[str]) -> dict[str, float]:
    """``validity``, ``connected``, ``uniqueness`` and ``novelty`` of decoded samples (None = invalid)."""
    n = len(mols)
    if n == 0:
        raise ValueError("generation_metrics needs at least one sample")
    smiles = [s for s in to_smiles(mols) if s is not None]
    n_valid = len(smiles)
    return {
        "validity": n_valid / n,
        "connected": sum(is_connected(m) for m in mols) / n,
        "uniqueness": len(set(smiles)) / n_valid if n_valid else 0.0,
        "novelty": sum(s not in train_smiles for s in smiles) / n_valid if n_valid else 0.0,
    }
