#!/usr/bin/env bash
# Re-create the recorded gmm results: mixtures at the suite's default budget, the estimator ablation,
# every baseline row, the two-label task, a learned pre-trained model and the n_pairs / gamma sweeps.
# `benchmarks/gmm/run.sh baselines` runs one group; no argument runs them all. Each run leaves results.{json,md}, samples.png, training.png,
# config.yaml and run.log in benchmarks/gmm/<name>/ (checkpoints are removed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/gmm
run() {
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" ctrl-bio benchmark progress=false "hydra.run.dir=$out/$name" "$@"
  rm -rf "$out/$name/checkpoints"
}
rows='suite.methods=[pretrained,exact_guidance,ctrl_oracle_reward]'
case "${1:-all}" in
  mixtures|all)
    run d4_k8_c4_seed0
    run d2_k12_c6_seed1 domain.dim=2 domain.n_components=12 domain.n_classes=6 seed=1
    run d16_k12_c6_seed1 domain.dim=16 domain.n_components=12 domain.n_classes=6 seed=1 ;;&
  more|all)
    run d8_k4_c2_seed2 domain.dim=8 domain.n_components=4 domain.n_classes=2 seed=2
    run d12_k10_c5_seed3 domain.dim=12 domain.n_components=10 domain.n_classes=5 seed=3 ;;&
  ablation|all)
    run ablation_pathwise "$rows" method.estimator=pathwise method.steps=300 method.lr=1e-3 method.eval_every=50
    run ablation_hybrid "$rows" method.estimator=hybrid method.steps=100 method.eval_every=250 ;;&
  baselines|all)   # every row of the suite (issue 4): the default command, two seeds
    run baselines_d4_k8_c4_seed0
    run baselines_d4_k8_c4_seed1 seed=1 ;;&
  multilabel|all)  # two logistic labels from two separate pair sets; cfg learns from the pairs that carry both
    run multilabel_logistic 'label=[logistic_a,logistic_b]' ;;&
  learned|all)     # an imperfect pre-trained model: a score network trained on mixture samples
    run learned_pretrained pretrained=learned ;;&
  pg|all)         # issue 8: the policy-gradient rows (true likelihood as a black box) on four mixtures
    for s in 0 1 2 3; do run gmm_pg_d4_k8_c4_seed$s suite=gmm_pg seed=$s; done ;;&
  sweeps|all)
    run sweep_n_pairs sweep=n_pairs
    run sweep_gamma sweep=gamma ;;
esac
