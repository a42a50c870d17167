#!/usr/bin/env bash
# Everything the first GPU run has to answer, in one call of under 8 minutes (one H100/H200/A100):
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh OUT_DIR  # on a CPU: the same steps at toy sizes (plumbing check only)
#
# Steps, each under its own time limit and all under one overall deadline (DEADLINE_S, default 460 s; a step never
# gets more than what is left), so a slow step cannot eat the others:
#   1. env.txt          GPU, driver, torch/triton versions, commit, date
#   2. gpu_tests.log    tests/kernels/test_gpu_kernels.py (OFA's real shapes, compiled bf16/fp16 kernels, fixed
#                       tiles: OFA_DS_KERNEL_AUTOTUNE=0) and tests/kernels/test_custom_ops.py (the kernels as torch
#                       custom ops inside torch.compile) ; gpu_tests.xml: JUnit. FULL_TESTS=1: all of tests/kernels
#                       without the deadline (budget 10+ minutes).
#   3. kernels.csv      bench_kernels.py: our attention/LayerNorm vs SDPA, eager, FlexAttention, F.layer_norm
#   4. compile.csv      bench_compile.py per preset (tiny 256 px x32, base 384 px x16, large 480 px x8; MFU_SPECS):
#                       train-mode forward+backward in bf16, Triton kernels off (torch) and on (triton), each eager
#                       and compiled (train.compile's regions): step time, GFLOP/s, MFU against the data-sheet peak
#                       and against the measured bf16 GEMM peak, compile time, break-even steps.
#   5. train_compile.log  only with deepspeed installed and time left: the real training step (bench_train.py, OFA-Tiny,
#                       ZeRO-1 bf16) with train.compile=true, i.e. DeepSpeed's engine around the compiled regions.
# TRAIN=1 then adds bench_train.py throughput rows (bf16 ZeRO-1, eager, TRAIN_SPECS="preset:image:batch ...",
# TRAIN_DS_CONFIG; needs deepspeed; 2-4 more minutes, outside the deadline) into bench_train.csv.
#   summary.txt         one line per step: ok / FAILED (exit status) / skipped (why); also printed last.
# Needs torch and triton (pytest for step 2); no network, no install (an uninstalled checkout works). The script
# exits non-zero when any step that ran failed, and prints FAILED lines loudly. OFA_DS_COMMIT=<hash> records the
# commit when the tree was copied without .git. Copy the rows you keep into benchmarks/results/{kernels,compile}.csv.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT" || { echo "FAILED: cannot create $OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
DRY=${DRY_RUN:-0}
DEADLINE=${DEADLINE_S:-$([ "$DRY" = "1" ] && echo 3600 || echo 460)}   # a dry run on a slow CPU gets an hour
start=$(date +%s)
failed=0
: > "$OUT/summary.txt"

