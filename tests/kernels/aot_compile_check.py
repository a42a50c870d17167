"""Compile the Triton kernels ahead of time for NVIDIA GPUs, on a machine without one.

    python tests/kernels/aot_compile_check.py [--arch 90 80] [--all-configs]

Triton's compiler runs on the CPU (TTIR → TTGIR → LLVM → PTX → cubin with the ptxas shipped in the triton wheel);
only loading a kernel needs a GPU. This script compiles every kernel with the launch parameters the code uses (the
fixed tiles of OFA_DS_KERNEL_AUTOTUNE=0, and with --all-configs every autotuner config) and checks that the shared
memory each one needs fits the GPU (a config that does not fit would fail at launch; the autotuner skips such
configs, the fixed tiles must fit). It catches GPU-only compile errors that the interpreter cannot see.
Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions). Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["OFA_DS_KERNEL_AUTOTUNE"] = "0"      # import-time choice; the configs are compiled explicitly below

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import ofa_ds.kernels  # noqa: F401
except ModuleNotFoundError:
    import ofa_ds

    ofa_ds.__path__.append(ROOT)
A = importlib.import_module("ofa_ds.kernels.attention")   # the module (the package's `attention` is the function)
LN = importlib.import_module("ofa_ds.kernels.layernorm")

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}   # max dynamic shared memory per block, bytes
TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in ("scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def attention_jobs(dtype: torch.dtype, all_configs: bool):
    t = "*" + TL[dtype]
    prec = A.dot_precision(dtype)
    base = dict(HAS_BIAS=True, HAS_KPM=True, CAUSAL=True, BLOCK_D=128, PRECISION=prec)
    io = {"Q": t, "K": t, "V": t, "Bias": t, "KPM": "*u8", "DO": t, "LSE": "*fp32", "Delta": "*fp32"}

    def launches(bwd: bool):
        fixed = dict(A._tiles(dtype, bwd)) or {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        yield "fixed", fixed
        if all_configs:
            for cfg in A._gpu_configs(bwd):
                yield "autotune", {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    for kind, launch in launches(False):
        yield ("attn_fwd", kind, A._attention_fwd_kernel, {**io, "Out": t}, base, launch)
    for kind, launch in launches(True):
        yield ("attn_bwd_dkdv", kind, A._attention_bwd_dkdv_kernel, {**io, "DK": t, "DV": t, "DBias": t},
               {**base, "BIAS_GRAD": True}, launch)
        yield ("attn_bwd_dq", kind, A._attention_bwd_dq_kernel, {**io, "DQ": t}, base, launch)
        yield ("attn_bwd_dq_from_ds", kind, A._attention_bwd_dq_from_ds_kernel, {"DS": t, "K": t, "DQ": t},
               dict(CAUSAL=True, BLOCK_D=128, PRECISION=prec), launch)
    yield ("attn_bwd_delta", "fixed", A._attention_bwd_delta_kernel, {"Out": t, "DO": t, "Delta": "*fp32"},
           dict(BLOCK_M=64, BLOCK_D=128), {"num_warps": 4, "num_stages": 1})


def layernorm_jobs(dtype: torch.dtype, widths=(37, 1280, 5120, 16384)):
    t = "*" + TL[dtype]
    for n in widths:
        block, warps = LN._launch_settings(n)
        yield (f"ln_fwd_N{n}", "fixed", LN._layer_norm_fwd_kernel,
               {"X": t, "R": t, "W": t, "B": t, "Y": t, "S": t, "Mean": "*fp32", "Rstd": "*fp32"},
               dict(HAS_RES=True, HAS_W=True, HAS_B=True, BLOCK_N=block), {"num_warps": warps})
        yield (f"ln_bwd_N{n}", "fixed", LN._layer_norm_bwd_kernel,
               {"S": t, "W": t, "Mean": "*fp32", "Rstd": "*fp32", "DY": t, "DS": t, "DX": t, "DRES": t,
                "DW": "*fp32", "DB": "*fp32"},
               dict(HAS_DS=True, HAS_RES=True, HAS_W=True, BLOCK_N=block), {"num_warps": warps})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--all-configs", action="store_true", help="also every autotuner config (bf16 only)")
    args = p.parse_args(argv)
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in args.dtypes]
    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for dtype in dtypes:
            all_configs = args.all_configs and dtype == torch.bfloat16
            jobs = list(attention_jobs(dtype, all_configs)) + list(layernorm_jobs(dtype))
            fitting: dict[str, int] = {}
            for name, kind, fn, pointers, constexprs, launch in jobs:
                constexprs = {**constexprs, **{k: v for k, v in launch.items() if k.startswith("BLOCK")}}
                options = {k: v for k, v in launch.items() if k in ("num_warps", "num_stages")}
                label = f"sm{arch} {TL[dtype]:4s} {name:22s} {kind:8s} " + \
                        " ".join(f"{k}={v}" for k, v in sorted(launch.items()))
                t0 = time.time()
                try:
                    c = triton.compile(ASTSource(fn=fn, signature=signature(fn, pointers, constexprs),
                                                 constexprs=constexprs), target=target, options=options)
                except Exception as e:  # a compile error is a bug
                    failures += 1
                    print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                smem = c.metadata.shared
                fits = smem <= SMEM_LIMIT.get(arch, 101376)
                fitting[name] = fitting.get(name, 0) + int(fits)
                if kind == "fixed" and not fits:
                    failures += 1
                print(f"{'ok  ' if fits else ('FAIL' if kind == 'fixed' else 'big ')} {label} "
                      f"smem={smem} ({time.time() - t0:.1f} s)", flush=True)
            for name, n in fitting.items():
                if n == 0:
                    failures += 1
                    print(f"FAIL sm{arch} {TL[dtype]} {name}: no launch configuration fits shared memory")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
