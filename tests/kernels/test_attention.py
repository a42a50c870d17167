"""Triton fused attention vs the PyTorch reference: forward and every gradient (q, k, v, bias).

Runs on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), with
shapes small enough to stay fast but spanning several 16×16 tiles, so that block edges, the online softmax across
key blocks and the causal loop bounds are all exercised. On a GPU the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch

from ofa_ds.kernels import attention, attention_ref
from ofa_ds.kernels.attention import triton_attention

from ._tolerance import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOWP = [torch.float16, torch.bfloat16]
ALL = [torch.float32, *LOWP]


def _inputs(B, H, Lq, Lk, D, dtype, bias_shape, transposed=False):
    """Random q, k, v, bias, dO rounded to `dtype` (bias in `dtype` too, as the model keeps it)."""
    q = torch.randn(B, H, Lq, D, device=DEVICE)
    k = torch.randn(B, H, Lk, D, device=DEVICE)
    v = torch.randn(B, H, Lk, D, device=DEVICE)
    if transposed:  # the model's layout: [B, L, H, D] viewed as [B, H, L, D] (non-contiguous)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    bias = 2 * torch.randn(bias_shape, device=DEVICE) if bias_shape is not None else None
    do = torch.randn(B, H, Lq, D, device=DEVICE)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(q), cast(k), cast(v), cast(bias), cast(do)


def _run(fn, q, k, v, bias, do, upcast=False, **kw):
    """Forward and backward of `fn` on fresh leaves; returns (out, {name: grad})."""
    leaves = {n: t.detach().clone().float() if upcast else t.detach().clone() for n, t in
              (("q", q), ("k", k), ("v", v), ("bias", bias)) if t is not None}
    for t in leaves.values():
        t.requires_grad_(True)
    out = fn(leaves["q"], leaves["k"], leaves["v"], bias=leaves.get("bias"), **kw)
    out.backward(do.float() if upcast else do)
    return out.detach(), {n: t.grad for n, t in leaves.items()}


def check(B=2, H=2, Lq=19, Lk=23, D=32, dtype=torch.float16, bias_shape="full", kpm=None, causal=False,
          scale=None, transposed=False):
    """Compare kernel, low-precision torch and fp32 reference on one case; returns the kernel's (out, grads)."""
    if bias_shape == "full":
        bias_shape = (B, H, Lq, Lk)
    q, k, v, bias, do = _inputs(B, H, Lq, Lk, D, dtype, bias_shape, transposed)
    kw = dict(key_padding_mask=kpm, causal=causal, scale=scale)
    out, grads = _run(triton_attention, q, k, v, bias, do, **kw)
    ref32 = lambda *a, **b: attention_ref(*a, upcast=True, **b)  # noqa: E731
    ref, ref_grads = _run(ref32, q, k, v, bias, do, upcast=True, **kw)
    lowp, lowp_grads = (None, {}) if dtype == torch.float32 else _run(attention_ref, q, k, v, bias, do, **kw)
    assert out.dtype == dtype
    assert_within_rule("out", out, ref, lowp)
    for name in grads:
        assert grads[name].dtype == dtype and grads[name].shape == ref_grads[name].shape
        assert_within_rule(f"d{name}", grads[name], ref_grads[name], lowp_grads.get(name))
    return out, grads


@pytest.mark.parametrize("dtype", ALL)
def test_bias_odd_lengths(dtype):
    check(Lq=19, Lk=23, D=32, dtype=dtype)


@pytest.mark.parametrize("dtype", ALL)
def test_self_attention_no_bias(dtype):
    check(B=1, Lq=33, Lk=33, D=64, dtype=dtype, bias_shape=None)


