"""Real data that ship inside PyPI packages: download the wheel, check it, extract only the data files.

Several public data sets travel inside old PyPI packages whose pinned dependencies no one should install
(the ENCODE DHS table in ``dnadiffusion``, QM9 in ``qm9pack``). :func:`fetch_wheel_members` downloads such a
wheel with ``pip download --no-deps --only-binary :all:`` (never installing it, never building a source
distribution), checks the wheel's sha256, extracts only the named members into a cache folder and checks each
of their sha256. Later calls read the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where fetched data live: ``$CTRL_BIO_CACHE`` or ``~/.cache/ctrl_bio``."""
    return Path(os.environ.get("CTRL_BIO_CACHE", Path.home() / ".cache" / "ctrl_bio"))


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_members(package: str, wheel_sha256: str, members: Mapping[str, str], folder: str,
                        cache: str | Path | None = None) -> dict[str, Path]:
    """Files of a PyPI wheel, downloaded and checked on first use, then read from the cache.

    Args:
        package: a pinned requirement, e.g. ``"qm9pack==1.0.3"``.
        wheel_sha256: the expected sha256 of the downloaded wheel.
        members: wheel member path -> expected sha256 of that file.
        folder: sub-folder of the cache the files go to (their base names are kept).
        cache: the cache root; None: :func:`cache_dir`.

    Returns:
        member path -> the checked file in the cache.

    Raises:
        RuntimeError: pip could not download the wheel, or a checksum does not match (one line each).
    """
    root = Path(cache or cache_dir()) / folder
    targets = {m: root / Path(m).name for m in members}
    missing = [m for m, p in targets.items() if not (p.is_file() and sha256(p) == members[m])]
    if not missing:
        return targets
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s to extract %s", package, ", ".join(Path(m).name for m in missing))
        # --only-binary: a source distribution would be built, running its setup code, before any checksum check.
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--quiet", package, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip download {package} failed: {proc.stderr.strip().splitlines()[-1:]}")
        wheel = wheels[0]
        if sha256(wheel) != wheel_sha256:
            raise RuntimeError(f"{wheel.name}: sha256 {sha256(wheel)} differs from the expected {wheel_sha256}")
        with zipfile.ZipFile(wheel) as zf:
            for member in missing:
                part = targets[member].with_suffix(".part")
                with open(part, "wb") as out:
                    out.write(zf.read(member))
                if sha256(part) != members[member]:
                    part.unlink()
                    raise RuntimeError(f"{member}: sha256 differs from the expected {members[member]}")
                part.replace(targets[member])
    return targets
