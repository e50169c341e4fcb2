"""Molecules out of the toolkit: 3-D SDF files for chemistry software and PNG grids for people.

:func:`write_sdf` gives every valid molecule one RDKit conformer (explicit hydrogens, ETKDGv3 with a fixed seed,
then a short MMFF94 or UFF relaxation), so that a file opens in PyMOL, Avogadro or any docking tool as it is.
Molecules that are None (invalid decodes) or that ETKDG cannot embed (about 2% of QM9, mostly strained cages)
are skipped and counted rather than raised: a sample file is evidence, not a gate.

:func:`molecule_grid` draws one row per requested class, its title in a first column, the molecules with RDKit's own
renderer (the Cairo backend bundled with the RDKit wheel); an invalid sample keeps its cell, drawn empty and
labelled ``invalid``, so that a row shows how many samples failed as well as what the rest look like.

Note that a 3-D conformer fixes one stereoisomer: reading the SDF back perceives stereo centres from the
coordinates, so compare non-isomeric SMILES with the molecules written.
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: The seed of every embedding, so that the same molecules give the same file.
EMBED_SEED = 0
#: Force-field steps after embedding: enough to remove ETKDG's strain, not a full minimisation.
FF_MAX_ITERS = 200
#: Pixels of one grid cell.
CELL_SIZE = (200, 200)
INVALID = "invalid"
#: Pixels per bond in the grid (RDKit shrinks a molecule that would not fit its cell).
BOND_PIXELS = 30
#: Characters per line of a row title.
TITLE_WRAP = 16


def _chem():
    from domains.molecules.data import _rdkit

    return _rdkit()


def embed_3d(mol, seed: int = EMBED_SEED):
    """A copy of ``mol`` with explicit hydrogens and one 3-D conformer, or None when ETKDGv3 fails.

    The conformer is relaxed with MMFF94 when it has parameters for every atom, else with UFF, for at most
    :data:`FF_MAX_ITERS` steps; the property ``ff`` names the force field and whether it converged.
    """
    Chem = _chem()
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        return None
    try:
        if AllChem.MMFFHasAllMoleculeParams(mol):
            field, not_converged = "MMFF94", AllChem.MMFFOptimizeMolecule(mol, maxIters=FF_MAX_ITERS)
        else:
            field, not_converged = "UFF", AllChem.UFFOptimizeMolecule(mol, maxIters=FF_MAX_ITERS)
    except Exception:  # noqa: BLE001 - a force-field failure leaves the embedded conformer, which is still 3-D
        field, not_converged = "none", 1
    mol.SetProp("ff", f"{field} {'converged' if not_converged == 0 else 'not converged'}")
    return mol


def _check_lengths(n: int, names: Sequence[str], properties: dict[str, Sequence]) -> None:
    if len(names) != n:
        raise ValueError(f"write_sdf: {len(names)} names for {n} molecules")
    for key, values in properties.items():
        if len(values) != n:
            raise ValueError(f"write_sdf: property {key!r} has {len(values)} values for {n} molecules")


def write_sdf(path: str | Path, mols: Sequence, names: Sequence[str],
              properties: dict[str, Sequence] | None = None) -> tuple[Path, int]:
    """Write molecules as a 3-D SDF file, one record per molecule that can be embedded.

    Args:
        path: the file to write (its folder is created).
        mols: RDKit molecules; None marks an invalid sample.
        names: one record name per molecule; put the requested labels in it (``"sample3|qed=2"``).
        properties: SDF tags, one sequence of values per tag, aligned with ``mols``.

    Returns:
        the path and the number of molecules skipped (None, or no conformer found).
    """
    Chem = _chem()
    properties = properties or {}
    _check_lengths(len(mols), names, properties)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skipped = 0
    with Chem.SDWriter(str(path)) as writer:
        for i, mol in enumerate(mols):
            embedded = None if mol is None else embed_3d(mol)
            if embedded is None:
                skipped += 1
                continue
            embedded.SetProp("_Name", str(names[i]))
            for key, values in properties.items():
                embedded.SetProp(key, str(values[i]))
            writer.write(embedded)
    if skipped:
        log.info("%s: wrote %d molecules, skipped %d (invalid or not embeddable)", path, len(mols) - skipped, skipped)
    return path, skipped


def _font(size: int):
    """RDKit's own drawing font (Telex), so that titles match the molecule labels; Pillow's default otherwise."""
    from PIL import ImageFont
    from rdkit import RDConfig

    try:
        return ImageFont.truetype(str(Path(RDConfig.RDDataDir) / "Fonts" / "Telex-Regular.ttf"), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _text_cell(text: str, size: int, colour: str):
    """A white cell with centred text, wrapped to the cell width."""
    from PIL import Image, ImageDraw

    cell = Image.new("RGB", CELL_SIZE, "white")
    lines = textwrap.wrap(text, width=TITLE_WRAP) or [""]
    ImageDraw.Draw(cell).multiline_text((CELL_SIZE[0] / 2, CELL_SIZE[1] / 2), "\n".join(lines), fill=colour,
                                        font=_font(size), anchor="mm", align="center")
    return cell


def _mol_cell(mol):
    """One molecule drawn by RDKit (2-D depiction), or an empty cell labelled ``invalid`` for None."""
    from PIL import Image
    from rdkit.Chem.Draw import rdMolDraw2D

    if mol is None:
        return _text_cell(INVALID, 16, "grey")
    drawer = rdMolDraw2D.MolDraw2DCairo(*CELL_SIZE)
    options = drawer.drawOptions()
    options.fixedBondLength = BOND_PIXELS  # one scale for the whole grid; small molecules are not blown up
    options.padding = 0.1
    rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
    drawer.FinishDrawing()
    return Image.open(io.BytesIO(drawer.GetDrawingText())).convert("RGB")


def molecule_grid(mols_by_row: Sequence[Sequence], row_titles: Sequence[str], path: str | Path,
                  per_row: int = 8) -> Path:
    """Draw molecules as a PNG grid, one row per requested class, its title in a first column of its own.

    A title column rather than the first molecule's legend keeps the title from reading as that molecule's name.

    Args:
        mols_by_row: per row, RDKit molecules (None = invalid, drawn as an empty cell labelled ``invalid``);
            the first ``per_row`` are drawn, shorter rows are left blank at the end.
        row_titles: one title per row, e.g. the requested label.
        path: the PNG to write (its folder is created), (``per_row`` + 1) * 200 by rows * 200 pixels.
    """
    from PIL import Image

    if len(row_titles) != len(mols_by_row):
        raise ValueError(f"molecule_grid: {len(row_titles)} titles for {len(mols_by_row)} rows")
    if not mols_by_row or per_row < 1:
        raise ValueError("molecule_grid needs at least one row and per_row >= 1")
    w, h = CELL_SIZE
    grid = Image.new("RGB", ((per_row + 1) * w, len(mols_by_row) * h), "white")
    for r, (row, title) in enumerate(zip(mols_by_row, row_titles)):
        grid.paste(_text_cell(str(title), 20, "black"), (0, r * h))
        for c, mol in enumerate(row[:per_row]):
            grid.paste(_mol_cell(mol), ((c + 1) * w, r * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
