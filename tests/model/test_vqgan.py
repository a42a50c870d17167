"""The VQGAN decoder (text-to-image): equality with an independent float64 derivation of taming-transformers'
GumbelVQ decode path (and with taming's own Decoder when that package is installed), the official key layout at
OFA's configuration, strict and safe loading of a Lightning-style checkpoint, and OFA's pixel conversion."""
import collections
import dataclasses
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ofa_ds.checkpoint import CheckpointError
from ofa_ds.model.vqgan import (LIGHTNING_CALLBACK_CLASSES, VQGANConfig, VQGANDecoder, load_vqgan, random_vqgan,
                                to_pil)

# Small but complete: a channel change (nin_shortcut), attention inside a level, upsampling, the middle block.
SMALL = VQGANConfig(n_embed=64, embed_dim=16, z_channels=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), resolution=16)


# ---- independent float64 derivation of taming's decode path ---------------------------------------------------------
def _gn(x, sd, name):
    b, c, h, w = x.shape
    g = x.reshape(b, 32, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return g.reshape(b, c, h, w) * sd[name + ".weight"][None, :, None, None] + sd[name + ".bias"][None, :, None, None]


def _conv(x, sd, name):
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd[name + ".bias"], padding=w.shape[-1] // 2)


def _swish(x):
    return x / (1 + torch.exp(-x))


def _resblock(x, sd, name):
    h = _conv(_swish(_gn(x, sd, name + ".norm1")), sd, name + ".conv1")
    h = _conv(_swish(_gn(h, sd, name + ".norm2")), sd, name + ".conv2")
    skip = _conv(x, sd, name + ".nin_shortcut") if name + ".nin_shortcut.weight" in sd else x
    return skip + h


def _attn(x, sd, name):
    b, c, h, w = x.shape
    n = _gn(x, sd, name + ".norm")
    q, k, v = (_conv(n, sd, f"{name}.{p}").reshape(b, c, h * w) for p in "qkv")
    a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c ** 0.5, dim=-1)    # [query i, key j]
    o = torch.einsum("bij,bcj->bci", a, v).reshape(b, c, h, w)
    return x + _conv(o, sd, name + ".proj_out")