@pytest.mark.parametrize("D", [32, 64, 80, 128])
def test_head_dims(D):
    check(B=1, H=2, Lq=17, Lk=21, D=D, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", ALL)
def test_d80_causal_padding_batch_broadcast_bias(dtype):
    """OFA-Huge's head dim, a [1, H, L, L] bias shared by the batch, padding and causal masks together."""
    B, L = 3, 21
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[1, -5:] = True
    kpm[2, :4] = True          # left padding: with the causal mask, queries 0..3 of sample 2 see no key at all
    out, grads = check(B=B, H=2, Lq=L, Lk=L, D=80, dtype=dtype, bias_shape=(1, 2, L, L), kpm=kpm, causal=True,
                       scale=(2 * 80) ** -0.5)
    assert torch.equal(out[2, :, :4], torch.zeros_like(out[2, :, :4]))     # fully masked rows: exactly 0
    assert torch.equal(grads["q"][2, :, :4], torch.zeros_like(grads["q"][2, :, :4]))
    assert grads["k"][2, :, :4].abs().max() == 0 and grads["v"][2, :, :4].abs().max() == 0   # padded keys


def test_fully_padded_sample():
    """A sample whose keys are all padding: its output and its gradients are 0, the other sample is unaffected."""
    kpm = torch.zeros(2, 18, dtype=torch.bool, device=DEVICE)
    kpm[0] = True
    out, grads = check(B=2, H=2, Lq=13, Lk=18, D=32, dtype=torch.float32, kpm=kpm)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for name in ("q", "k", "v", "bias"):
        assert grads[name][0].abs().max() == 0, name
    assert out[1].abs().max() > 0


@pytest.mark.parametrize("Lq,Lk", [(7, 30), (30, 7), (1, 37)])
def test_causal_bottom_right_cross_lengths(Lq, Lk):
    """Causal with Lq != Lk (incremental decoding: Lq < Lk; Lq > Lk leaves the first rows fully masked)."""
    check(B=1, H=2, Lq=Lq, Lk=Lk, D=32, dtype=torch.float32, causal=True)


@pytest.mark.parametrize("bias_shape", [(2, 1, 11, 20), (11, 20), (2, 1, 1, 20), (1, 1, 11, 1)])
def test_bias_broadcast_shapes(bias_shape):
    check(B=2, H=3, Lq=11, Lk=20, D=32, dtype=torch.float32, bias_shape=bias_shape)


def test_non_contiguous_inputs():
    check(B=2, H=3, Lq=20, Lk=20, D=64, dtype=torch.float16, transposed=True)


def test_bias_without_grad_and_default_scale():
    q, k, v, bias, do = _inputs(1, 2, 17, 17, 32, torch.float32, (1, 2, 17, 17))
    out = triton_attention(q, k, v, bias=bias)               # bias.requires_grad is False: no dBias pass
    ref = attention_ref(q, k, v, bias=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_deterministic(dtype):
    q, k, v, bias, do = _inputs(2, 2, 35, 35, 32, dtype, (1, 2, 35, 35))
    kpm = torch.zeros(2, 35, dtype=torch.bool, device=DEVICE)
    kpm[1, -6:] = True
    runs = [_run(triton_attention, q, k, v, bias, do, key_padding_mask=kpm, causal=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


def test_kernel_submodule_import_keeps_the_entry_point():
    """`import ofa_ds.kernels.attention` must not replace the function ofa_ds.kernels.attention by the module."""
    import ofa_ds.kernels
    import ofa_ds.kernels.attention  # noqa: F401
    import ofa_ds.kernels.layernorm  # noqa: F401
    assert callable(ofa_ds.kernels.attention) and callable(ofa_ds.kernels.layer_norm)


def test_dispatcher_backends():
    q, k, v, bias, do = _inputs(1, 2, 9, 9, 32, torch.float32, (1, 2, 9, 9))
    via_triton = attention(q, k, v, bias=bias, causal=True, backend="triton")
    via_torch = attention(q, k, v, bias=bias, causal=True, backend="torch")
    torch.testing.assert_close(via_triton, via_torch, atol=1e-5, rtol=1e-5)
    assert torch.equal(via_triton, triton_attention(q, k, v, bias=bias, causal=True))


def test_rejects_unsupported_inputs():
    q = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError):
        triton_attention(q, q, q)                              # head dim > 128
    q = torch.randn(1, 1, 4, 32, device=DEVICE)
    with pytest.raises(TypeError):
        triton_attention(q, q.half(), q)                        # mixed dtypes
    with pytest.raises(RuntimeError):
        triton_attention(q, q, q, bias=torch.zeros(2, 1, 4, 4, device=DEVICE))   # not broadcastable
    with pytest.raises(ValueError):
        triton_attention(q, q, q, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_shape", [(2, 2, 21, 26), (1, 2, 21, 26)])
def test_dq_from_stored_ds_matches_recomputed_dq(dtype, bias_shape):
    """With a bias gradient, dQ is computed from the stored dS; without, by recomputation: bitwise the same."""
    q, k, v, bias, do = _inputs(2, 2, 21, 26, 32, dtype, bias_shape)
    kpm = torch.zeros(2, 26, dtype=torch.bool, device=DEVICE)
    kpm[0, -4:] = True
    dqs = []
    for bias_grad in (True, False):
        qq = q.detach().clone().requires_grad_(True)
        bb = bias.detach().clone().requires_grad_(bias_grad)
        triton_attention(qq, k, v, bias=bb, key_padding_mask=kpm, causal=True).backward(do)
        dqs.append(qq.grad)
    assert torch.equal(dqs[0], dqs[1])
