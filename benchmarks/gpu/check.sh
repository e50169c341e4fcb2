#!/usr/bin/env bash
# The device check (issue 26): every training command and suite on one device, timed, in one command.
#
#   benchmarks/gpu/check.sh                  # on the GPU machine (DEVICE=cuda): at most 8 minutes on one H200
#   DEVICE=cpu PYTHON=.venv/bin/python benchmarks/gpu/check.sh     # the CPU smoke run (a few minutes, 2 cores)
#
# It runs, each as its own `ctrl-bio` command line with device=$DEVICE: pretrain of dna and molecules, finetune on gmm
# and dna with every estimator in ESTIMATORS, every suite at a smoke budget (tiny n_eval / n_steps / updates, the
# shipped networks), and the speed suite at batch 8 and 64. Each line of $RESULTS_DIR/<device>.tsv is
# task, steps, seconds, status; the table of $RESULTS_DIR/README.md (between its table markers) puts the seconds
# per step beside the CPU's for the same work (benchmarks/gpu/cpu.tsv, written by the CPU run). A failed task is
# recorded as failed (its log under $RUNS) and the check goes on: one run shows every problem.
#
# On a machine without network: benchmarks/gpu/prepare.sh builds, on a machine with one, the wheels it lacks
# (.gpu_wheels/, installed here into $SITE with pip --no-index --target) and the data cache (.gpu_cache/,
# CTRL_BIO_CACHE).
set -uo pipefail

ESTIMATORS="score_matching pathwise hybrid adjoint_matching soft_value rollout_control"  # method.estimator values: every one
SUITES="gmm gmm_pg dna molecules molecules_edm images"
SPEED_BATCHES="8 64"

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benchmarks/gpu}
RUNS=${RUNS:-$ROOT/runs/gpu-check/$DEVICE}
SITE=${SITE:-/tmp/ctrl_bio_site}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ "$DEVICE" = cpu ] && echo 1 || echo 8)}

# Step counts: the GPU's are the check's; the CPU smoke run takes fewer steps of the same work (per-step times
# compare, whole runs do not).
if [ "$DEVICE" = cpu ]; then
  PRE_STEPS=${PRE_STEPS:-3}; SM_STEPS=${SM_STEPS:-10}; PW_STEPS=${PW_STEPS:-3}; VALUE_STEPS=${VALUE_STEPS:-5}
  DNA_SM_STEPS=${DNA_SM_STEPS:-3}; DNA_PW_STEPS=${DNA_PW_STEPS:-2}
  # The speed suite's network at a size a shared CPU measures in seconds (its timings are not the GPU's work).
  SPEED_ARGS=${SPEED_ARGS:-"suite.length=64 suite.hidden=32 suite.n_blocks=4 suite.emb_dim=32 suite.label_blocks=2 suite.n_steps=5 suite.repeats=1 +suite.track_tensors=false"}
else
  PRE_STEPS=${PRE_STEPS:-200}; SM_STEPS=${SM_STEPS:-300}; PW_STEPS=${PW_STEPS:-50}; VALUE_STEPS=${VALUE_STEPS:-300}
  DNA_SM_STEPS=${DNA_SM_STEPS:-100}; DNA_PW_STEPS=${DNA_PW_STEPS:-20}
  SPEED_ARGS=${SPEED_ARGS:-""}
fi

# Packages the GPU machine lacks, from the wheels prepare.sh built; the data cache beside them.
if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null && [ -d "$ROOT/.gpu_wheels" ]; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$ROOT"/.gpu_wheels/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$ROOT/.gpu_cache" ] && export CTRL_BIO_CACHE="$ROOT/.gpu_cache"

mkdir -p "$RUNS" "$RESULTS_DIR"
TSV="$RESULTS_DIR/$DEVICE.tsv"
printf 'task\tsteps\tseconds\tstatus\n' > "$TSV"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(0), '| threads', torch.get_num_threads())"

# task <name> <steps> <command> [overrides...]: one ctrl-bio run in $RUNS/<name>, timed, its log kept.
task() {
  local name=$1 steps=$2 command=$3
  shift 3
  local dir="$RUNS/$name" start end status
  rm -rf "$dir"
  start=$(date +%s.%N)
  if "$PYTHON" -c "import sys; from ctrl_bio.cli import main; sys.exit(main(sys.argv[1:]))" "$command" \
      "device=$DEVICE" progress=false "$@" "hydra.run.dir=$dir" > "$RUNS/$name.log" 2>&1; then
    status=ok
  else
    status=failed
  fi
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$steps" "$seconds" "$status" >> "$TSV"
  printf '%-34s %6s steps %9ss  %s\n' "$name" "$steps" "$seconds" "$status"
  [ "$status" = ok ] || tail -n 3 "$RUNS/$name.log" | sed 's/^/    /'
}

# 0. What every task pays before its first step (Python, torch, Lightning, Hydra): subtracted from per-step times.
start=$(date +%s.%N)
"$PYTHON" -c "import torch, lightning, hydra, ctrl_bio.cli, ctrl_bio.training.commands, ctrl_bio.rows"
printf 'startup\t1\t%s\tok\n' "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')" >> "$TSV"
tail -n 1 "$TSV"

# 1. Pre-training, the shipped architectures at their batch size (the DNA and QM9 slices that ship in the repo).
task pretrain_dna "$PRE_STEPS" pretrain domain=dna domain.data=slice "steps=$PRE_STEPS" evaluate=false \
  "checkpoint_every=$PRE_STEPS"