def reference_decode(sd, codes, cfg):
    z = sd["quantize.embed.weight"][codes].permute(0, 3, 1, 2)                  # one-hot @ codebook
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _resblock(h, sd, "decoder.mid.block_1")
    h = _attn(h, sd, "decoder.mid.attn_1")
    h = _resblock(h, sd, "decoder.mid.block_2")
    for i in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = _resblock(h, sd, f"decoder.up.{i}.block.{j}")
            if cfg.resolution // 2 ** i in cfg.attn_resolutions:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}")
        if i:
            h = _conv(h.repeat_interleave(2, -1).repeat_interleave(2, -2), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(_swish(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def test_decoder_equals_float64_derivation():
    m = random_vqgan(SMALL, seed=1)
    codes = torch.randint(0, SMALL.n_embed, (2, 5, 6), generator=torch.Generator().manual_seed(0))
    out = m(codes)
    assert out.shape == (2, 3, 20, 24) and out.dtype == torch.float32
    ref = reference_decode({k: v.double() for k, v in m.state_dict().items()}, codes, SMALL)
    assert ref.abs().max() > 0.1                                            # not a vanishing signal
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_decoder_equals_taming_when_installed():
    try:
        from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
    except Exception as e:
        pytest.skip(f"taming-transformers is not installed ({type(e).__name__}); the float64 derivation covers it")
    cfg = SMALL
    ours = random_vqgan(cfg, seed=2)
    theirs = TamingDecoder(ch=cfg.ch, out_ch=cfg.out_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                           attn_resolutions=cfg.attn_resolutions, dropout=0.0, in_channels=3,
                           resolution=cfg.resolution, z_channels=cfg.z_channels).eval()
    sd = {k[len("decoder."):]: v for k, v in ours.state_dict().items() if k.startswith("decoder.")}
    theirs.load_state_dict(sd, strict=True)                                  # same names, same shapes
    codes = torch.randint(0, cfg.n_embed, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    z = ours.post_quant_conv(F.embedding(codes, ours.quantize.embed.weight).permute(0, 3, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(ours(codes), theirs(z), atol=1e-5, rtol=0)


def test_official_layout_at_ofa_config():
    """OFA's gumbel-f8-8192 decoder: the parameter names and shapes of the official checkpoint."""
    shapes = {k: tuple(v.shape) for k, v in VQGANDecoder().state_dict().items()}
    assert shapes["quantize.embed.weight"] == (8192, 256)
    assert shapes["post_quant_conv.weight"] == (256, 256, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert {k for k in shapes if ".attn." in k} == {f"decoder.up.3.attn.{j}.{p}.{t}" for j in range(3)
                                                     for p in ("norm", "q", "k", "v", "proj_out")
                                                     for t in ("weight", "bias")}
    assert {k.rsplit(".", 2)[0] for k in shapes if "nin_shortcut" in k} == {"decoder.up.2.block.0",
                                                                            "decoder.up.1.block.0"}
    assert shapes["decoder.up.2.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert {k.split(".")[2] for k in shapes if ".upsample." in k} == {"1", "2", "3"}
    assert all(f"decoder.up.{i}.block.{j}.conv2.weight" in shapes for i in range(4) for j in range(3))
    assert shapes["decoder.norm_out.weight"] == (128,) and shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert VQGANConfig().factor == 8


def _lightning_file(path, state, extra=()):
    """A file laid out like taming's Lightning checkpoints: callbacks keyed by the callback class."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
        sys.modules[names[-1]].ModelCheckpoint = cls
        assert f"{names[-1]}.ModelCheckpoint" in LIGHTNING_CALLBACK_CLASSES
        torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                    "callbacks": {cls: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.9)}]}],
                    "lr_schedulers": [], "state_dict": collections.OrderedDict(state), **dict(extra)}, path)
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


def _with_encoder_side(state):
    s = dict(state)
    s["encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    s["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    s["quantize.proj.weight"] = torch.zeros(64, 32, 1, 1)
    return s


def test_loads_lightning_checkpoint_strictly(tmp_path):
    src = random_vqgan(SMALL, seed=4)
    path = str(tmp_path / "last.ckpt")
    _lightning_file(path, _with_encoder_side(src.state_dict()))
    m = load_vqgan(path, cfg=SMALL)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    codes = torch.randint(0, 64, (1, 3, 3))
    assert torch.equal(m(codes), src(codes))


def test_refusals(tmp_path):
    src = random_vqgan(SMALL, seed=4).state_dict()
    # a config the file does not match: named field by field
    path = str(tmp_path / "a.ckpt")
    _lightning_file(path, src)
    with pytest.raises(CheckpointError, match=r"n_embed: config 128, file 64\)"):
        load_vqgan(path, cfg=dataclasses.replace(SMALL, n_embed=128))
    with pytest.raises(CheckpointError, match=r"level_channels: config \(32, 64, 128\), file \(32, 32, 64\)"):
        load_vqgan(path, cfg=dataclasses.replace(SMALL, ch_mult=(1, 2, 4)))
    with pytest.raises(CheckpointError, match="attn_levels"):
        load_vqgan(path, cfg=dataclasses.replace(SMALL, attn_resolutions=(8,)))
    # an unknown key and a missing key
    bad = dict(src, **{"decoder.extra.weight": torch.zeros(1)})
    del bad["decoder.up.0.block.1.conv2.bias"]
    _lightning_file(path, bad)
    with pytest.raises(CheckpointError, match=r"missing key.*conv2\.bias.*unexpected key.*decoder\.extra\.weight"):
        load_vqgan(path, cfg=SMALL)


class _Hparams:
    """A harmless class, but not on the allow-list: refused all the same."""


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_arbitrary_pickled_objects(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle.*system"):
        load_vqgan(path, cfg=SMALL)
    torch.save({"state_dict": random_vqgan(SMALL).state_dict(), "hparams": _Hparams()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle .*_Hparams"):
        load_vqgan(path, cfg=SMALL)


def test_to_pil_is_ofas_conversion():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    (im,) = to_pil(x)
    assert im.mode == "RGB" and im.size == (7, 1)
    # clamp, (x + 1) / 2 · 255, truncation to uint8
    assert np.asarray(im)[0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]
