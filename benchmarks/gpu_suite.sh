#!/usr/bin/env bash
# GPU check of the Triton kernels: the kernel tests on the GPU, then the kernel benchmarks.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
# Needs only torch and triton (pytest for the tests part: without it the tests are skipped and the log says so);
# no deepspeed, no network, no install (an uninstalled checkout works: see tests/kernels/conftest.py). Finishes in
# under 8 minutes on one H100/H200/A100: tests/kernels/test_gpu_kernels.py (OFA's real shapes, compiled bf16/fp16
# kernels) runs with fixed tiles (OFA_DS_KERNEL_AUTOTUNE=0) under a 170 s limit; the benchmarks autotune and stop
# starting new measurements when the 7-minute mark nears. Every Triton compile costs seconds, and the CPU kernel
# tests would compile ~150 variants: FULL_TESTS=1 runs all of tests/kernels on the GPU too, without the time limit
# (budget 10+ minutes for that). Writes into OUT_DIR:
#   env.txt         GPU, driver, torch/triton versions, commit, date
#   gpu_tests.log   pytest output (gpu_tests.xml: JUnit)
#   kernels.csv     benchmark rows (schema in benchmarks/bench_kernels.py); copy the rows you want to keep into
#                   benchmarks/results/kernels.csv
# TRAIN=1 adds training throughput (needs deepspeed; ~2-4 more minutes): bench_train.py rows for OFA-Base/Large/Tiny
# in bf16 ZeRO-1 (TRAIN_SPECS="preset:image:batch ...", TRAIN_DS_CONFIG) into bench_train.csv / bench_train.log.
# OFA_DS_COMMIT=<hash> records the commit when the tree was copied without .git.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
start=$(date +%s)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible: nothing to do" | tee -a "$OUT/env.txt"
  exit 2
fi

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  # -o addopts= drops pytest.ini's --timeout (pytest-timeout may be absent) and its marker filter.
  if [ "${FULL_TESTS:-0}" = "1" ]; then
    tests=(tests/kernels); limit=3600
  else
    tests=(tests/kernels/test_gpu_kernels.py); limit=170
  fi
  OFA_DS_KERNEL_AUTOTUNE=0 timeout "$limit" "$PY" -m pytest "${tests[@]}" -q -o addopts= -m "not slow" \
      -p no:cacheprovider --continue-on-collection-errors --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
  status=$?
  tail -n 25 "$OUT/gpu_tests.log"
  echo "kernel tests exit status: $status (124 = hit the ${limit} s limit)"
else
  echo "pytest is not installed: GPU tests skipped" | tee "$OUT/gpu_tests.log"
fi

elapsed=$(( $(date +%s) - start ))
budget=$(( 420 - elapsed - 60 ))        # leave a minute for the measurement in flight and the last rows
[ "$budget" -lt 60 ] && budget=60
timeout $(( budget + 90 )) "$PY" benchmarks/bench_kernels.py --out-dir "$OUT" --budget-s "$budget" --presets huge,large 2>&1 \
  | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
echo "benchmarks exit status: $bench_status; total $(( $(date +%s) - start )) s; results in $OUT"

train_status=0
if [ "${TRAIN:-0}" = "1" ]; then
  # Training throughput through the real step (DeepSpeed engine, bf16 ZeRO-1, FusedAdam: its first use JIT-builds
  # the op, ~1 minute); each preset under its own limit so a slow one cannot eat the rest. Needs deepspeed.
  if "$PY" -c "import deepspeed" 2>/dev/null; then
    for spec in ${TRAIN_SPECS:-"base:384:16" "large:480:8" "tiny:256:32"}; do
      IFS=: read -r preset size bs <<< "$spec"
      timeout "${TRAIN_LIMIT:-240}" "$PY" benchmarks/bench_train.py --preset "$preset" --image-size "$size" \
          --batch-size "$bs" --ds-config "${TRAIN_DS_CONFIG:-ds_configs/zero1_bf16.json}" --steps 10 --warmup 3 \
          --csv "$OUT/bench_train.csv" >> "$OUT/bench_train.log" 2>&1 || train_status=$?
      echo "bench_train $spec: exit $train_status, total $(( $(date +%s) - start )) s"
    done
  else
    echo "deepspeed is not installed: training throughput skipped" | tee "$OUT/bench_train.log"
  fi
fi
[ "$status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$train_status" -eq 0 ]
