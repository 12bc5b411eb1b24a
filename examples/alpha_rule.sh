#!/usr/bin/env bash
# A rule for α (issue 23, part 2): how large the MGS trace penalty α·tr K/N is against the loss at initialisation,
# next to the α the tuning chose, and which α wins at 30 / 60 / 80 % noise. Tables: examples/RESULTS.md, "Choosing α";
# the rule: docs/choosing-alpha.md.
#   1. tr K/N and the loss at initialisation (3 initialisations × 4 training mini-batches of 32 each; seconds per setting),
#      with the tuned α of each setting's tuning record (the Glorot LeNet-5 record comes from examples/run_mnist400.sh).
#   2. digits (500 blurred 8×8 training images), FCN and LeNet-5, MGS tr K at α = 0.001 / 0.003 / 0.01 / 0.03, noise
#      30 / 60 / 80 %, seeds 0 and 1, 100 epochs: 48 runs, ≈ 35 min of one core (the α = 0.003 runs are the stand-in
#      Table 1's, copied from examples/testbench: same configs, same run ids). Resumable.
# Usage: bash examples/alpha_rule.sh [init|sweep]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
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
if [[ $part == all || $part == sweep ]]; then
  for m in fcn lenet5; do  # reuse the stand-in Table 1's α = 0.003 runs (identical configs)
    for f in examples/testbench/runs/digits/$m/mgs_trace/noise0.[368]_n500_seed[01]_mgs_trace0.003_*.json; do
      t=$OUT/digits/${f#examples/testbench/}; [[ -e $t ]] || { mkdir -p "$(dirname "$t")"; cp "$f" "$t"; }
    done
  done
  for alpha in 0.003 0.01 0.001 0.03; do
    $PY -m mgs_bench.cli testbench --dataset digits --model fcn lenet5 --noise 0.3 0.6 0.8 --sizes 500 --methods mgs_trace \
      --set mgs_trace=$alpha --seeds 0 1 --epochs 100 --out "$OUT/digits" --no-tensorboard --no-plots --quiet
  done
fi