task pretrain_molecules "$PRE_STEPS" pretrain domain=molecules domain.data=slice "steps=$PRE_STEPS" evaluate=false \
  "checkpoint_every=$PRE_STEPS"

# 2. Fine-tuning with every estimator: gmm (exact reward) and dna (the gc label's learned classifier, the shipped
# network: the exact gc reward counts bases of the decoded sequence and has no gradient for pathwise or adjoint matching).
steps_of() {  # updates an estimator runs: score matching, the on-policy phase, or both (hybrid); soft_value's
              # value regression (VALUE_STEPS) and rollout_control's rollouts come before their updates and are in
              # their seconds, not in their steps
  case $1 in score_matching) echo "$2" ;; hybrid) echo $(( $2 + $3 )) ;; *) echo "$3" ;; esac
}
for estimator in $ESTIMATORS; do
  task "finetune_gmm_$estimator" "$(steps_of "$estimator" "$SM_STEPS" "$PW_STEPS")" finetune domain=gmm \
    label=component reward=exact "method.estimator=$estimator" "method.sm_steps=$SM_STEPS" \
    "method.steps=$PW_STEPS" method.pool_size=4096 method.batch_size=64 n_steps=50 method.eval_every=0 \
    data.n_pairs=400 "method.value_steps=$VALUE_STEPS" method.rollout_anchors=64 method.rollout_k=8
  task "finetune_dna_$estimator" "$(steps_of "$estimator" "$DNA_SM_STEPS" "$DNA_PW_STEPS")" finetune domain=dna \
    domain.data=slice label=gc reward=classifier label.gc.training.epochs=2 data.n_pairs=40 \
    "method.estimator=$estimator" \
    "method.sm_steps=$DNA_SM_STEPS" "method.steps=$DNA_PW_STEPS" method.pool_size=256 method.sm_batch_size=128 \
    method.batch_size=16 n_steps=20 method.eval_every=0 "method.value_steps=$VALUE_STEPS" method.rollout_anchors=32 \
    method.rollout_k=4
done

# 3. Every suite at a smoke budget: the same work on any device, so its seconds compare directly.
ROWS="suite.n_eval=16 suite.n_select=8 suite.n_steps=10 suite.batch_size=16 method.pool_size=64 method.sm_steps=10
  method.sm_batch_size=16 method.eval_every=5 method.eval_batch_size=8 method.steps=2 method.batch_size=4
  method.grad_last_k=2"
BASELINES="suite.alpha0.steps=2 suite.alpha0.batch_size=4 suite.alpha0.grad_last_k=2 suite.baselines.cfg.steps=5
  suite.baselines.classifier_guidance.steps=5 suite.baselines.best_of_n.n=2"
for suite in $SUITES; do
  case $suite in
    gmm) args="data.n_pairs=400 suite.n_eval=300 suite.n_steps=20 method.sm_steps=100 method.pool_size=1000
      suite.pathway.hidden=32 label.component.training.epochs=20 suite.baselines.cfg.steps=50
      suite.baselines.classifier_guidance.steps=50" ;;
    gmm_pg) args="data.n_pairs=400 suite.n_eval=300 suite.n_steps=20 method.sm_steps=100 method.pool_size=1000
      suite.methods=[pretrained,ctrl_pg,ddpo] suite.policy_gradient.settings.iterations=5
      suite.policy_gradient.settings.batch_size=32 suite.policy_gradient.settings.reference_pool=256
      suite.policy_gradient.settings.reference_updates=10 suite.policy_gradient.ddpo.iterations=5" ;;
    dna) args="domain.data=slice label=celltype label.celltype.training.epochs=2 suite.motifs=[MA0035.5] $ROWS
      $BASELINES data.n_pairs=40" ;;  # the slice's labelled-pairs pool holds 45 sequences
    molecules) args="domain.data=slice label=qed label.qed.training.epochs=1 $ROWS $BASELINES data.n_pairs=60" ;;
    molecules_edm) args="domain.data=slice suite.properties=[gap] suite.n_eval=16 suite.n_select=8
      suite.n_steps=10 suite.batch_size=16 suite.regressor.epochs=1 method.pool_size=64 method.sm_steps=10
      method.sm_batch_size=16 method.eval_every=5 method.eval_batch_size=8 method.steps=2 method.batch_size=4
      method.grad_last_k=2 suite.cfg.steps=5 data.n_pairs=60" ;;
    images) args="label=compress label.compress.training.epochs=1 $ROWS $BASELINES data.n_pairs=64" ;;
  esac
  # shellcheck disable=SC2086  # the overrides are words
  task "suite_$suite" 1 benchmark "suite=$suite" $args
done

# 4. The speed suite at a small and a realistic batch (on a GPU, batch 8 is launch-bound).
for batch in $SPEED_BATCHES; do
  # shellcheck disable=SC2086
  task "speed_batch_$batch" 1 benchmark suite=speed "suite.batch_size=$batch" $SPEED_ARGS
done

# The speed suite's own ratios, and the README table (GPU beside CPU).
"$PYTHON" "$ROOT/benchmarks/gpu/table.py" --runs "$RUNS" --results "$RESULTS_DIR" --device "$DEVICE"
! grep -q "	failed$" "$TSV"
