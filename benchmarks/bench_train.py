"""Training throughput through the real training step (data, loss, DeepSpeed engine): one CSV row per configuration in
benchmarks/results/bench_train.csv with samples/s, tokens/s, TFLOP/s per device, MFU (GPU only), peak memory, p50
step time.

    deepspeed --num_gpus 2 benchmarks/bench_train.py --ds-config ds_configs/zero2_fp32.json --steps 10
    deepspeed --num_gpus 2 benchmarks/bench_train.py --compare --steps 10      # ZeRO-0/1/2/3 vs plain PyTorch

--compare runs, in one job: plain PyTorch on one rank (no DeepSpeed: torch AdamW, same model, data, loss and
per-rank batch, same threads per process), then the same steps through DeepSpeed with each config of
--compare-configs on all ranks. Each DeepSpeed row carries `ratio_vs_plain` = its per-rank step time / the plain
step time, i.e. the overhead of that ZeRO stage (communication, partitioning, optimizer wrapping) for an identical
per-rank workload. Timings on a shared CPU are noisy: compare rows of one run only
(docs/benchmarks.md#reading-the-numbers).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import types
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import append_csv, base_row  # noqa: E402

COMPARE = ["ds_configs/cpu_fp32.json", "ds_configs/zero1_fp32.json", "ds_configs/zero2_fp32.json",
           "ds_configs/zero3_fp32.json"]


def make_run(a, ds_config: str, out: str):
    from ofa_ds.recipes import get_recipe
    sets = [f"ds_config={ds_config}", f"out_dir={out}", f"train.max_steps={a.steps + a.warmup}",
            "train.progress=false", "train.save_final=false", "train.export_final=false", "train.log_every=1000000",
            f"data.batch_size={a.batch_size}", f"data.patch_image_size={a.image_size}",
            f"data.v2_image_size={a.image_size}", "eval.data={}"] + list(a.sets)
    from ofa_ds.config import preset
    run = get_recipe(a.recipe)
    if run.model.name != a.preset:        # another size on the recipe's data; --set model.* still applies below
        run.model = preset(a.preset)
    return run.override(sets)


def time_steps(step_fn, batches, warmup: int, steps: int, sync: bool = True) -> tuple[list[float], dict]:
    times, tot = [], {"samples": 0, "tokens": 0, "flops": 0.0}
    for i in range(warmup + steps):
        b = next(batches)
        if sync:                       # all ranks start each timed step together
            dist.barrier()
        t0 = time.perf_counter()
        st = step_fn(b)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            for k in tot:
                tot[k] += st[k]
    return times, tot


def row(a, name: str, stage, prec: str, world: int, times: list[float], tot: dict, plain_ms: float | None) -> dict:
    from ofa_ds.training.metrics_log import device_peak_tflops, peak_mem_gib
    secs = sum(times)
    tflops = tot["flops"] / secs / 1e12
    peak = device_peak_tflops(prec)
    p50 = statistics.median(times) * 1000
    return {**base_row(), "preset": a.preset, "recipe": a.recipe, "ds_config": name, "zero_stage": stage,
            "precision": prec, "world_size": world, "micro_bs": a.batch_size, "grad_accum": 1,
            "image_size": a.image_size, "steps": len(times), "threads": torch.get_num_threads(),
            "samples_per_s": round(tot["samples"] * world / secs, 3),
            "tokens_per_s": round(tot["tokens"] * world / secs, 1),
            "tflops_per_gpu": round(tflops, 5), "mfu": round(tflops / peak, 4) if peak else "",
            "peak_mem_gib": round(peak_mem_gib(), 3), "step_ms": round(p50, 1),
            "ratio_vs_plain": round(p50 / plain_ms, 3) if plain_ms else "", "sets": " ".join(a.sets)}


def plain_baseline(a, out: str) -> tuple[list[float], dict]:
    """One rank, no DeepSpeed: the dense strategy's forward/loss with torch AdamW and manual clipping."""
    from ofa_ds.data import DataStream
    from ofa_ds.model import OFAModel
    from ofa_ds.training.dense import DenseStrategy
    from ofa_ds.training.objective import micro_batch_sizes
    run = make_run(a, COMPARE[0], out)
    torch.manual_seed(run.train.seed)
    model = OFAModel(run.model)
    opt = torch.optim.AdamW(model.parameters(), lr=run.train.lr, betas=run.train.betas, eps=run.train.adam_eps,
                            weight_decay=run.train.weight_decay, foreach=True)
    # the strategy reads these fields of a trainer; the model itself stands in for the engine
    tr = types.SimpleNamespace(run_cfg=run, world=1, rank=0, device=torch.device("cpu"), dtype=torch.float32,
                               step=0, engine=model)
    strategy = DenseStrategy()
    stream = DataStream(run.data, "train", 0, 1)

    def step(b):
        sizes = micro_batch_sizes(run.model, run.train, b)
        out_, _ = strategy._forward(tr, b, sizes.parts)
        (out_.loss / sizes.size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"samples": sizes.samples, "tokens": sizes.tokens, "flops": sizes.flops}

    return time_steps(step, _forever(stream), a.warmup, a.steps, sync=False)   # rank 0 alone


def _forever(stream):
    while True:
        yield from stream


def ds_run(a, ds_config: str, out: str) -> tuple[list[float], dict, object]:
    from ofa_ds.training.trainer import Trainer
    tr = Trainer(make_run(a, ds_config, out))
    tr.setup()
    times, tot = time_steps(lambda b: tr.train_step([b]), _forever(tr.stream), a.warmup, a.steps)
    return times, tot, tr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--recipe", default="default", help="task mix: a recipe name (default = pretraining mixture)")
    p.add_argument("--ds-config", dest="ds_config", default="ds_configs/cpu_fp32.json")
    p.add_argument("--compare", action="store_true", help="plain PyTorch (1 rank) + each of --compare-configs")
    p.add_argument("--compare-configs", nargs="+", default=COMPARE)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--csv", default="bench_train.csv")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args()
    from ofa_ds.training.ds_config import zero_stage
    from ofa_ds.training.engine import init_distributed
    rank, world, _ = init_distributed()
    root = make_run(a, a.ds_config, "unused").synthetic_root
    if rank == 0 and root and not os.path.isfile(os.path.join(root, "manifest.json")):
        from ofa_ds.data.synthetic import generate
        generate(root)
    dist.barrier()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with tempfile.TemporaryDirectory() as tmp:
        plain_ms = None
        if a.compare:
            if rank == 0:
                times, tot = plain_baseline(a, os.path.join(tmp, "plain"))
                plain_ms = statistics.median(times) * 1000
                r = row(a, "plain_pytorch", "", "fp32", 1, times, tot, None)
                print(r, flush=True)
                append_csv(a.csv, r)
            dist.barrier()
        for cfg in (a.compare_configs if a.compare else [a.ds_config]):
            times, tot, tr = ds_run(a, cfg, os.path.join(tmp, os.path.basename(cfg)))
            if rank == 0:
                r = row(a, os.path.basename(cfg), zero_stage(tr.ds_cfg), tr.precision, world, times, tot, plain_ms)
                print(r, flush=True)
                append_csv(a.csv, r)
            del tr
            dist.barrier()
    return 0


if __name__ == "__main__":
    from ofa_ds.training.shutdown import exit_process
    exit_process(main())   # not sys.exit: see ofa_ds.training.shutdown
