#!/usr/bin/env bash
# Re-create the recorded molecule results (benchmarks/molecules/README.md). `benchmarks/molecules/run.sh qed` runs one
# group; no argument runs the suites. Each run leaves results.{json,md}, the plots, samples/*.{csv,sdf,png},
# config.yaml and run.log in benchmarks/molecules/<name>/ (checkpoints are removed).
#   pretrain: the shipped network (domains/molecules/checkpoints/pretrained.*), one CPU thread
#   oracle:   the shipped DFT-property oracle (benchmarks/molecules/oracle.md), one CPU thread
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/molecules
run() {
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" ctrl-bio benchmark suite=molecules progress=false "hydra.run.dir=$out/$name" "$@"
  rm -rf "$out/$name/checkpoints"
}
case "${1:-all}" in
  pretrain)  # not in `all`: ~2 h 15 min on one core
    OMP_NUM_THREADS=1 ctrl-bio pretrain domain=molecules steps=30000 batch_size=256 lr=1.0e-3 checkpoint_every=500 \
      progress=false hydra.run.dir=runs/pretrain_molecules
    cp runs/pretrain_molecules/score.safetensors domains/molecules/checkpoints/pretrained.safetensors
    cp runs/pretrain_molecules/score.json domains/molecules/checkpoints/pretrained.json
    mkdir -p $out/pretrain && cp runs/pretrain_molecules/{metrics.csv,quality.json} $out/pretrain/
    python benchmarks/plot_pretrain_loss.py $out/pretrain/metrics.csv "GraphScoreNet on QM9 graphs" 256 ;;
  oracle)    # not in `all`: ~8 min on one core
    OMP_NUM_THREADS=1 python -m domains.molecules.oracle --epochs 12 ;;
  logp|all)
    run logp ;;&
  qed|all)
    run qed label=qed ;;&
  gap|all)
    run gap label=gap ;;&
  rings|all)
    run rings label=rings ;;&
  mu|all)
    run mu label=mu ;;&
  alpha|all)
    run alpha label=alpha ;;&
  gap_logp|all)
    run gap_logp 'label=[gap,logp]' ;;&
  policy_gradient)  # not in `all` (~1 h on one core): ctrl_pg and ddpo on logp, the exact RDKit label as a black box
    OMP_NUM_THREADS=1 run policy_gradient label=logp 'suite.methods=[pretrained,ctrl,ctrl_pg,ddpo,real_data]' ;;
  edm|all)   # the EDM protocol on continuous gap / mu / alpha targets; recorded as two processes, one per core
    for props in gap,mu alpha; do
      name=${props/,/_}
      OMP_NUM_THREADS=1 /usr/bin/time -f "edm $name: %e s wall" ctrl-bio benchmark suite=molecules_edm \
        "suite.properties=[$props]" progress=false "hydra.run.dir=$out/edm/$name" &
    done
    wait
    rm -rf "$out"/edm/*/checkpoints ;;
esac
