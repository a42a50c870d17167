#!/usr/bin/env bash
# OFA-Huge (929M parameters) trained for 2 optimizer steps on this machine's two CPU ranks (ZeRO-3, parameters,
# gradients and optimizer states sharded over both ranks), fp32, batch 1, 64 px image (16 patches), 16 source / 16
# target tokens. Prints per-rank peak RSS and wall time (MEMROW/RANKS lines) and appends a row to
# benchmarks/results/memory.csv. SGD with momentum by default: it peaks at 8.8 GiB per rank (~18 GiB free RAM needed);
# `--optimizer adamw` reached 10.5 GiB per rank (needs ~22 GiB: more than this shared box has). Extra arguments go to
# bench_memory.py run (e.g. --ac for per-layer activation checkpointing, --steps 3, --image 128).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc: keep large blocks in mmap (returned to the OS on free) instead of letting the threshold float up to 32 MiB,
# which leaves GiBs of freed build-time tensors resident in the heap
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}
PORT=${MASTER_PORT:-29613}
# DeepSpeed's CPU shared-memory all-reduce leaves one 66 MB /dev/shm file per rank behind: remove ours on exit
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_${PORT}_*' EXIT
deepspeed --num_gpus 2 --master_port ${PORT} benchmarks/bench_memory.py run \
    --preset huge --strategy zero3 --steps 2 --image 64 --batch 1 --optimizer sgd "$@"
