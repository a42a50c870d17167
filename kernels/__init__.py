"""ofa_ds.kernels: the attention and LayerNorm entry points of the model.

Every attention and LayerNorm of the OFA model goes through `attention()` and `layer_norm()` below. Each takes a
`backend`: "torch" (kernels/reference.py), "triton" (the fused kernels of kernels/attention.py and
kernels/layernorm.py), or "auto" (Triton on CUDA devices with compute capability >= 8.0, PyTorch elsewhere: CPU,
V100). This package imports only torch (and triton lazily); it knows nothing of OFA's modules or configs.

This folder is installed as `ofa_ds.kernels` (never as a top-level `kernels`, a name Hugging Face uses).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .reference import attention_ref, layer_norm_ref

# Importing a submodule binds its name on the package: the first `import ofa_ds.kernels.attention` anywhere would
# replace the function `attention` below by the module (then `kernels.attention(...)` raises "'module' object is not
# callable"). Importing the Triton modules here, before the functions are defined, makes the functions win for good.
# Without triton the import fails and the torch backend still works.
try:
    from . import attention as _attention_module  # noqa: F401
    from . import layernorm as _layernorm_module  # noqa: F401
except ImportError:
    pass

__all__ = ["attention", "layer_norm", "attention_ref", "layer_norm_ref", "resolve_backend", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to "triton" or "torch" for tensors on `device`; validate the others."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                               "imported, for CPU testing); use backend='auto' to fall back to PyTorch")
        return "triton"
    if backend == "auto":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 and triton_available():
            return "triton"
        return "torch"
    raise ValueError(f"unknown kernel backend {backend!r}; use 'torch', 'triton' or 'auto'")


def attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None,
              key_padding_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
              dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention with an additive (trainable) bias.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; bias broadcastable to [B, H, Lq, Lk] (its gradient is returned summed
    over broadcast dims); key_padding_mask: bool [B, Lk], True = ignore; causal: bottom-right aligned future mask.
    Returns [B, H, Lq, D] in q's dtype. Softmax statistics are float32.
    """
    which = resolve_backend(backend, q.device)
    if which == "triton" and dropout_p == 0.0:
        from .attention import triton_attention
        return triton_attention(q, k, v, bias=bias, key_padding_mask=key_padding_mask, causal=causal, scale=scale)
    return attention_ref(q, k, v, bias=bias, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                         dropout_p=dropout_p)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *,
               residual: Tensor | None = None, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim; with `residual` returns `(layer_norm(x + residual), x + residual)`."""
    which = resolve_backend(backend, x.device)
    if which == "triton":
        from .layernorm import triton_layer_norm
        return triton_layer_norm(x, weight, bias, eps, residual=residual)
    if residual is None and x.dtype == torch.float32:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps, residual=residual)
