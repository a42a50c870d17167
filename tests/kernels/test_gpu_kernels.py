"""The kernels at OFA's real sizes on a GPU (compiled Triton, bf16 MMA): skipped without CUDA.

benchmarks/gpu_suite.sh runs these together with the rest of tests/kernels (which use the GPU too when present)."""
from __future__ import annotations

import pytest
import torch

from ofa_ds.kernels import attention_ref, layer_norm_ref
from ofa_ds.kernels.attention import triton_attention
from ofa_ds.kernels.layernorm import triton_layer_norm

from ._tolerance import assert_within_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _grads(fn, tensors, dout, upcast=False):
    leaves = [t.detach().clone().float().requires_grad_(True) if upcast else t.detach().clone().requires_grad_(True)
              for t in tensors]
    out = fn(*leaves)
    out.backward(dout.float() if upcast else dout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("S,D,H,dtype", [(1064, 80, 16, torch.bfloat16), (296, 64, 16, torch.bfloat16),
                                         (937, 128, 8, torch.bfloat16), (1064, 80, 16, torch.float16)])
def test_attention_ofa_encoder_shapes(S, D, H, dtype):
    B = 2
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(4))
    bias = torch.randn(B, H, S, S, device="cuda", dtype=dtype)
    kpm = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    kpm[1, -37:] = True
    scale = (2 * D) ** -0.5

    def f(q, k, v, bias, impl=triton_attention, **kw):
        return impl(q, k, v, bias=bias, key_padding_mask=kpm, scale=scale, **kw)

    out, grads = _grads(f, (q, k, v, bias), do)
    ref, ref_grads = _grads(lambda *a: f(*a, impl=attention_ref, upcast=True), (q, k, v, bias), do, upcast=True)
    low, low_grads = _grads(lambda *a: f(*a, impl=attention_ref), (q, k, v, bias), do)
    assert_within_rule("out", out, ref, low)
    for name, g, r, lo in zip("qkvb", grads, ref_grads, low_grads):
        assert_within_rule(f"d{name}", g, r, lo)


def test_attention_decoder_causal_and_determinism():
    B, H, T, D = 8, 16, 33, 80
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.randn(1, H, T, T, device="cuda", dtype=torch.bfloat16)
    f = lambda q, k, v, b: triton_attention(q, k, v, bias=b, causal=True)  # noqa: E731
    a = _grads(f, (q, k, v, bias), do)
    b = _grads(f, (q, k, v, bias), do)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    ref, ref_grads = _grads(lambda q, k, v, b: attention_ref(q, k, v, bias=b, causal=True, upcast=True),
                            (q, k, v, bias), do, upcast=True)
    low, low_grads = _grads(lambda q, k, v, b: attention_ref(q, k, v, bias=b, causal=True), (q, k, v, bias), do)
    assert_within_rule("out", a[0], ref, low)
    for name, g, r, lo in zip("qkvb", a[1], ref_grads, low_grads):
        assert_within_rule(f"d{name}", g, r, lo)


def test_attention_uses_less_memory_than_eager():
    B, H, S, D = 4, 16, 1064, 80
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = torch.randn(B, H, S, S, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def peak(impl):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        impl(q, k, v, bias=bias).sum().backward()
        torch.cuda.synchronize()
        for t in (q, k, v, bias):
            t.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours, eager = peak(triton_attention), peak(attention_ref)
    assert ours < 0.6 * eager, (ours, eager)


@pytest.mark.parametrize("n", [1024, 1280, 4096, 5120])
def test_layer_norm_ofa_widths_gpu(n):
    M = 4096
    x, r, dy, ds = (torch.randn(M, n, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    w = (1 + 0.1 * torch.randn(n, device="cuda")).to(torch.bfloat16)
    b = (0.1 * torch.randn(n, device="cuda")).to(torch.bfloat16)

    def run(fn, upcast=False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, r)]
        if upcast:
            leaves = [t.detach().float().requires_grad_(True) for t in leaves]
        y, s = fn(leaves[0], leaves[1], leaves[2], 1e-5, residual=leaves[3])
        torch.autograd.backward([y, s], [dy.float(), ds.float()] if upcast else [dy, ds])
        return y.detach(), s.detach(), [t.grad for t in leaves]

    def torch_lowp(x, w, b, eps, residual):
        s = x + residual
        return torch.nn.functional.layer_norm(s, (n,), w, b, eps), s

    y, s, g = run(triton_layer_norm)
    yr, sr, gr = run(lambda *a, **k: layer_norm_ref(*a, upcast=True, **k), upcast=True)
    yl, sl, gl = run(torch_lowp)
    assert torch.equal(s, sl)
    assert_within_rule("y", y, yr, yl)
    for name, a, c, lo in zip(["x", "w", "b", "r"], g, gr, gl):
        assert_within_rule(f"d{name}", a, c, lo)
