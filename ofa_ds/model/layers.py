"""Transformer building blocks of OFA: LayerNorm, multi-head attention with an additive bias, encoder and decoder
layers (pre-norm with the NormFormer extras of every released checkpoint).

Unusual compared with a stock Transformer:
  * attention logits are scaled by 1/sqrt(head_dim · attn_scale_factor) = 1/sqrt(2d), and every call receives an
    additive position bias [B, H, Lq, Lk] (absolute + per-layer relative), which carries a gradient;
  * NormFormer: a LayerNorm after each attention (attn_ln / self_attn_ln / cross_attn_ln), one inside the FFN
    (ffn_layernorm), and a learnable per-head output scale c_attn;
  * all attention and LayerNorm math goes through `ofa_ds.kernels` so the Triton kernels drop in by config;
  * tensors are batch-major [B, L, C] (fairseq is time-major; parameter names are fairseq's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofa_ds import kernels
from ofa_ds.config import ModelConfig
from ofa_ds.model.resnet import DropPath


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameter names) whose math runs through `ofa_ds.kernels.layer_norm`."""

    def __init__(self, dim: int, backend: str = "torch", eps: float = 1e-5):
        super().__init__(dim, eps=eps)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class MultiheadAttention(nn.Module):
    """q/k/v/out projections + `ofa_ds.kernels.attention` + optional per-head scale `c_attn`.

    `cache` (a dict owned by the caller) enables incremental decoding: for self-attention new keys/values are
    appended to cache["k"], cache["v"]; for cross-attention (`static_kv=True`) they are computed once.

    Grouped cross-attention (beam search, sampling): with `static_kv`, when the keys/values have B rows and the
    queries R = n·B rows, query rows b·n … b·n+n−1 all attend to row b's keys. They are folded into one
    [B, H, n·L, d] query block, so each sentence's encoder K/V are projected, stored and read once, not per beam.
    The bias is then either per query row [R, H, L, S] or already grouped, [B or 1, H, n·L or 1, S].

    `prompt_kv` (prompt tuning, ofa_ds/model/prompt.py): prefix keys and values [B, H, P, d] prepended after the
    cache update (never cached), with zero bias columns and no padding.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5
        self.dropout = cfg.attention_dropout
        self.backend = cfg.kernel_backend
        self.c_attn = nn.Parameter(torch.ones(cfg.num_heads)) if cfg.scale_heads else None
        d = cfg.d_model
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def _heads(self, x: Tensor) -> Tensor:                       # [B, L, C] -> [B, H, L, d]
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key_value: Tensor, *, bias: Tensor | None, key_padding_mask: Tensor | None,
                causal: bool = False, cache: dict | None = None, static_kv: bool = False,
                prompt_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q = self._heads(self.q_proj(query) * self.scaling)
        if static_kv and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._heads(self.k_proj(key_value)), self._heads(self.v_proj(key_value))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                elif static_kv:          # read at every step: one copy now, not one per matmul
                    k, v = k.contiguous(), v.contiguous()
                cache["k"], cache["v"] = k, v
        if prompt_kv is not None:
            k, v, bias, key_padding_mask = _prepend_prompt(prompt_kv, k, v, bias, key_padding_mask)
        if static_kv and k.shape[0] != q.shape[0]:
            o = self._grouped(q, k, v, bias, key_padding_mask)
        else:
            o = kernels.attention(q, k, v, bias=bias, key_padding_mask=key_padding_mask, causal=causal, scale=1.0,
                                  dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        if self.c_attn is not None:
            o = o * self.c_attn.view(1, -1, 1, 1).to(o.dtype)   # [B, H, Lq, d] scaled per head
        b, _, n, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))

    def _grouped(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        """Cross-attention of R = n·B query rows on B key rows (see the class docstring) → [R, H, L, d]."""
        r, h, n_q, d = q.shape
        b = k.shape[0]
        n = r // b
        if n * b != r:
            raise ValueError(f"cross-attention: {r} query rows are not a multiple of the {b} encoder rows")
        qg = q.view(b, n, h, n_q, d).transpose(1, 2).reshape(b, h, n * n_q, d)
        if bias is not None and bias.shape[0] == r:
            bias = bias.view(b, n, h, n_q, -1).transpose(1, 2).reshape(b, h, n * n_q, -1)
        if key_padding_mask is not None and key_padding_mask.shape[0] == r:
            key_padding_mask = key_padding_mask[::n]
        o = kernels.attention(qg, k, v, bias=bias, key_padding_mask=key_padding_mask, scale=1.0,
                              dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return o.view(b, h, n, n_q, d).transpose(1, 2).reshape(r, h, n_q, d)


def _prepend_prompt(prompt_kv: tuple[Tensor, Tensor], k: Tensor, v: Tensor, bias: Tensor | None,
                    key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """K = [prompt_k ; k], V = [prompt_v ; v] on the key axis; the bias gets P zero columns on the left (the position
    bias covers the real keys only) and the padding mask P False columns. A causal mask stays right: it is
    bottom-right aligned, so every query sees the P prefix keys."""
    pk, pv = prompt_kv
    n = pk.shape[2]
    k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
    if bias is not None:
        bias = F.pad(bias, (n, 0))
    if key_padding_mask is not None:
        key_padding_mask = F.pad(key_padding_mask, (n, 0), value=False)
    return k, v, bias, key_padding_mask


def _ffn(layer: nn.Module, x: Tensor) -> Tensor:
    """fc1 → GELU (float32 erf) → activation dropout → ffn_layernorm (NormFormer) → fc2, on a layer's modules."""
    x = F.gelu(layer.fc1(x).float()).type_as(x)
    x = F.dropout(x, layer.activation_dropout, layer.training)
    if layer.ffn_layernorm is not None:
        x = layer.ffn_layernorm(x)
    return layer.fc2(x)


