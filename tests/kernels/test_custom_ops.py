"""The Triton kernels as torch custom ops: schema, fake (meta) functions and autograd registration checked by
torch.library.opcheck, and a torch.compile'd graph (fullgraph=True: any graph break fails) that gives exactly the
eager results and gradients. Runs through the Triton interpreter on CPU; backend aot_eager traces forward and
backward like inductor does but without generating C++ (inductor itself is exercised by tests/training)."""
from __future__ import annotations

import pytest
import torch

from ofa_ds import kernels
from ofa_ds.kernels.attention import attention_bwd_op, attention_fwd_op
from ofa_ds.kernels.layernorm import layer_norm_bwd_op, layer_norm_fwd_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B=2, H=2, Lq=5, Lk=7, D=16, grad=True):
    return [torch.randn(B, H, L, D, device=DEVICE, requires_grad=grad) for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("bias_shape,kpm,causal", [((1, 2, 5, 7), True, False), (None, False, True)])
def test_attention_ops_pass_opcheck(bias_shape, kpm, causal):
    q, k, v = _qkv()
    bias = torch.randn(bias_shape, device=DEVICE, requires_grad=True) if bias_shape else None
    mask = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    mask[1, -2:] = True
    mask = mask if kpm else None
    torch.library.opcheck(attention_fwd_op, (q, k, v, bias, mask, causal, 0.25))
    out, lse = attention_fwd_op(q, k, v, bias, mask, causal, 0.25)
    do = torch.randn_like(out)
    plain = [t.detach() if t is not None else None for t in (q, k, v, bias)]
    torch.library.opcheck(attention_bwd_op, (do, *plain[:3], out.detach(), lse.detach(), plain[3], mask, causal,
                                             0.25, bias is not None))


@pytest.mark.parametrize("residual_dtype", [None, torch.bfloat16])
def test_layer_norm_ops_pass_opcheck(residual_dtype):
    x = torch.randn(3, 4, 32, device=DEVICE, requires_grad=True)
    w, b = (torch.randn(32, device=DEVICE, requires_grad=True) for _ in range(2))
    r = (torch.randn(3, 4, 32, device=DEVICE, dtype=residual_dtype, requires_grad=True)
         if residual_dtype is not None else None)
    torch.library.opcheck(layer_norm_fwd_op, (x, w, b, r, 1e-5))
    torch.library.opcheck(layer_norm_fwd_op, (x, None, None, r, 1e-5))
    y, s, mean, rstd = layer_norm_fwd_op(x, w, b, r, 1e-5)
    saved = (s if r is not None else x).detach()
    torch.library.opcheck(layer_norm_bwd_op, (torch.randn_like(y), torch.randn_like(s) if r is not None else None,
                                              saved, w.detach(), mean.detach(), rstd.detach(), x.dtype,
                                              residual_dtype))


def _block(q, k, v, bias, x, w, b, r, mask):
    """Attention with a broadcast bias and a padding mask, then LayerNorm with a residual: both ops, both outputs
    of the residual form, so every gradient path of the registrations is used."""
    o = kernels.attention(q, k, v, bias=bias, key_padding_mask=mask, scale=0.3, backend="triton")
    y, s = kernels.layer_norm(x, w, b, residual=r, backend="triton")
    return (o * o).sum() + (y * s).sum() + kernels.layer_norm(x, w, None, backend="triton").pow(2).sum()


def test_compiled_graph_calls_the_kernels_without_breaks():
    torch._dynamo.reset()
    q, k, v = _qkv()
    bias = torch.randn(1, 2, 5, 7, device=DEVICE, requires_grad=True)
    x, r = (torch.randn(3, 4, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(32, device=DEVICE, requires_grad=True) for _ in range(2))
    mask = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    mask[0, -3:] = True
    args = (q, k, v, bias, x, w, b, r)
    eager = _block(*args, mask)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)   # fullgraph: a break raises
    out = compiled(*args, mask)
    g_comp = torch.autograd.grad(out, args)
    assert torch.equal(out, eager)
    for ge, gc in zip(g_eager, g_comp):
        assert torch.equal(ge, gc)
    ops = torch._dynamo.explain(_block)(*args, mask)
    assert ops.graph_break_count == 0 and ops.graph_count == 1
