#!/usr/bin/env bash
# OFA-Huge (929M parameters) pretrained for 2 optimizer steps through launch/pretrain.py on this machine's two CPU
# ranks as a 2-stage pipeline: ds_configs/pipeline_2stage_zero0_fp32.json (ZeRO-0, fp32, AdamW; its "pipeline"
# block selects the pipeline strategy), recipe pretrain_huge on the synthetic data at 64 px (16 patches), 1 row per
# step plus OFA's v2 extras (step 1 is a (v1, v2) pair: 2 micro-batches per step), then the final DeepSpeed checkpoint, the export
# to $OUT/final (safetensors folder + consolidated_fp32.pt, ~3.7 GB each) and a 1-sample-per-task held-out
# evaluation on rank 0. The last JSON line of the output is the report: per-rank peak RSS (peak_mem_gib_ranks) and wall_s.
# Needs ~20 GiB free. Extra arguments go to launch/pretrain.py (e.g. --set train.activation_checkpointing=true).
# The memory benchmark of the same layout (no data, no export): benchmarks/bench_memory.py run --preset huge
# --strategy pipe2 (rows in benchmarks/results/memory.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc: keep large blocks in mmap (returned to the OS on free) instead of letting the threshold float up to 32 MiB,
# which leaves GiBs of freed build-time tensors resident in the heap
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}
PORT=${MASTER_PORT:-29614}
OUT=${OUT:-runs/huge_pipeline}
# DeepSpeed's CPU shared-memory all-reduce leaves one 66 MB /dev/shm file per rank behind: remove ours on exit
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_${PORT}_*' EXIT
deepspeed --num_gpus 2 --master_port ${PORT} launch/pretrain.py --recipe pretrain_huge \
    --ds-config ds_configs/pipeline_2stage_zero0_fp32.json --steps 2 --out "${OUT}" \
    --set data.patch_image_size=64 --set data.v2_image_size=64 --set data.batch_size=1 \
    --set train.sample_patch_num=0 --set train.log_every=1 --set train.save_every=0 --set train.eval_every=0 \
    --set eval.max_samples=1 --set eval.batch_size=1 "$@"
