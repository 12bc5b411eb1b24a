#!/usr/bin/env bash
# The GPU check, prepared to run in one call on a CUDA machine (no network, under 8 minutes):
#   1. the CUDA tests (K, tr K and penalty gradients against the float64 reference, no side effects
#      incl. the CUDA RNG, chunk_size bounding GPU memory, a Lightning fit in bf16-mixed);
#   2. the benchmark on the GPU (CUDA-event timing, max_memory_allocated) for LeNet-5, the residual CNN
#      and the 1.1 M-parameter CIFAR-sized CNN at n = 32, 128 and 512;
#   3. penalty steps eager against replayed from a CUDA graph (benchmarks/cuda_graphs.py);
#   4. where the time of the CIFAR CNN's exact trace step goes (torch.profiler, benchmarks/profile_step.py),
#      with and without the opt-in transposed-convolution backward (mgs_torch.op_fixes), and the trace and
#      log-det steps with every convolution's Gram product forced to the materialised or the ghost route;
#   5. a torch.compile'd LeNet-5 training step with the penalty against the eager step (benchmarks/bench_compile.py;
#      not yet run on a GPU; rows are printed as they finish, so a part cut by its limit keeps them).
# Each part has its own time limit (seconds; env TESTS_S, BENCH_S, GRAPHS_S, PROFILE_S, COMPILE_S), and what a part
# measured before its limit is kept. On an H200 (2026-11-27) the first three parts took about 25, 170 and 200 s (graphs over four
# configurations; three now); the profile part adds two profiled and four timed runs of about 15–30 s each.
# Usage: PYTHONPATH=. bash benchmarks/gpu_check.sh [OUT_DIR]   (default: benchmarks/)
# Writes OUT_DIR/results-cuda.json, OUT_DIR/results-cuda.md, OUT_DIR/results-cuda-graphs.json,
# OUT_DIR/profile.txt, OUT_DIR/results-cuda-compile.md and OUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}:bench"  # the benchmark models come from the testbench (bench/)
PY="${PYTHON:-python3}"
OUT="${1:-benchmarks}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device is visible to torch here ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1)); nothing to run."
  echo "Run this script on a machine with a CUDA GPU."
  exit 3
fi
{
  echo "# gpu_check $(date -u +%FT%TZ)"
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  echo "## CUDA tests"
  if "$PY" -c "import pytest" 2>/dev/null; then
    timeout "${TESTS_S:-240}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  else
    timeout "${TESTS_S:-240}" "$PY" tests/test_cuda.py
  fi
  echo "tests exit code: $?"
  echo "## benchmark"
  timeout "${BENCH_S:-300}" "$PY" benchmarks/bench_mgs.py --device cuda --models lenet5 resnet cifar_cnn --batch 32 128 512 \
    --repeats 5 --skip-slow --json "$OUT/results-cuda.json" > "$OUT/results-cuda.md"
  echo "benchmark exit code: $?"
  cat "$OUT/results-cuda.md"
  echo "## CUDA graphs"
  timeout "${GRAPHS_S:-240}" "$PY" benchmarks/cuda_graphs.py --json "$OUT/results-cuda-graphs.json"
  echo "cuda_graphs exit code: $?"
  echo "## profile"
  for flag in "" --transposed-conv; do  # A/B of the opt-in convolution replacement (mgs_torch.op_fixes)
    timeout "${PROFILE_S:-60}" "$PY" benchmarks/profile_step.py --model cifar_cnn --n 128 --variant trace --rows 25 $flag >> "$OUT/profile.txt" 2>&1
    echo "profile $flag exit code: $?"
  done
  # the Gram-route cost model was set on the CPU: what the GPU prefers for the convolutions
  for run in "trace --route materialize" "trace --route ghost" "logdet" "logdet --route materialize"; do
    timeout "${PROFILE_S:-60}" "$PY" benchmarks/profile_step.py --model cifar_cnn --n 128 --variant $run --time-only >> "$OUT/profile.txt" 2>&1
  done
  grep "median of 10 steps" "$OUT/profile.txt"
  echo "## compiled step"
  timeout "${COMPILE_S:-120}" "$PY" benchmarks/bench_compile.py --device cuda --models lenet5 --batch 32 128 \
    --steps plain "exact trace penalty" "Hutchinson penalty (1 probe)" --repeats 5 > "$OUT/results-cuda-compile.md"
  echo "bench_compile exit code: $?"
  cat "$OUT/results-cuda-compile.md"
} 2>&1 | tee "$OUT/gpu_check.log"
