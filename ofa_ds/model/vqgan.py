"""OFA's image decoder for text-to-image: the decode path of taming-transformers' GumbelVQ (f = 8, 8,192 codes) in
plain PyTorch, with the official checkpoint's parameter names (docs/ofa.md#text-to-image-decoding).

What is unusual, and what this file does about it:
  * Only the decode path is built: codebook lookup (`quantize.embed`), `post_quant_conv`, `decoder`. The
    encoder-side entries of the official file (`encoder.*`, `quant_conv.*`, `quantize.proj.*`) are accepted and
    dropped; any other key the model lacks, any key it misses and any shape difference is an error naming it.
  * The official file (`vqgan/last.ckpt`) is a PyTorch Lightning checkpoint: the weights sit under "state_dict", and
    Lightning keys its "callbacks" entry by the callback *class*. It is read with the restricted unpickler of
    `ofa_ds.checkpoint`; the few Lightning callback classes such files name (`LIGHTNING_CALLBACK_CLASSES`) read as
    an inert placeholder class, every other global is refused before anything from the file runs.
  * The configuration is not in the checkpoint (OFA ships it as a separate model.yaml). `VQGANConfig()` holds the
    public taming "vq-gumbel-f8-8192" values; loading derives every value the tensors' shapes determine (codebook,
    channels per level, blocks per level, attention levels) and refuses a file that disagrees, naming the field.
  * `up[i]` is resolution level i (`up.0` is the full-resolution level) although the decoder runs them from the
    lowest resolution up; attention blocks sit at the levels whose resolution is in `attn_resolutions`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LIGHTNING_CALLBACK_CLASSES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                              "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
                              "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor")
ENCODER_SIDE_PREFIXES = ("encoder.", "quant_conv.", "quantize.proj.")


@dataclass
class VQGANConfig:
    """The GumbelVQ decode path's hyperparameters (taming's `ddconfig` plus the codebook)."""

    n_embed: int = 8192
    """Codebook entries (OFA's <code_0> … <code_8191>)."""
    embed_dim: int = 256
    """Width of a codebook vector."""
    z_channels: int = 256
    """Latent channels after post_quant_conv (the decoder's input)."""
    ch: int = 128
    """Base channel count; level i has ch · ch_mult[i] channels."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    """Channel multiplier per resolution level; len(ch_mult) − 1 doublings give the factor f = 8."""
    num_res_blocks: int = 2
    """The decoder has num_res_blocks + 1 ResnetBlocks per level."""
    attn_resolutions: tuple[int, ...] = (32,)
    """Feature-map sides at which every ResnetBlock is followed by an AttnBlock (plus the middle one, always)."""
    resolution: int = 256
    """Image side the model was built for: places the attention levels (level i runs at resolution / 2**i)."""
    out_ch: int = 3
    """Output image channels."""

    @property
    def factor(self) -> int:
        """Pixels per code along each side (8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def attn_levels(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.ch_mult)) if self.resolution // 2 ** i in self.attn_resolutions)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))            # dropout 0 (and the decoder only runs in eval)
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions of a feature map, 1×1 convs as projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)                              # softmax(q kᵀ / √c) v
        return x + self.proj_out(o.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming's Decoder without timestep embedding: conv_in, mid (block, attention, block), the up levels from
    the lowest resolution (each: ResnetBlocks, optional AttnBlocks, nearest ×2 + conv except at level 0),
    GroupNorm, swish, conv_out."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        ups: list[nn.Module] = []
        attn_levels = cfg.attn_levels()
        for i in reversed(range(levels)):
            level = nn.Module()
            cout = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, cout))
                c = cout
                if i in attn_levels:
                    level.attn.append(AttnBlock(c))
            if i != 0:
                level.upsample = Upsample(c)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """Code grid [B, h, w] (ids 0 … n_embed−1) → image [B, 3, 8h, 8w] in about [−1, 1]."""

    def __init__(self, cfg: Optional[VQGANConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or VQGANConfig()
        self.quantize = nn.Module()
        self.quantize.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @torch.no_grad()
    def forward(self, codes: Tensor) -> Tensor:
        if codes.dim() != 3:
            raise ValueError(f"expected a code grid [batch, h, w], got shape {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.cfg.n_embed:
            raise ValueError(f"image codes must lie in [0, {self.cfg.n_embed}), got values in [{lo}, {hi}]")
        z = self.quantize.embed(codes.to(self.quantize.embed.weight.device)).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))


def to_pil(images: Tensor) -> list:
    """OFA's `custom_to_pil`: clamp to [−1, 1], (x + 1) / 2 · 255 truncated to uint8, RGB PIL images."""
    from PIL import Image
    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((255 * a).astype(np.uint8), "RGB") for a in x]


