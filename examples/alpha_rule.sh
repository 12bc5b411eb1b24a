#!/usr/bin/env bash
# A rule for α (issue 23, part 2): how large the MGS trace penalty α·tr K/N is against the loss at initialisation,
# next to the α the tuning chose, and which α wins at 30 / 60 / 80 % noise. Tables: examples/RESULTS.md, "Choosing α";
# the rule: docs/choosing-alpha.md.
#   1. tr K/N and the loss at initialisation (3 initialisations × 4 training mini-batches of 32 each; seconds per setting),
#      with the tuned α of each setting's tuning record (the Glorot LeNet-5 record comes from examples/run_mnist400.sh).
#   2. digits (500 blurred 8×8 training images), FCN and LeNet-5, MGS tr K at α = 0.003 and 0.01 (seeds 0 and 1) and
#      α = 0.001 and 0.03 (seed 0), noise 30 / 60 / 80 %, 100 epochs: 36 runs, ≈ 25 min of one core (the α = 0.003 runs
#      are the stand-in Table 1's, copied from examples/testbench: same configs, same run ids). Resumable.
#   3. real MNIST (3,000 blurred training images), FCN and LeNet-5, MGS tr K at α = 0.003 and 0.03 beside the grid's
#      α = 0.01 (copied from examples/testbench: same configs), noise 60 / 80 / 30 %, seed 0, 100 epochs evaluated every
#      2: 12 runs, ≈ 1.7 h of one core (FCN ≈ 5 min, LeNet-5 ≈ 11 min a run). Resumable.
# Usage: bash examples/alpha_rule.sh [init|sweep|mnist]   (default: init and sweep)
set -euo pipefail
cd "${ROOT:-$(dirname "$0")/..}"  # ROOT: run a frozen copy of this script against another checkout
export PYTHONPATH=.:bench OMP_NUM_THREADS=1
PY=${PYTHON:-python}
OUT=${OUT:-examples/alpha}
part=${1:-all}
if [[ $part == all || $part == init ]]; then
  a() { $PY -m mgs_bench.cli alpha --out "$OUT" "$@"; }
  a --dataset mnist --fixed-split --size 3000 --noise 0.5 --model lenet5 --init he --tuned examples/testbench/tuned_mnist_lenet5.json
  glorot=examples/mnist400/glorot/tuned_mnist_lenet5.json
  a --dataset mnist --fixed-split --size 3000 --noise 0.5 --model lenet5 --init xavier $([[ -f $glorot ]] && echo --tuned $glorot)
  a --dataset mnist --fixed-split --size 3000 --noise 0.5 --model fcn --tuned examples/testbench/tuned_mnist_fcn.json
  a --dataset digits --size 500 --noise 0.6 --model lenet5 --tuned examples/testbench/tuned_digits_lenet5.json
  a --dataset digits --size 500 --noise 0.6 --model fcn --tuned examples/testbench/tuned_digits_fcn.json
  a --dataset diabetes --size 200 --noise 1 --model fcn --tuned examples/testbench/tuned_diabetes_fcn.json
  a --dataset circles --size 200 --noise 0.3 --model fcn --tuned examples/testbench/tuned_circles_fcn.json
fi
copy() {  # copy() DEST FILES...: reuse finished runs of identical configs (same run ids)
  local dest=$1; shift
  for f in "$@"; do t=$dest/${f#examples/testbench/}; [[ -e $t ]] || { mkdir -p "$(dirname "$t")"; cp "$f" "$t"; }; done
}
if [[ $part == all || $part == sweep ]]; then
  for m in fcn lenet5; do  # reuse the stand-in Table 1's α = 0.003 runs (identical configs)
    copy "$OUT/digits" examples/testbench/runs/digits/$m/mgs_trace/noise0.[368]_n500_seed[01]_mgs_trace0.003_*.json
  done
  for alpha in 0.003:0 0.003:1 0.01:0 0.01:1 0.03:0 0.001:0; do
    $PY -m mgs_bench.cli testbench --dataset digits --model fcn lenet5 --noise 0.3 0.6 0.8 --sizes 500 --methods mgs_trace \
      --set mgs_trace=${alpha%:*} --seeds ${alpha#*:} --epochs 100 --out "$OUT/digits" --no-tensorboard --no-plots --quiet
  done
fi
if [[ $part == mnist ]]; then
  for m in fcn lenet5; do  # the grid's α = 0.01 runs, seed 0 (identical configs)
    copy "$OUT/mnist" examples/testbench/runs/mnist/$m/mgs_trace/noise0.[368]_n3000_seed0_mgs_trace0.01_*.json
  done
  for noise in 0.6 0.8 0.3; do
    for alpha in 0.003 0.03; do
      $PY -m mgs_bench.cli testbench --dataset mnist --fixed-split --model fcn lenet5 --sizes 3000 --noise $noise --methods mgs_trace \
        --set mgs_trace=$alpha --seeds 0 --epochs 100 --eval-points 51 --out "$OUT/mnist" --no-tensorboard --no-plots --quiet
    done
  done
fi
