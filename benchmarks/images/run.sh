#!/usr/bin/env bash
# Re-create the recorded image results (benchmarks/images/README.md). `benchmarks/images/run.sh compress` runs one
# group; no argument runs the suites. Each run leaves results.{json,md}, the plots, samples/*.{png,npz}, config.yaml
# and run.log in benchmarks/images/<name>/ (checkpoints are removed).
#   pretrain: the shipped network (domains/images/checkpoints/pretrained.*), one CPU thread
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/images
run() {
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" ctrl-bio benchmark suite=images progress=false "hydra.run.dir=$out/$name" "$@"
  rm -rf "$out/$name/checkpoints"
}
case "${1:-all}" in
  pretrain)  # not in `all`: ~40 min on one core
    OMP_NUM_THREADS=1 ctrl-bio pretrain domain=images steps=6000 batch_size=128 lr=1.0e-3 checkpoint_every=250 \
      progress=false evaluate=false hydra.run.dir=runs/pretrain_images
    cp runs/pretrain_images/score.safetensors domains/images/checkpoints/pretrained.safetensors
    cp runs/pretrain_images/score.json domains/images/checkpoints/pretrained.json
    mkdir -p $out/pretrain && cp runs/pretrain_images/metrics.csv $out/pretrain/
    python benchmarks/plot_pretrain_loss.py $out/pretrain/metrics.csv "UNet2DModel on 16x16 photograph patches" ;;
  compress|all)
    run compress ;;&
  compress_brightness|all)
    run compress_brightness 'label=[compress,brightness]' ;;
  policy_gradient)  # not in `all`: ctrl_pg and ddpo with the real JPEG-size class as a black-box reward
    OMP_NUM_THREADS=1 run policy_gradient 'suite.methods=[pretrained,ctrl,ctrl_pg,ddpo,real_data]' ;;
esac
