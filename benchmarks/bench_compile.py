"""Compiled vs eager OFA training step (forward + backward, train mode, plain PyTorch, one process).

    python benchmarks/bench_compile.py --preset tiny --batch 8 --image-size 64 --steps 10
    python benchmarks/bench_compile.py --preset base --batch 2 --image-size 384 --steps 4 --modes eager,layers

One model with identical weights per (--kernels, --modes) pair: `eager`, `layers` (what train.compile does,
ofa_ds/training/compile.py) and `model` (torch.compile of the whole model), stepped in turn on the same batch, so
that machine noise hits all of them alike (shared CPUs: compare rows of one run only). Reports per pair the first
step's time (compile included), `compile_s` = first step minus the steady median, the steady median/p20/p80 step time,
GFLOP/s by OFA's FLOP count (ofa_ds/model/flops.py), its fraction of this device's GEMM peak measured in the same run
(fp32 on CPU, --dtype on GPU), the MFU against the GPU's data-sheet peak, `speedup` over eager with the same kernels
and `break_even_steps`: how many steps the compiled step must run to repay its compile time. One row per pair is
appended to benchmarks/results/compile.csv (or --csv-dir). --budget-s stops the timing early (at least 2 steps) so a
time-boxed GPU run still writes its rows (benchmarks/gpu_suite.sh).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():              # Triton kernels on CPU run in the interpreter, chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
try:
    import ofa_ds.kernels  # noqa: F401,E402
except ModuleNotFoundError:                    # an uninstalled checkout (a bare GPU box): ofa_ds.kernels = kernels/
    import ofa_ds  # noqa: E402

    ofa_ds.__path__.append(ROOT)
from benchmarks.common import append_csv, base_row, gemm_peak_gflops  # noqa: E402
from ofa_ds.config import PRESETS, preset  # noqa: E402
from ofa_ds.model import OFAModel, train_flops_per_sample  # noqa: E402
from ofa_ds.training.metrics_log import device_peak_tflops  # noqa: E402


def build(mode: str, model: torch.nn.Module, device: torch.device, backend: str) -> torch.nn.Module:
    if mode == "eager":
        return model
    if mode == "layers":
        from ofa_ds.training.compile import compile_model
        if not compile_model(model, device, backend=backend):
            raise SystemExit("bench_compile: inductor cannot compile here (see the message above)")
        return model
    if mode == "model":
        model.compile(backend=backend)
        return model
    raise SystemExit(f"unknown mode {mode!r}: use eager, layers or model")


class _Stopped(Exception):
    pass


_SIGTERM = []


def _stop(signum, frame):
    _SIGTERM.append(signum)
    raise _Stopped()


def gpu_gemm_peak_gflops(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Measured matrix-multiply throughput of the current GPU in `dtype` (GFLOP/s, best of `reps`)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    a @ b
    best = 0.0
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (start.elapsed_time(end) / 1000) / 1e9)
    return round(best, 1)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--src-len", type=int, default=20)
    p.add_argument("--tgt-len", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode after the first (compile) step")
    p.add_argument("--modes", default="eager,layers", help="comma list of eager, layers, model")
    p.add_argument("--kernels", default="torch", help="comma list of model.kernel_backend values (torch, triton, auto)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--csv", default="compile.csv", help="file under benchmarks/results ('' = no row)")
    p.add_argument("--csv-dir", default=None, help="write the CSV there instead of benchmarks/results")
    p.add_argument("--budget-s", type=float, default=0.0, help="stop timing after this many seconds (0 = no limit)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    t_start = time.perf_counter()
    kernel_list = [k.strip() for k in a.kernels.split(",") if k.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    cfg = preset(a.preset, kernel_backend=kernel_list[0])
    base = OFAModel(cfg).to(dev).train()
    pairs = [(k, m) for m in modes for k in kernel_list]     # eager pairs first: their rows survive a cut-short run
    models = {}
    for i, (k, m) in enumerate(pairs):
        model = copy.deepcopy(base) if i else base
        for sub in model.modules():                          # the kernel backend is a plain attribute per module
            if hasattr(sub, "backend"):
                sub.backend = k
        models[(k, m)] = build(m, model, dev, a.backend)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 50000, (a.batch, a.src_len), generator=g).to(dev)
    prev = torch.randint(4, 50000, (a.batch, a.tgt_len), generator=g).to(dev)
    img = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g).to(dev)
    pm = torch.ones(a.batch, dtype=torch.bool, device=dev)
    peak = gemm_peak_gflops() if dev.type == "cpu" else gpu_gemm_peak_gflops(dtype)
    sheet = device_peak_tflops({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])

    def step(model) -> tuple[float, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.manual_seed(1)                                 # the same dropout masks in every mode
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(src, img, pm, prev)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), prev.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, float(loss.detach())

    def over_budget() -> bool:
        return a.budget_s > 0 and time.perf_counter() - t_start > a.budget_s

    first, times, losses = {}, {pq: [] for pq in pairs}, {}
    signal.signal(signal.SIGTERM, _stop)                     # `timeout` in gpu_suite.sh: keep what was measured
    try:
        for pq in pairs:                                     # first steps (compiles) one after the other
            if pq[1] != "eager" and not times[pairs[0]]:     # eager pairs are timed twice before any compile
                for _ in range(min(2, a.steps)):
                    for e in (e for e in pairs if e[1] == "eager"):
                        times[e].append(step(models[e])[0])
            if over_budget():
                print(f"bench_compile: --budget-s {a.budget_s} spent; {pq} not measured", file=sys.stderr, flush=True)
                continue
            first[pq], losses[pq] = step(models[pq])
        for i in range(a.steps):                             # then alternate, so noise hits every pair alike
            if i >= 2 and over_budget():
                print(f"bench_compile: --budget-s {a.budget_s} spent after {i} timed steps", file=sys.stderr,
                      flush=True)
                break
            for pq in pairs:
                if pq in first:
                    times[pq].append(step(models[pq])[0])
    except Exception:        # _Stopped, or whatever a library wrapped it in (Triton's InterpreterError, inductor's)
        if not _SIGTERM:
            raise
        print("bench_compile: stopped by SIGTERM; writing the rows measured so far", file=sys.stderr, flush=True)
    pairs = [pq for pq in pairs if pq in first and times[pq]]
    flops = train_flops_per_sample(cfg, a.image_size, a.src_len, a.tgt_len) * a.batch
    rows, bad = [], []
    ref = losses[pairs[0]] if pairs else 0.0            # every pair computes the same loss up to rounding
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for k, m in pairs:
        ts = times[(k, m)]
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [med] * 9
        gflops = flops / med / 1e9
        r = {"preset": a.preset, "batch": a.batch, "image_size": a.image_size, "src_len": a.src_len,
             "tgt_len": a.tgt_len, "threads": a.threads, "device": a.device, "dtype": a.dtype, "kernels": k,
             "mode": m, "compile_backend": a.backend if m != "eager" else "", "first_step_s": round(first[(k, m)], 2),
             "compile_s": round(first[(k, m)] - med, 2) if m != "eager" else 0.0, "step_ms": round(med * 1000, 2),
             "step_ms_p20": round(q[1] * 1000, 2), "step_ms_p80": round(q[7] * 1000, 2),
             "gflops": round(gflops, 2), "gemm_peak_gflops": peak, "frac_of_peak": round(gflops / peak, 3),
             "mfu": round(gflops / 1000 / sheet, 4) if sheet else "", "steps": len(ts),
             "first_loss": round(losses[(k, m)], 6), "loss_rel_diff": round(abs(losses[(k, m)] - ref) / abs(ref), 7),
             "speedup": "", "break_even_steps": ""}
        if m != "eager" and (k, "eager") in first:
            eager_ms = statistics.median(times[(k, "eager")]) * 1000
            gain = eager_ms - med * 1000
            r["speedup"] = round(eager_ms / (med * 1000), 3)
            r["break_even_steps"] = round(r["compile_s"] * 1000 / gain) if gain > 0 else "never"
        rows.append(r)
        print(json.dumps(r), flush=True)
        if r["loss_rel_diff"] > tol:
            bad.append(f"{k}/{m}: first loss {losses[(k, m)]:.6g} vs {ref:.6g} ({pairs[0][0]}/{pairs[0][1]})")
    if a.csv:
        for r in rows:
            append_csv(a.csv, {**base_row(), **r}, folder=a.csv_dir)
    if bad:
        print("bench_compile: WRONG LOSSES (relative difference > %g): %s" % (tol, "; ".join(bad)), file=sys.stderr)
        raise SystemExit(3)
    if not rows:
        raise SystemExit("bench_compile: nothing was measured")
    return rows


if __name__ == "__main__":
    main()
