#!/usr/bin/env bash
# Re-create the recorded speed results: DESIGN.md's label pathway (embedding into every block's time
# embedding) and the late-fusion variant (label in the last 4 of 8 blocks, shared trunk).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/speed
ctrl-bio benchmark suite=speed suite.label_blocks=null "hydra.run.dir=$out/label_all_blocks"
ctrl-bio benchmark suite=speed suite.label_blocks=4 "hydra.run.dir=$out/label_last_4_blocks"
