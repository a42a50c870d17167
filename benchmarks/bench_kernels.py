"""Kernel microbenchmarks: OFA attention (with its position bias) and LayerNorm (+ residual), ours vs PyTorch.

    python benchmarks/bench_kernels.py --out-dir benchmarks/results            # GPU: the suite, rows -> kernels.csv
    python benchmarks/bench_kernels.py --ops layernorm --dtype fp16 --budget-s 60
    python benchmarks/bench_kernels.py --dry-run --out-dir /tmp/kbench         # CPU: tiny shapes, proves the script

Each measurement appends one CSV row to <out-dir>/kernels.csv: op, provider, mode (fwd | bwd | fwd_bwd), case, shape,
dtype, ms_p20/p50/p80, throughput + unit (TFLOP/s for attention with 4·B·H·Lq·Lk·D forward FLOPs, halved when
causal, ×2.5 for the backward; GB/s for LayerNorm from the bytes it must move: forward reads x (and the residual) and
writes y (and the sum), backward reads the input, dy (and the sum's gradient) and writes dx), peak memory of one
fwd_bwd, device, torch/triton versions, commit and date. A provider that fails writes a row with the error in `note`.

Attention cases are OFA's: encoder self-attention at S = patches + text (256/576/900/1024 + 40) with the bias OFA
builds per layer (a shared absolute-position term [B, H, S, S] plus a per-layer relative table gathered by bucket
index), a key padding mask; decoder self-attention (causal, token bias) and cross-attention (padding only).
Providers:
  ours   Triton kernels of kernels/attention.py with the materialised bias (bias built inside the timed region)
  sdpa   torch.nn.functional.scaled_dot_product_attention with the materialised bias (+ masks) as attn_mask
  eager  kernels/reference.py attention_ref, OFA's way (fp32 logits [B, H, Lq, Lk])
  flex   torch FlexAttention (compiled) with the bias as a table lookup in score_mod (no [B, H, S, S] for the table)
LayerNorm providers: ours (fused add + LayerNorm), torch (x + residual, then F.layer_norm), apex (add, then apex's
FusedLayerNorm) when apex is importable.

--dry-run runs tiny shapes on the CPU through the Triton interpreter to check that every path of the script works;
its rows say device=cpu-interpreter and carry no throughput: they are never GPU figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

if "--dry-run" in sys.argv:                      # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import append_csv, base_row  # noqa: E402

try:
    import ofa_ds.kernels  # noqa: F401
except ModuleNotFoundError:                      # an uninstalled checkout: ofa_ds.kernels is the repo's kernels/
    import ofa_ds

    ofa_ds.__path__.append(ROOT)
from ofa_ds.kernels import attention_ref  # noqa: E402
from ofa_ds.kernels.attention import triton_attention  # noqa: E402
from ofa_ds.kernels.layernorm import triton_layer_norm  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRESETS = {"base": (12, 64), "large": (16, 64), "huge": (16, 80)}          # (heads, head dim)
TEXT = 40                                                                    # text tokens beside the patches
NUM_BUCKETS = 2 * 42 - 1                                                     # rows of a relative table (per side)


# ---------------------------------------------------------------------------------------------------- timing
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, dry: bool) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of fn()."""
    if not dry:
        import triton.testing
        return tuple(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100))
    times = []                                   # dry run: the interpreter is slow, a couple of runs will do
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def peak_memory_mb(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def modes(forward, leaves, dry: bool):
    """Yield (mode, (p20, p50, p80), peak_mb) for fwd, bwd and fwd_bwd of forward() -> tensor or tuple of tensors
    (each output gets a fixed random gradient)."""
    def zero():
        for t in leaves:
            t.grad = None

    def as_tuple(o):
        return o if isinstance(o, tuple) else (o,)

    outs = list(as_tuple(forward()))
    douts = [torch.randn_like(o) for o in outs]
    yield "fwd", bench(lambda: forward(), dry), None
    yield "bwd", bench(lambda: (zero(), torch.autograd.backward(outs, douts, retain_graph=True)), dry), None
    outs.clear()                                          # free the retained graph before fwd_bwd's peak memory

    def fwd_bwd():
        zero()
        torch.autograd.backward(as_tuple(forward()), douts)
    yield "fwd_bwd", bench(fwd_bwd, dry), peak_memory_mb(fwd_bwd)


# ---------------------------------------------------------------------------------------------------- attention
def attention_cases(dry: bool, presets: list[str]):
    """(name, B, H, Lq, Lk, D, kind) with kind in enc (bias + padding), dec_self (bias + causal), dec_cross."""
    if dry:
        return [("dry_enc", 2, 2, 40, 40, 80, "enc"), ("dry_dec_self", 2, 2, 9, 9, 64, "dec_self"),
                ("dry_dec_cross", 2, 2, 9, 40, 64, "dec_cross")]
    cases = []                                            # the most informative shapes first (time budget)
    for patches in (1024, 576):
        for p in presets:
            H, D = PRESETS[p]
            cases.append((f"{p}_enc_S{patches + TEXT}", 8, H, patches + TEXT, patches + TEXT, D, "enc"))
    for p in presets:
        H, D = PRESETS[p]
        cases.append((f"{p}_dec_self_T32", 64, H, 32, 32, D, "dec_self"))
        cases.append((f"{p}_dec_cross_T32_S616", 64, H, 32, 616, D, "dec_cross"))
    for patches in (900, 256):
        for p in presets:
            H, D = PRESETS[p]
            cases.append((f"{p}_enc_S{patches + TEXT}", 8, H, patches + TEXT, patches + TEXT, D, "enc"))
    return cases


def attention_inputs(B, H, Lq, Lk, D, kind, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = rnd(B, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D)
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    for b in range(B):                                   # a few padded keys per sample (never all of them)
        kpm[b, Lk - (b % 4) * max(1, Lk // 40):] = b % 4 != 0
    kpm = kpm.to(device)
    abs_bias = table = bucket = None
    if kind != "dec_cross":
        abs_bias = 0.1 * rnd(B, H, Lq, Lk)                               # OFA's abs-position term, shared by layers
        table = 0.1 * rnd(NUM_BUCKETS, H)                                # this layer's relative-position table
        bucket = torch.randint(0, NUM_BUCKETS, (Lq, Lk), generator=g).to(device)
    leaves = [t.requires_grad_(True) for t in (q, k, v, abs_bias, table) if t is not None]
    return q, k, v, abs_bias, table, bucket, kpm, leaves


def materialise(abs_bias, table, bucket):
    """OFA's per-layer bias: abs + table[bucket] -> [B, H, Lq, Lk] in memory (with its gradient path)."""
    if abs_bias is None:
        return None
    return abs_bias + table[bucket].permute(2, 0, 1).unsqueeze(0)


def attention_provider(name, q, k, v, abs_bias, table, bucket, kpm, causal, scale, compile_flex=True):
    """A zero-argument forward for provider `name`, or raise if unavailable."""
    if name == "ours":
        return lambda: triton_attention(q, k, v, bias=materialise(abs_bias, table, bucket), key_padding_mask=kpm,
                                        causal=causal, scale=scale)
    if name == "eager":
        return lambda: attention_ref(q, k, v, bias=materialise(abs_bias, table, bucket), key_padding_mask=kpm,
                                     causal=causal, scale=scale)
    if name == "sdpa":
        Lq, Lk = q.shape[2], k.shape[2]
        neg = torch.zeros(q.shape[0], 1, 1, Lk, device=q.device, dtype=q.dtype).masked_fill(
            kpm[:, None, None, :], float("-inf"))
        if causal:
            future = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(Lk - Lq + 1)
            neg = neg.masked_fill(future, float("-inf"))

        def run():
            bias = materialise(abs_bias, table, bucket)
            mask = neg if bias is None else bias + neg
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return run
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
        off = k.shape[2] - q.shape[2]

        def score_mod(score, b, h, qi, kj):
            if abs_bias is not None:
                score = score + abs_bias[b, h, qi, kj] + table[bucket[qi, kj], h]
            masked = kpm[b, kj]
            if causal:
                masked = masked | (kj > qi + off)
            return torch.where(masked, -float("inf"), score)
        return lambda: flex(q, k, v, score_mod=score_mod, scale=scale)
    raise ValueError(name)


def run_attention(args, device, writer, deadline):
    dtype = DTYPES[args.dtype]
    for case, B, H, Lq, Lk, D, kind in attention_cases(args.dry_run, args.presets):
        if args.cases and not any(c in case for c in args.cases.split(",")):
            continue
        causal = kind == "dec_self"
        flops_fwd = 4 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
        shape = f"B={B},H={H},Lq={Lq},Lk={Lk},D={D},bias={'ofa' if kind != 'dec_cross' else 'none'}," \
                f"padding=1,causal={int(causal)}"
        for provider in args.providers:
            if provider not in ("ours", "sdpa", "eager", "flex"):
                continue
            if time.monotonic() > deadline:
                print(f"time budget spent: skipping attention {case} {provider}", flush=True)
                continue
            if provider == "flex" and not _has_flex():
                continue                               # torch < 2.5
            q, k, v, abs_bias, table, bucket, kpm, leaves = attention_inputs(B, H, Lq, Lk, D, kind, dtype, device)
            cpu_flex = args.dry_run and provider == "flex"   # FlexAttention has no CPU backward: check its output only
            if cpu_flex:
                q, k, v, abs_bias, table = (t.detach() if t is not None else None for t in (q, k, v, abs_bias, table))
            try:
                fwd = attention_provider(provider, q, k, v, abs_bias, table, bucket, kpm, causal, (2 * D) ** -0.5,
                                         compile_flex=not args.dry_run)
                with torch.no_grad():                  # every provider must compute the same attention
                    err = (fwd().float() - attention_ref(q, k, v, bias=materialise(abs_bias, table, bucket),
                                                         key_padding_mask=kpm, causal=causal, scale=(2 * D) ** -0.5,
                                                         upcast=True)).abs().max().item()
                note = f"max|out-ref32|={err:.2e}"
                if not err < 0.05:
                    note = "WRONG RESULT " + note
                if cpu_flex:
                    writer("attention", provider, "fwd", case, shape, None, None, "TFLOP/s", None, "checked " + note)
                    continue
                for mode, ms, mem in modes(fwd, leaves, args.dry_run):
                    flops = flops_fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
                    writer("attention", provider, mode, case, shape, ms, flops / ms[1] / 1e9, "TFLOP/s", mem, note)
            except Exception as e:  # record the failure, keep going
                traceback.print_exc()
                writer("attention", provider, "fwd_bwd", case, shape, None, None, "TFLOP/s", None,
                       f"error: {type(e).__name__}: {str(e)[:200]}")
            del q, k, v, abs_bias, table, bucket, kpm, leaves
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------------- layernorm
def layernorm_provider(name, eps=1e-5):
    if name == "ours":
        return lambda x, w, b, r: triton_layer_norm(x, w, b, eps, residual=r)
    if name == "torch":
        def run(x, w, b, r):
            s = x + r
            return F.layer_norm(s, (s.shape[-1],), w, b, eps), s
        return run
    if name == "apex":
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        def run(x, w, b, r):
            s = x + r
            return fused_layer_norm_affine(s, w, b, (s.shape[-1],), eps), s
        return run
    raise ValueError(name)


def run_layernorm(args, device, writer, deadline):
    dtype = DTYPES[args.dtype]
    rows = 64 if args.dry_run else 16384
    widths = [37, 1280] if args.dry_run else [1024, 1280, 4096, 5120, 768]
    if args.widths:
        widths = [int(w) for w in args.widths.split(",")]
    esize = torch.empty((), dtype=dtype).element_size()
    for n in widths:
        shape = f"M={rows},N={n},residual=1"
        nbytes = {"fwd": 4 * rows * n * esize, "bwd": 4 * rows * n * esize, "fwd_bwd": 8 * rows * n * esize}
        for provider in args.ln_providers:
            if time.monotonic() > deadline:
                print(f"time budget spent: skipping layernorm N={n} {provider}", flush=True)
                continue
            try:
                fn = layernorm_provider(provider)
            except ImportError:
                continue                                              # apex not installed
            g = torch.Generator(device="cpu").manual_seed(0)
            x, r = (torch.randn(rows, n, generator=g).to(device, dtype).requires_grad_(True) for _ in range(2))
            w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_(True)
            b = (0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_(True)
            try:
                for mode, ms, mem in modes(lambda: fn(x, w, b, r), [x, r, w, b], args.dry_run):
                    writer("layernorm", provider, mode, f"ln_N{n}", shape, ms, nbytes[mode] / ms[1] / 1e6, "GB/s",
                           mem, "")
            except Exception as e:
                traceback.print_exc()
                writer("layernorm", provider, "fwd_bwd", f"ln_N{n}", shape, None, None, "GB/s", None,
                       f"error: {type(e).__name__}: {str(e)[:200]}")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--ops", default="attention,layernorm")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--presets", default="huge,large,base", help="attention presets, in order")
    p.add_argument("--providers", default="ours,sdpa,eager,flex", help="flex last: it compiles per shape")
    p.add_argument("--ln-providers", default="ours,torch,apex")
    p.add_argument("--cases", default="", help="only cases whose name contains one of these (comma-separated)")
    p.add_argument("--widths", default="", help="LayerNorm widths (comma-separated) instead of the defaults")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this long")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreter); no GPU figures")
    args = p.parse_args(argv)
    args.presets = args.presets.split(",")
    args.providers = args.providers.split(",")
    args.ln_providers = args.ln_providers.split(",")
    deadline = time.monotonic() + args.budget_s

    if torch.cuda.is_available() and not args.dry_run:
        device, device_name = "cuda", torch.cuda.get_device_name(0)
    elif args.dry_run:
        device, device_name = "cpu", "cpu-interpreter"
    else:
        print("no CUDA GPU: kernel benchmarks only run on a GPU (use --dry-run to check the script on CPU)")
        return 2
    import triton
    env = base_row()
    env.update(device=device_name, triton=triton.__version__)
    out_csv = os.path.join(args.out_dir, "kernels.csv")

    failures = []

    def writer(op, provider, mode, case, shape, ms, throughput, unit, mem, note):
        dry = args.dry_run
        if note and (note.startswith("error") or "WRONG" in note):
            failures.append((op, provider, case, note))
        row = {"op": op, "provider": provider, "mode": mode, "case": case, "shape": shape, "dtype": args.dtype,
               "ms_p20": f"{ms[0]:.4f}" if ms else "", "ms_p50": f"{ms[1]:.4f}" if ms else "",
               "ms_p80": f"{ms[2]:.4f}" if ms else "",
               "throughput": "" if dry or throughput is None else f"{throughput:.2f}", "unit": unit,
               "peak_mem_mb": "" if mem is None else f"{mem:.1f}",
               "note": ("dry run, not a GPU figure; " if dry else "") + (note or ""),
               **env}
        append_csv("kernels.csv", row, args.out_dir)
        print(f"{op:9s} {provider:6s} {mode:7s} {case:24s} p50={row['ms_p50'] or '-':>9s} ms "
              f"{row['throughput'] or '-':>8s} {unit} {row['peak_mem_mb'] or '':>8s} {note}", flush=True)

    ops = args.ops.split(",")
    if "layernorm" in ops:
        run_layernorm(args, device, writer, deadline)
    if "attention" in ops:
        run_attention(args, device, writer, deadline)
    print(f"rows appended to {out_csv}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
