"""Fused attention with a trainable additive bias: Triton forward and backward.

Based on the FlashAttention-2 algorithm (Dao, 2023) and the Triton fused-attention tutorial, rewritten for OFA's
needs. Conventions are those of `kernels/reference.py` (`attention_ref` is the ground truth of the tests).

Supports
  * q [B, H, Lq, D], k and v [B, H, Lk, D] with any strides (innermost stride 1 preferred); any Lq, Lk (tiles at the
    sequence ends are masked); head dims up to 128 (32, 64, 80 for OFA-Huge, 128; D is padded to a power of two
    inside the kernel with masked loads, so D=80 runs 128-wide tiles);
  * fp16, bf16 and fp32 inputs; softmax statistics, accumulators and the bias addition in fp32; fp32 products are
    exact (no TF32); `scale` (default D**-0.5; OFA uses (2D)**-0.5 through its scaling of q);
  * an additive bias broadcastable to [B, H, Lq, Lk] (e.g. [1, H, Lq, Lk] shared by the batch), read through
    stride-0 views (never copied), with its gradient summed over the broadcast dims;
  * a key padding mask (bool [B, Lk], True = padding) and a causal mask aligned bottom-right
    (query i sees keys j <= i + Lk - Lq); rows with every key masked give an output of exactly 0 and no gradient;
  * a deterministic backward: no atomics. One kernel owns a block of keys and loops over all queries (dK, dV and
    the dBias tile), a second owns a block of queries and loops over all keys (dQ). Every output element is written
    by exactly one program, so two backward passes give bitwise identical gradients. When the bias needs a gradient,
    dS is in memory anyway (it is dBias), and the dQ kernel reads it: dQ = scale·dS K, one product per tile instead
    of three (5 instead of 7 tile products in the whole backward).

Does not support
  * dropout on the attention probabilities (`ofa_ds.kernels.attention` falls back to the reference when
    dropout_p > 0); head dims above 128; variable-length packed batches;
  * computing OFA's bias inside the kernel from the relative-position tables (not done yet, see
    docs/kernels.md#not-done-computing-the-bias-inside-the-kernel): the bias is still read from a materialised
    tensor;
  * when the bias is broadcast (e.g. over the batch), its gradient is first written per batch element in fp32
    ([B, H, Lq, Lk], as large as a materialised bias) and then summed by torch.

Known caveats
  * Only the CPU interpreter (TRITON_INTERPRET=1) has run these kernels; they compile for sm_80 and sm_90 within
    shared memory (tests/kernels/aot_compile_check.py) but have not run on a GPU yet. Tile sizes on GPUs
    come from an autotuner over three configs per kernel (OFA_DS_KERNEL_AUTOTUNE=0: fixed tiles). See
    docs/kernels.md for the open GPU targets.
  * Under the interpreter, bf16 tiles are multiplied in fp32 and rounded by hand (kernels/_utils.py): Triton
    3.9's interpreter gets bf16 dots and conversions wrong. GPUs use the native bf16 MMA.

Backward math (per row i, natural log units; s = scale·q kᵀ + bias, masked entries s = -inf)
    P   = softmax(s)                         recomputed from the saved row statistic lse_i = log Σ_j exp(s_ij)
    dV  = Pᵀ dO
    dP  = dO Vᵀ
    dS  = P ∘ (dP − δ),  δ_i = Σ_j P_ij dP_ij = Σ_d dO_id O_id
    dBias = dS  (summed over broadcast dims)
    dQ  = scale · dS K,     dK = scale · dSᵀ Q
The kernels work in base 2 (s·log2 e, exp2), which changes nothing above but the unit of lse.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import device_guard, dot_precision, interpreting, next_pow2, to_dtype


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. PRECISION "emulate" (CPU interpreter with bf16, whose bf16 dot is wrong as of
    Triton 3.x) multiplies the same low-precision values in fp32 instead."""
    if PRECISION == "emulate":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _masked_logits(q, k, bias_ptrs, kpm_ptr, offs_m, offs_n, Lq, Lk, scale,
                   HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits (scale·q kᵀ + bias)·log2(e) of one [BLOCK_M, BLOCK_N] tile, -inf where masked."""
    s = _dot(q, tl.trans(k), PRECISION) * (scale * 1.4426950408889634)
    valid = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if HAS_BIAS:
        b = tl.load(bias_ptrs, mask=valid, other=0.0)
        s += b.to(tl.float32) * 1.4426950408889634
    if HAS_KPM:
        pad = tl.load(kpm_ptr + offs_n, mask=offs_n < Lk, other=1)
        valid = valid & (pad == 0)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Bias, KPM,        # inputs: q, k, v, bias (or a dummy), key padding mask as uint8 (or a dummy)
    Out, LSE,                  # outputs: o [B, H, Lq, D] contiguous, base-2 log-sum-exp [B·H, Lq] fp32
    stride_qb, stride_qh, stride_qm, stride_qd,   # strides of q (elements)
    stride_kb, stride_kh, stride_kn, stride_kd,   # strides of k
    stride_vb, stride_vh, stride_vn, stride_vd,   # strides of v
    stride_bb, stride_bh, stride_bm, stride_bn,   # strides of the bias expanded to [B, H, Lq, Lk] (0 = broadcast)
    stride_pb,                                    # batch stride of the key padding mask
    H, Lq, Lk, D,              # heads, query length, key length, head dim
    scale,                     # softmax scale applied to q kᵀ
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bm
    kpm_ptr = KPM + b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Lk
    if CAUSAL:  # keys beyond the last query row's horizon are never visible to this block
        hi = tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = _masked_logits(q, k, bias_base + offs_n[None, :] * stride_bn, kpm_ptr, offs_m, offs_n, Lq, Lk, scale,
                           HAS_BIAS, HAS_KPM, CAUSAL, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows masked so far: keep exp2 finite (0, not NaN)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(to_dtype(p, v.dtype), v, PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]           # fully masked rows: acc = 0 -> out = 0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))  # +inf -> P = 0 in bwd
    row_ok = offs_m < Lq
    o_ptrs = Out + bh.to(tl.int64) * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, to_dtype(out, Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    Out, DO, Delta,                   # o [B, H, Lq, D] contiguous, dO (any strides), δ [B·H, Lq] fp32 (output)
    stride_ob, stride_oh, stride_om, stride_od,   # strides of dO
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """δ_i = Σ_d dO_id·O_id, the row term of dS = P ∘ (dP − δ)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(Out + bh.to(tl.int64) * Lq * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Bias, KPM, DO, LSE, Delta,   # inputs; DO is dO, Delta the fp32 row sums Σ_d dO·O [B·H, Lq]
    DK, DV, DBias,                        # outputs: dk, dv contiguous like k, v; dbias [B, H, Lq, Lk] contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_pb,
    stride_ob, stride_oh, stride_om, stride_od,   # strides of dO
    H, Lq, Lk, D, scale,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key block, batch·head): loops over query blocks, accumulates dK and dV, writes dBias."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_ob + h * stride_oh
    bias_base = Bias + b * stride_bb + h * stride_bh + offs_n[None, :] * stride_bn
    dbias_base = DBias + bh.to(tl.int64) * Lq * Lk + offs_n[None, :]
    kpm_ptr = KPM + b * stride_pb
    row_base = bh.to(tl.int64) * Lq

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query rows that see none of these keys contribute nothing
        lo = (tl.maximum(0, start_n - (Lk - Lq)) // BLOCK_M) * BLOCK_M
        if BIAS_GRAD:  # ... but their dBias tiles (all masked) must still read 0
            for start_m in range(0, lo, BLOCK_M):
                offs_m = start_m + offs_m0
                tl.store(dbias_base + offs_m[:, None] * Lk, tl.zeros([BLOCK_M, BLOCK_N], DBias.dtype.element_ty),
                         mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        s = _masked_logits(q, k, bias_base + offs_m[:, None] * stride_bm, kpm_ptr, offs_m, offs_n, Lq, Lk, scale,
                           HAS_BIAS, HAS_KPM, CAUSAL, PRECISION)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
        p = tl.exp2(s - lse[:, None])                                         # P, 0 where masked
        do = tl.load(do_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=qd_mask, other=0.0)
        dv += _dot(tl.trans(to_dtype(p, do.dtype)), do, PRECISION)
        dp = _dot(do, tl.trans(v), PRECISION)
        delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
        ds = p * (dp - delta[:, None])                                        # dS = dBias tile
        if BIAS_GRAD:
            tl.store(dbias_base + offs_m[:, None] * Lk, to_dtype(ds, DBias.dtype.element_ty),
                     mask=m_ok[:, None] & (offs_n[None, :] < Lk))
        dk += _dot(tl.trans(to_dtype(ds, q.dtype)), q, PRECISION)

    out_off = bh.to(tl.int64) * Lk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, to_dtype(dk * scale, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, to_dtype(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Bias, KPM, DO, LSE, Delta,
    DQ,                                   # output: dq [B, H, Lq, D] contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_pb,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, D, scale,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query block, batch·head): loops over key blocks, accumulates dQ."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 mask=qd_mask, other=0.0)
    row_base = bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bm
    kpm_ptr = KPM + b * stride_pb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _masked_logits(q, k, bias_base + offs_n[None, :] * stride_bn, kpm_ptr, offs_m, offs_n, Lq, Lk, scale,
                           HAS_BIAS, HAS_KPM, CAUSAL, PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(to_dtype(ds, k.dtype), k, PRECISION)
    tl.store(DQ + bh.to(tl.int64) * Lq * D + offs_m[:, None] * D + offs_d[None, :],
             to_dtype(dq * scale, DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attention_bwd_dq_from_ds_kernel(
    DS, K,                                # inputs: dS as written to dBias [B, H, Lq, Lk] contiguous, k
    DQ,                                   # output: dq [B, H, Lq, D] contiguous
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, Lq, Lk, D, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ = scale·dS K when the dK/dV kernel has already stored dS (the bias gradient): one product per tile instead
    of recomputing Q Kᵀ, P and dO Vᵀ. Bitwise the same as `_attention_bwd_dq_kernel`: that kernel also rounds dS to
    K's dtype before the product, and dS is stored either in fp32 or in that dtype."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    k_base = K + b * stride_kb + h * stride_kh
    ds_base = DS + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < Lk) & d_ok[None, :], other=0.0)
        ds = tl.load(ds_base + offs_n[None, :], mask=m_ok[:, None] & (offs_n[None, :] < Lk), other=0.0)
        dq += _dot(to_dtype(ds, k.dtype), k, PRECISION)
    tl.store(DQ + bh.to(tl.int64) * Lq * D + offs_m[:, None] * D + offs_d[None, :],
             to_dtype(dq * scale, DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Tile sizes. Under the interpreter, 16×16 tiles keep the tiny test shapes multi-block (edges and loops exercised).
# On GPUs an autotuner picks from a short list per (Lq, Lk, head dim, masks); every config writes each output once,
# so tuning never changes results beyond the tile order of the fp32 sums, and the choice is cached per shape.
# OFA_DS_KERNEL_AUTOTUNE=0 uses one fixed config instead (the GPU tests do: dozens of small shapes, where tuning
# would cost more compile time than it saves).
# ----------------------------------------------------------------------------------------------------------------
def _gpu_configs(bwd: bool) -> list:
    # Three configs per kernel: every new (dtype, head-dim tile, mask flags) combination compiles all of them, and a
    # compile costs seconds (OFA needs about six combinations per run). All fit sm_80/sm_90 shared memory
    # (tests/kernels/aot_compile_check.py --all-configs).
    if bwd:
        configs = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 3)]
    else:
        configs = [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in configs]


_TUNE_KEY = ["Lq", "Lk", "BLOCK_D", "HAS_BIAS", "HAS_KPM", "CAUSAL"]
_FWD, _BWD_DKDV, _BWD_DQ = _attention_fwd_kernel, _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel
_BWD_DQ_DS = _attention_bwd_dq_from_ds_kernel
_AUTOTUNE = not interpreting() and os.environ.get("OFA_DS_KERNEL_AUTOTUNE", "1") != "0"
if _AUTOTUNE:
    _FWD = triton.autotune(_gpu_configs(False), key=_TUNE_KEY)(_attention_fwd_kernel)
    _BWD_DKDV = triton.autotune(_gpu_configs(True), key=_TUNE_KEY + ["BIAS_GRAD"])(_attention_bwd_dkdv_kernel)
    _BWD_DQ = triton.autotune(_gpu_configs(True), key=_TUNE_KEY)(_attention_bwd_dq_kernel)
    _BWD_DQ_DS = triton.autotune(_gpu_configs(True), key=["Lq", "Lk", "BLOCK_D", "CAUSAL"])(
        _attention_bwd_dq_from_ds_kernel)


def _tiles(dtype: torch.dtype, bwd: bool) -> dict:
    """Launch parameters when the autotuner is off (fp32 tiles are twice as large in shared memory: keep them small)."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    if _AUTOTUNE:
        return {}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    bm, bn = (32, 64) if bwd else (64, 64)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2}


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _prepare_bias(bias: Tensor | None, shape: tuple[int, int, int, int]) -> Tensor | None:
    """A stride-0 view of `bias` expanded to [B, H, Lq, Lk] (no copy)."""
    if bias is None:
        return None
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias.expand(shape)


def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kpm: Tensor | None, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Returns (out [B, H, Lq, D] contiguous, lse [B, H, Lq] fp32 base 2)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    dummy = q
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _FWD[grid](
        q, k, v, bias if bias is not None else dummy, kpm if kpm is not None else dummy, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(bias), kpm.stride(0) if kpm is not None else 0,
        H, Lq, Lk, D, scale,
        HAS_BIAS=bias is not None, HAS_KPM=kpm is not None, CAUSAL=causal,
        BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(q.dtype), **_tiles(q.dtype, False),
    )
    return out, lse


def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None,
                   kpm: Tensor | None, causal: bool, scale: float, bias_grad_dtype: torch.dtype | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Launch δ, then dK/dV (+ dS as dbias), then dQ. Returns dq, dk, dv and the [B, H, Lq, Lk] dbias or None."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    BLOCK_D = max(16, next_pow2(D))
    _attention_bwd_delta_kernel[(triton.cdiv(Lq, 64), B * H)](out, do, delta, *do.stride(), H, Lq, D,
                                                             BLOCK_M=64, BLOCK_D=BLOCK_D)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=v.device)
    dbias = (torch.empty((B, H, Lq, Lk), dtype=bias_grad_dtype, device=q.device)
             if bias_grad_dtype is not None else None)
    dummy = q
    common = dict(HAS_BIAS=bias is not None, HAS_KPM=kpm is not None, CAUSAL=causal,
                  BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(q.dtype), **_tiles(q.dtype, True))
    strides = (*q.stride(), *k.stride(), *v.stride(), *_strides4(bias), kpm.stride(0) if kpm is not None else 0,
               *do.stride())
    bias_arg = bias if bias is not None else dummy
    kpm_arg = kpm if kpm is not None else dummy
    grid_n = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)  # noqa: E731
    _BWD_DKDV[grid_n](q, k, v, bias_arg, kpm_arg, do, lse, delta, dk, dv, dbias if dbias is not None else dummy,
                      *strides, H, Lq, Lk, D, scale, BIAS_GRAD=dbias is not None, **common)
    grid_m = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    if dbias is not None and dbias.dtype in (torch.float32, q.dtype):     # dS is in memory already: dQ = dS K
        _BWD_DQ_DS[grid_m](dbias, k, dq, *k.stride(), H, Lq, Lk, D, scale, CAUSAL=causal,
                           BLOCK_D=common["BLOCK_D"], PRECISION=common["PRECISION"], **_tiles(q.dtype, True))
    else:
        _BWD_DQ[grid_m](q, k, v, bias_arg, kpm_arg, do, lse, delta, dq, *strides, H, Lq, Lk, D, scale, **common)
    return dq, dk, dv, dbias


def _reduce_to(grad: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Sum a [B, H, Lq, Lk] gradient over the dims that `shape` broadcasts, and reshape it to `shape`."""
    full = grad.shape
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    dims = [i for i in range(4) if padded[i] == 1 and full[i] != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Registration as torch custom ops (`torch.ops.ofa_ds.attention_fwd` / `attention_bwd`): a `torch.compile`d graph
# calls them as opaque kernels instead of breaking around a Python autograd.Function. The fake (meta) functions give
# the output shapes for tracing; the autograd formula (plain torch ops around the backward op) is traced as well.
# ----------------------------------------------------------------------------------------------------------------
def _is_broadcast(bias: Tensor, full: tuple[int, int, int, int]) -> bool:
    """True when `bias` is broadcast over some dim of `full` (its gradient is then accumulated in fp32)."""
    return tuple((1,) * (4 - bias.dim()) + tuple(bias.shape)) != tuple(full)


@torch.library.custom_op("ofa_ds::attention_fwd", mutates_args=())
def attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None,
                     causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Forward kernel: (out [B, H, Lq, D] contiguous in q's dtype, base-2 log-sum-exp [B, H, Lq] fp32)."""
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool)
        kpm = (kpm if kpm.stride(-1) == 1 else kpm.contiguous()).view(torch.uint8)
    with device_guard(q):
        return _attention_fwd(q, k, v, _prepare_bias(bias, (*q.shape[:3], k.shape[2])), kpm, causal, scale)


@attention_fwd_op.register_fake
def _(q, k, v, bias, key_padding_mask, causal, scale):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("ofa_ds::attention_bwd", mutates_args=())
def attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None,
                     key_padding_mask: Tensor | None, causal: bool, scale: float, bias_grad: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: dq, dk, dv and the [B, H, Lq, Lk] bias gradient (an empty tensor unless `bias_grad`), in
    fp32 when the bias is broadcast, else in its dtype."""
    full = (*q.shape[:3], k.shape[2])
    grad_dtype = None
    if bias is not None and bias_grad:
        grad_dtype = torch.float32 if _is_broadcast(bias, full) else bias.dtype
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool)
        kpm = (kpm if kpm.stride(-1) == 1 else kpm.contiguous()).view(torch.uint8)
    with device_guard(q):
        dq, dk, dv, dbias = _attention_bwd(do, q, k, v, out, lse, _prepare_bias(bias, full), kpm, causal, scale,
                                           grad_dtype)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty((0,))


@attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, bias, key_padding_mask, causal, scale, bias_grad):
    full = (*q.shape[:3], k.shape[2])
    if bias is not None and bias_grad:
        dbias = q.new_empty(full, dtype=torch.float32 if _is_broadcast(bias, full) else bias.dtype)
    else:
        dbias = q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _attention_setup_context(ctx, inputs, output):
    q, k, v, bias, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, key_padding_mask, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _attention_backward(ctx, do, _dlse):
    q, k, v, bias, kpm, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = attention_bwd_op(do, q, k, v, out, lse, bias, kpm, ctx.causal, ctx.scale, bias_grad)
    return dq, dk, dv, _reduce_to(dbias, bias.shape, bias.dtype) if bias_grad else None, None, None, None


attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None,
                     key_padding_mask: Tensor | None = None, causal: bool = False,
                     scale: float | None = None) -> Tensor:
    """softmax(scale·q kᵀ + bias + masks) v with the Triton kernels above.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D] (same dtype, D <= 128); bias: broadcastable to [B, H, Lq, Lk];
    key_padding_mask: bool [B, Lk], True = padding; causal: bottom-right aligned. Returns [B, H, Lq, D].
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, L, D]")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape != (B, H, Lk, D) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 128:
        raise ValueError(f"head dim {D} > 128 is not supported")
    if bias is not None:
        torch.broadcast_shapes(bias.shape, (B, H, Lq, Lk))   # raises on a non-broadcastable bias
    if key_padding_mask is not None and key_padding_mask.shape != (B, Lk):
        raise ValueError(f"key_padding_mask must be [B, Lk] = {(B, Lk)}, got {tuple(key_padding_mask.shape)}")
    scale = D ** -0.5 if scale is None else float(scale)
    if q.numel() == 0 or k.numel() == 0:          # nothing to launch: the reference handles empty shapes
        from .reference import attention_ref
        return attention_ref(q, k, v, bias=bias, key_padding_mask=key_padding_mask, causal=causal, scale=scale)
    return attention_fwd_op(q, k, v, bias, key_padding_mask, bool(causal), scale)[0]
