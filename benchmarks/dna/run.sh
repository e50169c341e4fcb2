#!/usr/bin/env bash
# Re-create the recorded DNA results (benchmarks/dna/README.md). `benchmarks/dna/run.sh celltype` runs one group;
# no argument runs them all. Each run leaves results.{json,md}, the plots, samples/*.fasta, config.yaml and run.log
# in benchmarks/dna/<name>/ (checkpoints are removed).
#   pretrain: the shipped network (domains/dna/checkpoints/pretrained.*), one CPU thread
#   oracle:   the shipped evaluation oracle (domains/dna/checkpoints/oracle.*), one CPU thread
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/dna
run() {
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" ctrl-bio benchmark suite=dna progress=false "hydra.run.dir=$out/$name" "$@"
  rm -rf "$out/$name/checkpoints"
}
case "${1:-all}" in
  pretrain)  # not in `all`: ~45 min on one core
    OMP_NUM_THREADS=1 ctrl-bio pretrain domain=dna steps=6000 batch_size=128 lr=1.0e-3 checkpoint_every=250 \
      progress=false hydra.run.dir=runs/pretrain_dna
    cp runs/pretrain_dna/score.safetensors domains/dna/checkpoints/pretrained.safetensors
    cp runs/pretrain_dna/score.json domains/dna/checkpoints/pretrained.json ;;
  oracle)    # not in `all`: ~9 min on one core
    OMP_NUM_THREADS=1 python -m domains.dna.oracle --epochs 12 ;;
  celltype|all)
    run celltype ;;&
  gc|all)
    run gc label=gc ;;&
  motif|all)
    run motif label=motif ;;&
  celltype_gc|all)
    run celltype_gc 'label=[celltype,gc]' ;;
esac