def random_vqgan(cfg: Optional[VQGANConfig] = None, seed: int = 0) -> VQGANDecoder:
    """A VQGANDecoder with seeded random weights (tests and smoke runs; no file needed). Conv weights are drawn with
    He scaling and GroupNorm affines near 1 so that activations stay in range through the whole decoder."""
    m = VQGANDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.dim() == 4:
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(1.0 / (p.shape[1] * p.shape[2] * p.shape[3])))
            elif p.dim() == 1:                                                    # GroupNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:                                                                 # the codebook
                p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


# ---- the official file ---------------------------------------------------------------------------------------------
class LightningCallbackKey:
    """Stands in for a PyTorch Lightning callback class that a checkpoint names as a dict key; it has no behaviour."""


def read_vqgan_state(path: str) -> dict[str, Tensor]:
    """The decoder-side tensors of a VQGAN file: a Lightning checkpoint ({"state_dict": …}) or a bare state dict,
    unpickled with the restricted unpickler (only tensors, containers, numpy scalars and the inert stand-ins for
    Lightning's callback classes)."""
    from ofa_ds.checkpoint import CheckpointError, unpickle_restricted
    obj = unpickle_restricted(path, [(LightningCallbackKey, n) for n in LIGHTNING_CALLBACK_CLASSES])
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a VQGAN checkpoint (a dict with 'state_dict' of tensors), "
                              f"found {found}")
    return dict(state)


def config_from_state(state: dict[str, Tensor], where: str) -> dict[str, Any]:
    """What the tensors' shapes say about the config: n_embed, embed_dim, z_channels, channels per level
    (ch · ch_mult), num_res_blocks, attention levels, out_ch."""
    from ofa_ds.checkpoint import CheckpointError

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{where}: missing {key}, which a GumbelVQ decoder has")
        return tuple(state[key].shape)

    n_embed, embed_dim = shape("quantize.embed.weight")
    levels = sorted({int(m.group(1)) for k in state for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{where}: decoder.up levels {levels} are not 0 … n−1")
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"decoder\.up\.0\.block\.(\d+)\.", k)] if m}
    return {"n_embed": n_embed, "embed_dim": embed_dim, "z_channels": shape("post_quant_conv.weight")[0],
            "level_channels": tuple(shape(f"decoder.up.{i}.block.0.conv1.weight")[0] for i in levels),
            "num_res_blocks": len(blocks) - 1,
            "attn_levels": tuple(i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in state),
            "out_ch": shape("decoder.conv_out.weight")[0]}


def load_vqgan_state(model: VQGANDecoder, state: dict[str, Tensor], where: str) -> None:
    """Check the config against the file's shapes, then load every decoder key strictly (encoder-side keys are
    dropped; anything else unknown, missing or mis-shaped is an error naming it)."""
    from ofa_ds.checkpoint import CheckpointError
    cfg = model.cfg
    found = config_from_state(state, where)
    expected = {"n_embed": cfg.n_embed, "embed_dim": cfg.embed_dim, "z_channels": cfg.z_channels,
                "level_channels": tuple(cfg.ch * m for m in cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
                "attn_levels": cfg.attn_levels(), "out_ch": cfg.out_ch}
    bad = [f"{k}: config {expected[k]}, file {found[k]}" for k in expected if expected[k] != found[k]]
    if bad:
        raise CheckpointError(f"{where}: the VQGAN config does not match the file ({'; '.join(bad)}); "
                              f"level_channels = ch · ch_mult, attn_levels = levels i with resolution / 2**i in "
                              f"attn_resolutions")
    own = model.state_dict()
    dec = {k: v for k, v in state.items() if not k.startswith(ENCODER_SIDE_PREFIXES) and not k.startswith("loss.")}
    missing = sorted(set(own) - set(dec))
    unexpected = sorted(set(dec) - set(own))
    shapes = [f"{k}: file {tuple(dec[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in dec and dec[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what}: {v[:20]}" for what, v in
                 (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes)) if v]
        raise CheckpointError(f"{where}: state dict does not match the VQGAN decoder; " + "; ".join(parts))
    model.load_state_dict({k: dec[k] for k in own}, strict=True)


def load_vqgan(path: str, device: Any = "cpu", cfg: Optional[VQGANConfig] = None) -> VQGANDecoder:
    """The official VQGAN file (OFA's `vqgan/last.ckpt`) → a frozen VQGANDecoder in eval mode on `device`.
    `cfg` defaults to the public gumbel-f8-8192 values and is checked against the file's shapes."""
    path = os.fspath(path)
    model = VQGANDecoder(dataclasses.replace(cfg) if cfg is not None else None)
    load_vqgan_state(model, read_vqgan_state(path), path)
    model.requires_grad_(False)
    return model.to(device).eval()