note() { echo "$1" | tee -a "$OUT/summary.txt"; }
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
# step NAME LIMIT_S LOG CMD...: run CMD under min(LIMIT_S, time left), output to LOG (and the console's tail).
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local rest; rest=$(left)
  if [ "$rest" -lt 20 ]; then note "skipped  $name: the ${DEADLINE} s deadline is reached"; return 0; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  if [ "$rc" -eq 0 ]; then
    note "ok       $name ($(( $(date +%s) - t0 )) s)"
  else
    failed=1
    note "FAILED   $name: exit $rc$([ "$rc" -eq 124 ] && echo " (hit its ${limit} s limit)") after $(( $(date +%s) - t0 )) s; see $log"
    echo "!!!!!!!! $name FAILED (exit $rc) !!!!!!!!" >&2
  fi
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${OFA_DS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "dry_run: $DRY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, triton" 2>/dev/null; then
  note "FAILED   env: torch and triton must import (see env.txt)"; exit 1
fi
if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  note "dry run: CPU, Triton interpreter, toy sizes; no figure of this run is a GPU figure"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "FAILED   env: no CUDA GPU visible (DRY_RUN=1 checks the plumbing on a CPU)"; exit 2
fi

# 2. kernel tests ------------------------------------------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  note "skipped  gpu_tests: dry run (the CPU test suite covers tests/kernels)"
elif "$PY" -c "import pytest" 2>/dev/null; then
  # -o addopts= drops pytest.ini's --timeout (pytest-timeout may be absent) and its marker filter.
  if [ "${FULL_TESTS:-0}" = "1" ]; then
    tests=(tests/kernels); limit=3600; DEADLINE=$(( DEADLINE + 3600 ))
  else
    tests=(tests/kernels/test_gpu_kernels.py tests/kernels/test_custom_ops.py); limit=100
  fi
  OFA_DS_KERNEL_AUTOTUNE=0 step gpu_tests "$limit" "$OUT/gpu_tests.log" "$PY" -m pytest "${tests[@]}" -q \
      -o addopts= -m "not slow" -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
else
  failed=1; note "FAILED   gpu_tests: pytest is not installed"
fi

# 3. kernel benchmarks -------------------------------------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  step bench_kernels 300 "$OUT/bench_kernels.log" "$PY" benchmarks/bench_kernels.py --dry-run --out-dir "$OUT" \
      --cases dry_dec_self --widths 37 --ln-providers ours,torch
else
  kb=${KERNEL_BUDGET_S:-50}
  step bench_kernels $(( kb + 40 )) "$OUT/bench_kernels.log" "$PY" benchmarks/bench_kernels.py --out-dir "$OUT" \
      --budget-s "$kb" --presets huge,large
fi

# 4. MFU, Triton kernels on/off, eager and compiled ----------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  specs=${MFU_SPECS:-"debug:32:2"}; dtype=float32; steps=2; per=600; cbackend=${COMPILE_BACKEND:-aot_eager}
else
  specs=${MFU_SPECS:-"tiny:256:32 base:384:16 large:480:8"}; dtype=bfloat16; steps=6; per=85
  cbackend=${COMPILE_BACKEND:-inductor}
fi
for spec in $specs; do
  IFS=: read -r preset size bs <<< "$spec"
  OFA_DS_KERNEL_AUTOTUNE=${OFA_DS_KERNEL_AUTOTUNE:-0} step "mfu_$preset" "$per" "$OUT/compile_$preset.log" \
      "$PY" benchmarks/bench_compile.py --preset "$preset" --image-size "$size" --batch "$bs" --dtype "$dtype" \
      --kernels torch,triton --modes eager,layers --steps "$steps" --budget-s $(( per - 25 )) \
      --backend "$cbackend" --csv compile.csv --csv-dir "$OUT"
done

# 5. train.compile through DeepSpeed -------------------------------------------------------------------------------
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  note "skipped  train_compile: deepspeed is not installed"
elif [ "$DRY" = "1" ]; then
  note "skipped  train_compile: dry run (tests/training/test_compile.py covers it on CPU)"
else
  step train_compile 120 "$OUT/train_compile.log" "$PY" benchmarks/bench_train.py --preset tiny --image-size 256 \
      --batch-size 16 --ds-config ds_configs/zero1_bf16.json --steps 5 --warmup 2 --set train.compile=true \
      --csv "$OUT/bench_train.csv"
fi

# Extra, beyond the deadline: TRAIN=1 adds bench_train.py rows (OFA-Base/Large/Tiny, bf16 ZeRO-1, eager; ~2-4 min).
if [ "${TRAIN:-0}" = "1" ] && [ "$DRY" != "1" ]; then
  for spec in ${TRAIN_SPECS:-"base:384:16" "large:480:8" "tiny:256:32"}; do
    IFS=: read -r preset size bs <<< "$spec"
    DEADLINE=$(( $(date +%s) - start + ${TRAIN_LIMIT:-240} )) step "train_$preset" "${TRAIN_LIMIT:-240}" \
        "$OUT/bench_train_$preset.log" "$PY" benchmarks/bench_train.py --preset "$preset" --image-size "$size" \
        --batch-size "$bs" --ds-config "${TRAIN_DS_CONFIG:-ds_configs/zero1_bf16.json}" --steps 10 --warmup 3 \
        --csv "$OUT/bench_train.csv"
  done
fi

echo "================ summary ($(( $(date +%s) - start )) s; results in $OUT) ================"
cat "$OUT/summary.txt"
if [ "$failed" -ne 0 ]; then
  echo "!!!!!!!! at least one step FAILED: see the lines above !!!!!!!!" >&2
  exit 1
fi
