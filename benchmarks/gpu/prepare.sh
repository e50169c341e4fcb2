#!/usr/bin/env bash
# Prepare, on a machine with network, what benchmarks/gpu/check.sh needs on the GPU machine, which has none:
#
#   .gpu_wheels/  wheels of the packages it lacks, for its Python (3.12, manylinux x86_64): hydra-core, omegaconf,
#                 antlr4-python3-runtime (an sdist only: its wheel is built here), biopython, rdkit, diffusers and
#                 scikit-image with the pure-python pieces it loads its photographs with, pillow (JPEG sizes);
#                 check.sh installs them with pip --no-index --no-deps --target. Not pyjaspar (57 MB):
#   .gpu_cache/   CTRL_BIO_CACHE: the DNA motifs with their thresholds (JASPAR), so its database is not needed there.
#                 The check runs on the data slices that ship in the repository: no 16 MB DHS table, no 104 MB QM9.
#
# Both folders are ignored by git; the run tool carries them (`carry: [".gpu_wheels", ".gpu_cache"]`, 64 MiB in
# all). The size is printed at the end; PACKAGES=... chooses fewer (rdkit alone is about 35 MB).
#
#   PYTHON=.venv/bin/python benchmarks/gpu/prepare.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
WHEELS="$ROOT/.gpu_wheels"
CACHE="$ROOT/.gpu_cache"
# Pure-python wheels are fetched for any platform; compiled ones for the GPU machine's.
PURE=${PURE:-"hydra-core==1.3.2 omegaconf==2.3.0 diffusers lazy_loader imageio tifffile"}
COMPILED=${COMPILED:-"biopython rdkit scikit-image pillow"}

mkdir -p "$WHEELS" "$CACHE"
# shellcheck disable=SC2086  # package lists are words
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: -d "$WHEELS" $PURE
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --python-version "$TARGET_PYTHON" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$WHEELS" $COMPILED
# antlr4 4.9.3 (what omegaconf 2.3 pins) exists only as a source distribution: build its (pure) wheel here.
"$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3

# The motifs the DNA suite scans for, with their thresholds, computed here into the cache.
CTRL_BIO_CACHE="$CACHE" PYTHONPATH="$ROOT" "$PYTHON" -c "
from domains.dna.motifs import load_motifs
print(len(load_motifs(None)) + len(load_motifs(['MA0035.5'])), 'motifs cached')
" || echo "warning: the DNA motifs could not be cached (the dna suite will need pyjaspar on the GPU machine)"

ls -1 "$WHEELS"
du -sh "$WHEELS" "$CACHE"
total=$(du -sm "$WHEELS" "$CACHE" | awk '{ s += $1 } END { print s }')
echo "total ${total} MiB of the 64 MiB the run tool carries"
[ "$total" -le 64 ] || { echo "too large: drop a package from COMPILED or PURE" >&2; exit 1; }
