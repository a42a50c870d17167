"""Forward+backward time of one OFA preset in train mode (plain PyTorch, one process, no DeepSpeed).

    python benchmarks/bench_step.py --preset base --batch 2 --image-size 384 --src-len 20 --tgt-len 20 --threads 2

Prints one JSON object (median/p20/p80 step ms over --steps timed steps after --warmup) and appends a CSV row to
benchmarks/results/bench_step.csv with date, commit and machine. Later work compares against these figures; on
shared CPUs compare ratios from one run, not absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_csv, base_row  # noqa: E402
from ofa_ds.config import PRESETS, preset  # noqa: E402
from ofa_ds.model import OFAModel, train_flops_per_sample  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--src-len", type=int, default=20)
    p.add_argument("--tgt-len", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg = preset(a.preset, kernel_backend=a.backend)
    model = OFAModel(cfg).to(dev).train()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 50000, (a.batch, a.src_len), generator=g).to(dev)
    prev = torch.randint(4, 50000, (a.batch, a.tgt_len), generator=g).to(dev)
    img = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g).to(dev)
    times = []
    for i in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(src, img, torch.ones(a.batch, dtype=torch.bool, device=dev), prev)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), prev.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    flops = train_flops_per_sample(cfg, a.image_size, a.src_len, a.tgt_len) * a.batch
    med = statistics.median(times)
    result = {"preset": a.preset, "batch": a.batch, "image_size": a.image_size, "src_len": a.src_len,
              "tgt_len": a.tgt_len, "threads": a.threads, "device": a.device, "dtype": a.dtype,
              "backend": a.backend, "step_ms": round(med, 2), "step_ms_p20": round(q[1], 2),
              "step_ms_p80": round(q[7], 2), "samples_per_s": round(a.batch / med * 1000, 3),
              "tflops": round(flops / (med / 1000) / 1e12, 4), "params": model.num_params(), "steps": a.steps}
    print(json.dumps(result))
    if not a.no_csv:
        append_csv("bench_step.csv", {**base_row(), **result})
    return result


if __name__ == "__main__":
    main()
