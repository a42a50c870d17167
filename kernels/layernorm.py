"""Fused LayerNorm (+ residual add): Triton forward and backward.

Based on the Triton LayerNorm tutorial (05-layer-norm.py), with a deterministic weight/bias-gradient reduction and an
optional residual add fused in front of the normalisation (the pre-/post-LN blocks of OFA add a residual and
normalise the sum in one pass over memory). Conventions are those of `layer_norm_ref` in `kernels/reference.py`.

Supports
  * x [..., N] of fp16, bf16 or fp32, N up to 16384 (one row per program, the row held in registers; OFA needs
    N <= 5120); mean and variance in fp32; weight and bias optional, of any float dtype;
  * `residual` (same shape as x): computes s = x + residual, rounds it to the result dtype of the pair (as torch
    does), normalises s and returns (y, s); the gradient reaching s from its other uses is added in the backward;
  * a deterministic backward: each program accumulates the dweight/dbias partial sums of its rows in fp32
    registers and writes them to its own row of a [programs, N] buffer, which torch then sums. No atomics, no locks.

Known caveats
  * Only the CPU interpreter has run these kernels; they compile for sm_80/sm_90
    (tests/kernels/aot_compile_check.py) but have not run on a GPU yet. Launch settings (one row per forward program,
    warps = BLOCK_N / 256, 4 backward programs per SM) follow the Triton tutorial and are not tuned on hardware.

Does not support
  * normalising over more than the last dim; RMSNorm; dropout or row scaling before the add;
  * N > 16384 (the row no longer fits the registers of one program).

Backward math (per row, x̂ = (s − μ)·r with r = 1/√(σ² + eps), w the weight, g = w ∘ dy)
    dx   = r · (g − (x̂ · c1 + c2)),   c1 = mean(x̂ ∘ g),  c2 = mean(g)      (+ ds_out when the sum s is returned)
    dw   = Σ_rows dy ∘ x̂,   db = Σ_rows dy
    dres = dx   (the same tensor is returned for both when x and residual share a dtype)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import device_guard, interpreting, next_pow2, to_dtype

MAX_WIDTH = 16384


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B,        # inputs: x, residual (or a dummy), weight, bias (or dummies)
    Y, S,              # outputs: normalised y, the sum s = x + residual (written only when HAS_RES)
    Mean, Rstd,        # outputs: fp32 per-row mean and 1/std, saved for the backward
    N,                 # row width
    eps,               # epsilon added to the variance
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(X + row * N + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * N + cols, mask=ok, other=0.0)
        s = to_dtype(x.to(tl.float32) + r.to(tl.float32), S.dtype.element_ty)   # rounded like torch's x + residual
        tl.store(S + row * N + cols, s, mask=ok)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    mean = tl.sum(xf, 0) / N
    xc = tl.where(ok, xf - mean, 0.0)
    var = tl.sum(xc * xc, 0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, to_dtype(y, Y.dtype.element_ty), mask=ok)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    S, W, Mean, Rstd,  # saved: the normalised input (x, or x + residual), weight (or a dummy), row statistics
    DY, DS,            # incoming gradients of y and of the returned sum (DS only when HAS_DS)
    DX, DRES,          # outputs: dx, and the same values again in the residual's dtype (when HAS_RES)
    DW, DB,            # outputs: fp32 [programs, N] partial sums of dweight and dbias
    M, N,              # rows, row width
    HAS_DS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, M, nprog):                 # rows pid, pid + P, pid + 2P, ...: a fixed order per program
        off = (tl.zeros([], dtype=tl.int64) + row) * N   # 64-bit offsets (row may be a Python int when interpreted)
        s = tl.load(S + off + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + off + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(ok, (s - mean) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(xhat * g, 0) / N
        c2 = tl.sum(g, 0) / N
        dx = (g - (xhat * c1 + c2)) * rstd
        if HAS_DS:
            dx += tl.load(DS + off + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + off + cols, to_dtype(dx, DX.dtype.element_ty), mask=ok)
        if HAS_RES:
            tl.store(DRES + off + cols, to_dtype(dx, DRES.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * N + cols, dw, mask=ok)
    tl.store(DB + pid * N + cols, db, mask=ok)


def _launch_settings(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a row of width n: the whole row in one tile, warps scaled with its size."""
    block = next_pow2(n)
    return block, min(max(block // 256, 1), 16)


def _layer_norm_fwd(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                    eps: float) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """x, residual: [M, N] contiguous. Returns (y, s or None, mean, rstd)."""
    M, N = x.shape
    block, warps = _launch_settings(N)
    y = torch.empty_like(x)
    s = torch.empty((M, N), dtype=torch.result_type(x, residual), device=x.device) if residual is not None else None
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    _layer_norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, s if s is not None else y, mean, rstd, N, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block,
        num_warps=warps,
    )
    return y, s, mean, rstd


def _num_bwd_programs(M: int, device: torch.device) -> int:
    """Programs of the backward: a few per SM on GPUs (enough rows each to amortise the partial sums); 4 in the
    interpreter. Fixed per (M, device), so the reduction order, hence the result, is the same on every call."""
    if interpreting() or device.type != "cuda":
        return max(1, min(M, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(M, 4 * sms))


def _layer_norm_bwd(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                    x_dtype: torch.dtype, res_dtype: torch.dtype | None
                    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Returns dx, dresidual (or None), and the fp32 dweight, dbias sums."""
    M, N = s.shape
    block, warps = _launch_settings(N)
    programs = _num_bwd_programs(M, s.device)
    dx = torch.empty((M, N), dtype=x_dtype, device=s.device)
    # The residual's gradient equals dx (as torch's AddBackward, return the same tensor for both); a second copy is
    # written only when the residual has another dtype.
    separate = res_dtype is not None and res_dtype != x_dtype
    dres = torch.empty((M, N), dtype=res_dtype, device=s.device) if separate else None
    dw = torch.empty((programs, N), dtype=torch.float32, device=s.device)
    db = torch.empty((programs, N), dtype=torch.float32, device=s.device)
    _layer_norm_bwd_kernel[(programs,)](
        s, weight if weight is not None else s, mean, rstd, dy, ds if ds is not None else dy,
        dx, dres if dres is not None else dx, dw, db, M, N,
        HAS_DS=ds is not None, HAS_RES=dres is not None, HAS_W=weight is not None, BLOCK_N=block, num_warps=warps,
    )
    if res_dtype is not None and not separate:
        dres = dx
    return dx, dres, dw.sum(0), db.sum(0)


def _rows(t: Tensor | None, n: int) -> Tensor | None:
    if t is None:
        return None
    t = t.reshape(-1, n)
    return t if t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Registration as torch custom ops (`torch.ops.ofa_ds.layer_norm_fwd` / `layer_norm_bwd`), so that a
# `torch.compile`d graph calls the kernels without breaking. Custom ops return tensors only: where the original
# result is "None" (no residual, no separate residual gradient) they return an empty tensor, and the autograd
# formula below turns it back into None from facts known at trace time (dtypes, which inputs exist).
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("ofa_ds::layer_norm_fwd", mutates_args=())
def layer_norm_fwd_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y shaped like x, s = x + residual shaped like x or empty without a residual, fp32 mean [M], fp32 rstd [M])
    for the M = x.numel() / N rows of width N = x.shape[-1]."""
    n = x.shape[-1]
    with device_guard(x):
        y, s, mean, rstd = _layer_norm_fwd(_rows(x, n), _rows(residual, n), weight, bias, eps)
    return y.reshape(x.shape), s.reshape(x.shape) if s is not None else x.new_empty((0,)), mean, rstd


@layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps):
    m = x.numel() // x.shape[-1]
    s = x.new_empty(x.shape, dtype=torch.result_type(x, residual)) if residual is not None else x.new_empty((0,))
    return (x.new_empty(x.shape), s, x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.float32))


@torch.library.custom_op("ofa_ds::layer_norm_bwd", mutates_args=())
def layer_norm_bwd_op(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                      x_dtype: torch.dtype, res_dtype: torch.dtype | None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx shaped like dy, the residual's gradient when its dtype differs from x's else empty, fp32 dweight [N],
    fp32 dbias [N]). `s` is the normalised input (x, or x + residual)."""
    n = s.shape[-1]
    with device_guard(s):
        dx, dres, dw, db = _layer_norm_bwd(_rows(dy, n), _rows(ds, n), _rows(s, n), weight, mean, rstd, x_dtype,
                                           res_dtype)
    separate = res_dtype is not None and res_dtype != x_dtype
    return dx.reshape(dy.shape), dres.reshape(dy.shape) if separate else dy.new_empty((0,)), dw, db


@layer_norm_bwd_op.register_fake
def _(dy, ds, s, weight, mean, rstd, x_dtype, res_dtype):
    n = s.shape[-1]
    separate = res_dtype is not None and res_dtype != x_dtype
    dres = dy.new_empty(dy.shape, dtype=res_dtype) if separate else dy.new_empty((0,))
    return (dy.new_empty(dy.shape, dtype=x_dtype), dres, dy.new_empty((n,), dtype=torch.float32),
            dy.new_empty((n,), dtype=torch.float32))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.bias_dtype, ctx.x_dtype = bias.dtype if bias is not None else None, x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None


def _layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if ctx.res_dtype is None:
        ds = None                                     # s is x itself: there is no returned sum to take a gradient
    dx, dres, dw, db = layer_norm_bwd_op(dy, ds, s, weight, mean, rstd, ctx.x_dtype, ctx.res_dtype)
    if ctx.res_dtype is None:
        dres = None
    elif ctx.res_dtype == ctx.x_dtype:
        dres = dx                                     # as torch's AddBackward: the same tensor for both inputs
    dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db, dres, None


layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def triton_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *,
                      residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of x [..., N]; with `residual` returns (layer_norm(x + residual), x + residual)."""
    n = x.shape[-1]
    if n > MAX_WIDTH:
        raise ValueError(f"row width {n} > {MAX_WIDTH} is not supported by the Triton LayerNorm")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (n,):
            raise ValueError(f"{name} must be [{n}], got {tuple(p.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if x.numel() == 0:                             # nothing to launch: the reference handles empty shapes
        from .reference import layer_norm_ref
        return layer_norm_ref(x, weight, bias, eps, residual=residual)
    weight = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    y, s, _, _ = layer_norm_fwd_op(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, s)
