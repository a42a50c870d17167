#!/usr/bin/env bash
# OFA-Huge (929M parameters) trained for 2 optimizer steps on this machine's two CPU ranks (2-stage pipeline, split
# after position 20 of 43, ZeRO-0), fp32 + AdamW, batch 1, 64 px image (16 patches), 16 source / 16 target tokens. Prints per-
# rank peak RSS and wall time (MEMROW/RANKS lines) and appends a row to benchmarks/results/memory.csv. Peaks at 9.8
# GiB per rank: needs ~20 GiB free. Extra arguments go to bench_memory.py run (e.g. --ac for per-layer activation
# checkpointing, --steps 3, --image 128).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc: keep large blocks in mmap (returned to the OS on free) instead of letting the threshold float up to 32 MiB,
# which leaves GiBs of freed build-time tensors resident in the heap
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}
PORT=${MASTER_PORT:-29614}
# DeepSpeed's CPU shared-memory all-reduce leaves one 66 MB /dev/shm file per rank behind: remove ours on exit
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_${PORT}_*' EXIT
deepspeed --num_gpus 2 --master_port ${PORT} benchmarks/bench_memory.py run \
    --preset huge --strategy pipe2 --steps 2 --image 64 --batch 1 "$@"
