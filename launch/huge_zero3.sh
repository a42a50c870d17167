#!/usr/bin/env bash
# OFA-Huge (929M parameters) trained through the trainer for 2 optimizer steps on this machine's two CPU ranks:
# ZeRO-3 (ds_configs/zero3_bf16.json, AdamW with fp32 master weights; fp32 weights need ~2 x 11.5 GiB and were
# OOM-killed on a 24 GiB box), the model built under deepspeed.zero.Init (no rank ever holds all parameters),
# bf16, batch 1, 64 px images, 16 patches, no held-out evaluation, no checkpoint or export. The final
# report line carries each rank's peak RSS (peak_mem_gib_ranks); docs/scale.md compares it with
# benchmarks/bench_memory.py's figure. Needs about 2 x 10.5 GiB of free RAM. Extra arguments go to launch/pretrain.py
# (e.g. --steps 3, --set train.activation_checkpointing=true).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc: keep large blocks in mmap (returned to the OS on free) instead of letting the threshold float up to 32 MiB,
# which leaves GiBs of freed build-time tensors resident in the heap
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}
# and keep the trainer's own glibc tuning (ofa_ds/training/cpu_malloc.py: no mmap, no trim) off: here memory is the
# limit, not page faults
export OFA_DS_MALLOC_TUNE=${OFA_DS_MALLOC_TUNE:-0}
PORT=${MASTER_PORT:-29613}
# DeepSpeed's CPU shared-memory all-reduce leaves one 66 MB /dev/shm file per rank behind: remove ours on exit
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_${PORT}_*' EXIT
deepspeed --num_gpus 2 --master_port "${PORT}" launch/pretrain.py --recipe pretrain_huge \
    --ds-config ds_configs/zero3_bf16.json --steps 2 --out "${OUT:-runs/huge_zero3}" \
    --set data.batch_size=1 --set data.patch_image_size=64 --set data.v2_image_size=64 \
    --set data.max_src_length=16 --set data.max_tgt_length=16 --set train.sample_patch_num=16 \
    --set train.log_every=1 --set train.save_every=0 --set train.save_final=false --set train.export_final=false \
    --set "eval.data={}" "$@"