class EncoderLayer(nn.Module):
    """x + drop_path(attn_ln(self_attn(LN(x)))) then x + drop_path(fc2(ffn_ln(gelu(fc1(LN(x))))))."""

    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        be = cfg.kernel_backend
        self.self_attn = MultiheadAttention(cfg)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, be)
        self.dropout = cfg.dropout
        self.activation_dropout = cfg.activation_dropout
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.attn_ln = LayerNorm(cfg.d_model, be) if cfg.scale_attn else None
        self.ffn_layernorm = LayerNorm(cfg.ffn_dim, be) if cfg.scale_fc else None
        self.final_layer_norm = LayerNorm(cfg.d_model, be)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, padding_mask: Tensor | None, bias: Tensor,
                prompt_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, bias=bias, key_padding_mask=padding_mask, prompt_kv=prompt_kv)
        if self.attn_ln is not None:
            h = self.attn_ln(h)
        x = x + self.drop_path(F.dropout(h, self.dropout, self.training))
        h = _ffn(self, self.final_layer_norm(x))
        return x + self.drop_path(F.dropout(h, self.dropout, self.training))


class DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention and FFN, each with its NormFormer LayerNorm and drop path."""

    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        be = cfg.kernel_backend
        self.self_attn = MultiheadAttention(cfg)
        self.self_attn_ln = LayerNorm(cfg.d_model, be) if cfg.scale_attn else None
        self.cross_attn_ln = LayerNorm(cfg.d_model, be) if cfg.scale_attn else None
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, be)
        self.encoder_attn = MultiheadAttention(cfg)
        self.encoder_attn_layer_norm = LayerNorm(cfg.d_model, be)
        self.ffn_layernorm = LayerNorm(cfg.ffn_dim, be) if cfg.scale_fc else None
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = LayerNorm(cfg.d_model, be)
        self.dropout = cfg.dropout
        self.activation_dropout = cfg.activation_dropout
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, enc: Tensor, enc_padding_mask: Tensor | None, self_bias: Tensor,
                cross_bias: Tensor, self_padding_mask: Tensor | None, cache: dict | None = None,
                prompt_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, bias=self_bias, key_padding_mask=self_padding_mask, causal=True,
                           cache=None if cache is None else cache.setdefault("self", {}), prompt_kv=prompt_kv)
        if self.self_attn_ln is not None:
            h = self.self_attn_ln(h)
        x = x + self.drop_path(F.dropout(h, self.dropout, self.training))
        h = self.encoder_attn_layer_norm(x)
        h = self.encoder_attn(h, enc, bias=cross_bias, key_padding_mask=enc_padding_mask, static_kv=True,
                              cache=None if cache is None else cache.setdefault("cross", {}))
        if self.cross_attn_ln is not None:
            h = self.cross_attn_ln(h)
        x = x + self.drop_path(F.dropout(h, self.dropout, self.training))
        h = _ffn(self, self.final_layer_norm(x))
        return x + self.drop_path(F.dropout(h, self.dropout, self.training))
