"""Small helpers shared by the Triton kernels of ofa_ds.kernels."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1, set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 inputs (no TF32), the native MMA otherwise."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "emulate"   # the interpreter's bf16 tl.dot gives garbage (Triton 3.x); multiply the bf16 values in fp32
    return "tf32"          # ignored for fp16/bf16 operands


# Triton 3.9's interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest even), which makes
# bf16 results under TRITON_INTERPRET=1 up to one ulp off torch's. `to_dtype` rounds to nearest even by hand there.
_EMULATE_BF16_ROUNDING = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even on every backend (see the note above)."""
    if _EMULATE_BF16_ROUNDING:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)
    else:
        return x.to(DTYPE)
