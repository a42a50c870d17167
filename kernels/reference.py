"""Plain-PyTorch reference implementations of the ofa_ds kernels.

These are the ground truth for the Triton kernels' tests and benchmarks, and the implementation used on CPU and on
GPUs where Triton is not used (V100). They are written for clarity, not speed: attention materialises the full
[B, H, Lq, Lk] logits, exactly as the original OFA code does.

Conventions shared with the Triton kernels (see `ofa_ds.kernels.attention`):
  q, k, v            [B, H, L, D]
  bias               additive, broadcastable to [B, H, Lq, Lk] (OFA's absolute + relative position bias)
  key_padding_mask   bool [B, Lk], True = padding (the key is ignored)
  causal             query i sees keys j <= i + (Lk - Lq) (bottom-right aligned, as in incremental decoding)
  softmax            computed in float32, probabilities cast back to the input dtype before the product with v
  fully masked rows  give an output of exactly 0 (not NaN)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None,
                  key_padding_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
                  dropout_p: float = 0.0, upcast: bool = False) -> Tensor:
    """Softmax(q kᵀ·scale + bias + masks) v. `upcast=True` computes everything in float32 and returns float32."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        bias = bias.float() if bias is not None else None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q * scale, k.transpose(-1, -2)).float()          # (B, H, Lq, Lk)
    if bias is not None:
        logits = logits + bias.float()
    lq, lk = logits.shape[-2:]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)            # (B, 1, 1, Lk)
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        future = j > i + (lk - lq)                                           # (Lq, Lk)
        mask = future if mask is None else (mask | future)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = torch.nan_to_num(probs, nan=0.0)                             # fully masked rows -> 0
    probs = probs.to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v)
    return out if upcast else out.to(dtype)


def layer_norm_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *,
                   residual: Tensor | None = None, upcast: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim with float32 statistics.

    With `residual`, returns `(layer_norm(x + residual), x + residual)`; otherwise just the normalised tensor.
    """
    dtype = x.dtype
    s = x if residual is None else x + residual
    xf = s.float()
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.layer_norm(xf, (xf.shape[-1],), w, b, eps)
    if not upcast:
        y = y.to(dtype)
    if residual is None:
        return y
    return y, (s.float() if upcast else s)
