"""AdamW update time on the CPU for a preset's real parameter set: torch's per-tensor loop (what DeepSpeed's
`torch_adam` path builds on CPU, since torch picks `foreach` only for CUDA tensors), `foreach`, and `fused`.

    python benchmarks/bench_optimizer.py [--preset tiny] [--repeats 5] [--threads N] [--no-record]

Prints one line per variant and appends rows to benchmarks/results/optimizer.csv. The three variants compute the
same update (checked here on the first step: max |difference| between variants is printed). CPU numbers on a
shared machine are noisy: compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_csv, base_row  # noqa: E402

VARIANTS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from ofa_ds.config import PRESETS
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    shapes = [p.shape for p in OFAModel(preset(a.preset)).parameters()]
    n = sum(s.numel() for s in shapes)
    first: dict[str, list[torch.Tensor]] = {}
    secs: dict[str, float] = {}
    for name, kw in VARIANTS.items():
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
        opt.step()
        first[name] = [p.detach().clone() for p in params[:20]]
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            opt.step()
        secs[name] = (time.perf_counter() - t0) / a.repeats
        del opt, params
    diff = max(max((x - y).abs().max().item() for x, y in zip(first["loop"], first[v])) for v in ("foreach", "fused"))
    for name, s in secs.items():
        print(f"{a.preset:6s} {len(shapes)} tensors {n:,} params  {name:8s} {s * 1e3:8.1f} ms/step  "
              f"loop/{name} = {secs['loop'] / s:.2f}x")
        if not a.no_record:
            append_csv("optimizer.csv", {**base_row(), "threads": torch.get_num_threads(), "preset": a.preset,
                                         "tensors": len(shapes), "params": n, "variant": name,
                                         "ms_per_step": round(s * 1e3, 2),
                                         "speedup_vs_loop": round(secs["loop"] / s, 2),
                                         "max_abs_diff_vs_loop": f"{diff:.2e}"})
    print(f"max |difference| of the updated weights between variants after one step: {diff:.2e}")


if __name__ == "__main__":
    main()
