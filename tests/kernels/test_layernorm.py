"""Triton LayerNorm (+ residual) vs the PyTorch reference: output, the returned sum, and dx, dweight, dbias,
dresidual. Runs under the Triton interpreter on CPU (see tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ofa_ds.kernels import layer_norm, layer_norm_ref
from ofa_ds.kernels.layernorm import triton_layer_norm

from ._tolerance import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = [torch.float32, torch.float16, torch.bfloat16]


def _leaves(tensors, dtype=None):
    out = {}
    for name, t in tensors.items():
        if t is not None:
            out[name] = (t.float() if dtype == torch.float32 else t).detach().clone().requires_grad_(True)
    return out


def _torch_lowp(x, weight, bias, eps, residual=None):
    """What PyTorch computes in the low precision itself: a separate add, then F.layer_norm."""
    s = x if residual is None else x + residual
    cast = lambda p: p.to(s.dtype) if p is not None and s.dtype == torch.float32 else p  # noqa: E731  (CPU rule)
    y = F.layer_norm(s, (s.shape[-1],), cast(weight), cast(bias), eps).to(x.dtype)
    return y if residual is None else (y, s)


def _ref32(x, weight, bias, eps, residual=None):
    return layer_norm_ref(x, weight, bias, eps, residual=residual, upcast=True)


def _run(fn, inputs, dy, ds, eps, upcast=False):
    leaves = _leaves(inputs, torch.float32 if upcast else None)
    out = fn(leaves["x"], leaves.get("weight"), leaves.get("bias"), eps, residual=leaves.get("residual"))
    outs = out if isinstance(out, tuple) else (out,)
    grads_in = (dy, ds)[:len(outs)]
    torch.autograd.backward(outs, [g.float() if upcast else g for g in grads_in])
    return [o.detach() for o in outs], {n: t.grad for n, t in leaves.items()}


def check(shape, dtype, residual=False, weight=True, bias=True, param_dtype=None, eps=1e-5, res_dtype=None):
    n = shape[-1]
    param_dtype = param_dtype or dtype
    inputs = {
        "x": (3 * torch.randn(shape, device=DEVICE) + 1).to(dtype),
        "weight": (1 + 0.5 * torch.randn(n, device=DEVICE)).to(param_dtype) if weight else None,
        "bias": (0.5 * torch.randn(n, device=DEVICE)).to(param_dtype) if bias else None,
        "residual": torch.randn(shape, device=DEVICE).to(res_dtype or dtype) if residual else None,
    }
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ds = torch.randn(shape, device=DEVICE).to(dtype)
    outs, grads = _run(triton_layer_norm, inputs, dy, ds, eps)
    refs, ref_grads = _run(_ref32, inputs, dy, ds, eps, upcast=True)
    lows, low_grads = (None, {}) if dtype == torch.float32 else _run(_torch_lowp, inputs, dy, ds, eps)
    assert outs[0].dtype == dtype
    assert_within_rule("y", outs[0], refs[0], lows[0] if lows else None)
    if residual:
        assert torch.equal(outs[1], inputs["x"] + inputs["residual"])   # the sum is rounded exactly as torch's
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype, name
        assert_within_rule(f"d{name}", g, ref_grads[name], low_grads.get(name), compute_dtype=dtype)
    return outs, grads


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_odd_width(dtype, residual):
    check((2, 5, 37), dtype, residual=residual)


@pytest.mark.parametrize("n", [256, 1024, 1280, 5120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_ofa_widths(n, dtype):
    """OFA's widths: 256 (Tiny) ... 1280 (Huge) and the 5120-wide FFN LayerNorm of OFA-Huge (NormFormer)."""
    check((9, n), dtype, residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_without_affine(dtype):
    check((6, 48), dtype, weight=False, bias=False)
    check((6, 48), dtype, bias=False)


def test_layer_norm_fp32_params_bf16_input():
    check((7, 64), torch.bfloat16, residual=True, param_dtype=torch.float32)


def test_layer_norm_fp32_residual_stream_bf16_input():
    """A residual of another dtype: the sum is promoted as torch promotes it, dresidual comes back in its dtype."""
    check((5, 72), torch.bfloat16, residual=True, res_dtype=torch.float32)


def test_layer_norm_rows_exceed_programs_and_constant_rows():
    """More rows than backward programs (partial sums accumulate several rows); a constant row (variance 0)."""
    x = torch.randn(23, 40, device=DEVICE)
    x[3] = 2.5
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    xt = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y = triton_layer_norm(xt, w, b, 1e-5)
    y.backward(torch.ones_like(y))
    gw, gb = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    yr = F.layer_norm(xr, (40,), w, b, 1e-5)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xt.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_backward_is_deterministic(dtype):
    rnd = lambda *shape: torch.randn(*shape, device=DEVICE).to(dtype)  # noqa: E731
    inputs = {"x": rnd(31, 96), "weight": rnd(96), "bias": rnd(96), "residual": rnd(31, 96)}
    dy, ds = torch.randn(31, 96, device=DEVICE).to(dtype), torch.randn(31, 96, device=DEVICE).to(dtype)
    a = _run(triton_layer_norm, inputs, dy, ds, 1e-5)
    b = _run(triton_layer_norm, inputs, dy, ds, 1e-5)
    for o1, o2 in zip(a[0], b[0]):
        assert torch.equal(o1, o2)
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def test_layer_norm_dispatcher():
    x = torch.randn(4, 3, 32, device=DEVICE)
    r = torch.randn(4, 3, 32, device=DEVICE)
    w, b = torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)
    y_t, s_t = layer_norm(x, w, b, 1e-6, residual=r, backend="triton")
    y_r, s_r = layer_norm(x, w, b, 1e-6, residual=r, backend="torch")
    torch.testing.assert_close(y_t, y_r, atol=1e-5, rtol=1e-5)
    assert torch.equal(s_t, s_r)
    torch.testing.assert_close(layer_norm(x, w, b, backend="triton"), layer_norm(x, w, b, backend="torch"),
                               atol=1e-5, rtol=1e-5)


def test_layer_norm_rejects_bad_inputs():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError):
        triton_layer_norm(x, torch.ones(7, device=DEVICE), None)
    with pytest.raises(ValueError):
        triton_layer_norm(x, None, None, residual=torch.randn(2, 9, device=DEVICE))
    with pytest.raises(ValueError):
        triton_layer_norm(torch.randn(1, 20000, device=DEVICE), None, None)
