#!/usr/bin/env bash
# The GPU check, prepared to run on a CUDA machine (no network; about 10 minutes at its defaults, so for one call of
# at most 600 s set BENCH_BATCH="32 128" GRAPHS_S=0 ROUTES_S=0: that took 222 s on an H200 on 2026-12-04):
#   1. the CUDA tests (K, tr K and penalty gradients against the float64 reference, no side effects
#      incl. the CUDA RNG, chunk_size bounding GPU memory, a Lightning fit in bf16-mixed);
#   2. where the time of the CIFAR CNN's exact trace step goes (torch.profiler, benchmarks/profile_step.py
#      --kernels: each slow kernel with the operator, autograd node and input shapes that launched it), with aten's
#      convolution backward and with the transposed-convolution backward (mgs_torch.op_fixes; automatic: on for the
#      exact trace step on CUDA), and the Hutchinson step's (automatic: off);
#   3. the benchmark on the GPU (CUDA-event timing, max_memory_allocated) for LeNet-5, the residual CNN,
#      the 1.1 M-parameter CIFAR-sized CNN and the small ViT (env BENCH_BATCH, default n = 32 128 512);
#   4. a torch.compile'd LeNet-5 training step with the penalty against the eager step (benchmarks/bench_compile.py);
#   5. penalty steps eager against replayed from a CUDA graph (benchmarks/cuda_graphs.py);
#   6. the trace and log-det steps with every convolution's Gram product forced to the materialised or the ghost route,
#      and the transposed-convolution backward's A/B on the log-det and Hutchinson steps and on the residual CNN
#      (whether the automatic choice, on for the exact trace only, is right on this GPU).
# Each part has its own time limit (seconds; env TESTS_S, PROFILE_S (per run), BENCH_S, COMPILE_S, GRAPHS_S,
# ROUTES_S (per run)); a limit of 0 skips the part, and what a part measured before its limit is kept (rows are
# printed or written as they finish). On an H200 (2026-11-27) tests, benchmark and graphs took about 25, 170 and
# 200 s; each profile or route run takes about 15–30 s.
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
part() {  # part NAME LIMIT_S COMMAND...: run COMMAND under LIMIT_S seconds, or skip the part when LIMIT_S is 0
  local name=$1 limit=$2; shift 2
  if [[ $limit == 0 ]]; then echo "$name: skipped (limit 0)"; return 0; fi
  timeout "$limit" "$@"
  echo "$name exit code: $?"
}
{
  echo "# gpu_check $(date -u +%FT%TZ)"
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  echo "## CUDA tests"
  if "$PY" -c "import pytest" 2>/dev/null; then
    part tests "${TESTS_S:-240}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  else
    part tests "${TESTS_S:-240}" "$PY" tests/test_cuda.py
  fi
  echo "## profile"
  for flag in "--variant trace --transposed-conv off" "--variant trace" "--variant hutchinson"; do
    part "profile $flag" "${PROFILE_S:-60}" "$PY" benchmarks/profile_step.py --model cifar_cnn --n 128 --rows 25 --kernels $flag >> "$OUT/profile.txt" 2>&1
  done
  grep -A 14 "median of 10 steps\|slowest kernels" "$OUT/profile.txt" | grep "^# \|^| [0-9]" | cut -c 1-400
  echo "## benchmark"
  # shellcheck disable=SC2086
  part benchmark "${BENCH_S:-300}" "$PY" benchmarks/bench_mgs.py --device cuda --models lenet5 resnet cifar_cnn vit \
    --batch ${BENCH_BATCH:-32 128 512} --repeats 5 --skip-slow --json "$OUT/results-cuda.json"
  "$PY" benchmarks/bench_mgs.py --from-json "$OUT/results-cuda.json" > "$OUT/results-cuda.md" 2>&1  # the tables, also of a run cut short
  cat "$OUT/results-cuda.md"
  echo "## compiled step"
  part bench_compile "${COMPILE_S:-120}" "$PY" benchmarks/bench_compile.py --device cuda --models lenet5 --batch 32 128 \
    --steps plain "exact trace penalty" "Hutchinson penalty (1 probe)" --repeats 5 > "$OUT/results-cuda-compile.md"
  cat "$OUT/results-cuda-compile.md"
  echo "## CUDA graphs"
  part cuda_graphs "${GRAPHS_S:-240}" "$PY" benchmarks/cuda_graphs.py --json "$OUT/results-cuda-graphs.json"
  echo "## Gram routes"
  # the Gram-route cost model was set on the CPU: what the GPU prefers for the convolutions
  # and whether the automatic choice of the transposed-convolution backward is right (on 2026-12-04: exact trace
  # faster with it, Hutchinson slower; the log-det step not measured)
  for run in "cifar_cnn --variant trace --route materialize" "cifar_cnn --variant trace --route ghost" "cifar_cnn --variant logdet" \
      "cifar_cnn --variant logdet --route materialize" "cifar_cnn --variant logdet --transposed-conv" \
      "cifar_cnn --variant hutchinson --transposed-conv" "resnet --variant trace --transposed-conv off" "resnet --variant trace"; do
    part "route $run" "${ROUTES_S:-60}" "$PY" benchmarks/profile_step.py --model $run --n 128 --time-only >> "$OUT/profile.txt" 2>&1
  done
  grep "median of 10 steps" "$OUT/profile.txt"
} 2>&1 | tee "$OUT/gpu_check.log"
