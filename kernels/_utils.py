"""Small helpers shared by the Triton kernels of ofa_ds.kernels (no Triton import here)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1, set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 inputs (no TF32), the native MMA otherwise."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "emulate"   # the interpreter's bf16 tl.dot gives garbage (Triton 3.x); multiply the bf16 values in fp32
    return "tf32"          # ignored for fp16/bf16 operands
