"""The tolerance rule of the kernel tests (flash-attn's): a low-precision kernel may be at most twice as far from the
fp32 reference as PyTorch computing in the same low precision, plus a small absolute slack; fp32 kernels must match
the reference tightly."""
from __future__ import annotations

import torch
from torch import Tensor

# Absolute slack, as a fraction of the reference's largest magnitude: two units in the last place of the dtype.
# (Elementwise, PyTorch's own error can be 0 by luck where the kernel is one rounding away.)
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def assert_within_rule(name: str, out: Tensor, ref32: Tensor, lowp: Tensor | None,
                       compute_dtype: torch.dtype | None = None) -> None:
    """|out − ref32| ≤ 2·|lowp − ref32| + atol for fp16/bf16; |out − ref32| ≤ 1e-5 + 1e-4·|ref32| for fp32.

    `compute_dtype` (default out.dtype) is the precision of the inputs that produced `out` (an fp32 weight
    gradient computed from bf16 activations follows the bf16 rule)."""
    compute_dtype = compute_dtype or out.dtype
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.float() - ref32.float()).abs()
    scale = ref32.float().abs().max().item()
    if compute_dtype == torch.float32:
        bound = 1e-5 * max(scale, 1.0) + 1e-4 * ref32.float().abs()
    else:
        assert lowp is not None
        bound = 2 * (lowp.float() - ref32.float()).abs() + 2 * ULP[compute_dtype] * max(scale, 1e-3)
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name} ({out.dtype}, computed in {compute_dtype}): {int((err > bound).sum())} of {err.numel()} elements "
        f"out of tolerance; worst err {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"(ref max {scale:.3g})")
