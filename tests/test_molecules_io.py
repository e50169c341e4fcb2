"""Molecule output: the 3-D SDF round trip, the PNG grid, and FCD's zero on identical sets."""

import pytest

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402

from domains.molecules.io import CELL_SIZE, molecule_grid, write_sdf  # noqa: E402

SMILES = ["CCO", "CC(=O)N", "C1CC1O", "N#CC=O", "OC1COC1", "FC(F)C#N"]


def _flat(mol) -> str:
    """Heavy-atom SMILES without stereo: a 3-D conformer fixes a stereoisomer the graph did not have."""
    return Chem.MolToSmiles(mol, isomericSmiles=False)


def test_sdf_round_trip_keeps_names_tags_and_graphs(tmp_path):
    mols = [Chem.MolFromSmiles(s) for s in SMILES]
    mols.insert(2, None)
    names = [f"sample{i}|qed=2" for i in range(len(mols))]
    gaps = [float(i) for i in range(len(mols))]
    path, skipped = write_sdf(tmp_path / "out" / "s.sdf", mols, names, {"gap": gaps})
    assert skipped == 1
    back = [m for m in Chem.SDMolSupplier(str(path))]
    assert all(m is not None for m in back)
    kept = [i for i, m in enumerate(mols) if m is not None]
    assert [m.GetProp("_Name") for m in back] == [names[i] for i in kept]
    assert [float(m.GetProp("gap")) for m in back] == [gaps[i] for i in kept]
    assert [_flat(m) for m in back] == [_flat(mols[i]) for i in kept]
    assert all(m.GetNumConformers() == 1 and m.GetConformer().Is3D() for m in back)


def test_sdf_rejects_misaligned_names(tmp_path):
    with pytest.raises(ValueError, match="names"):
        write_sdf(tmp_path / "s.sdf", [Chem.MolFromSmiles("C")], [])


def test_grid_png_has_one_row_per_class_and_a_title_column(tmp_path):
    from PIL import Image

    mols = [Chem.MolFromSmiles(s) for s in SMILES]
    rows = [mols[:3], [None, mols[3]], mols * 3]
    path = molecule_grid(rows, ["qed=0", "qed=1", "qed=2"], tmp_path / "g" / "grid.png", per_row=4)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (5 * CELL_SIZE[0], 3 * CELL_SIZE[1])


def test_fcd_of_a_set_with_itself_is_zero():
    pytest.importorskip("fcd_torch")
    from domains.molecules.fcd import fcd

    assert abs(fcd(SMILES, SMILES + [None])) < 1e-3
    assert fcd(SMILES, ["CCCC", "CCCCC", "CCCCCC", "CC(C)C", "CCOCC"]) > 1.0
