"""Typed configuration for ofa_ds.

`ModelConfig` describes one OFA network; `PRESETS` holds the five released sizes (ofa-reference.md §1) with the
NormFormer extras switched on, as in every released checkpoint (`--scale-attn --scale-fc --scale-heads`).
Configs are plain dataclasses that round-trip through JSON (`to_json` / `from_json`); unknown keys are an error
that names them, so a typo in a config file never silently falls back to a default.

Training-side configs (data, train, run) live below `ModelConfig` in this file and follow the same rules.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

KernelBackend = Literal["torch", "triton", "auto"]


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")


@dataclass
class ModelConfig:
    """One OFA network. Defaults are OFA-Tiny; use `PRESETS[name]` for the released sizes."""

    name: str = "tiny"
    """Preset name (informational; 'custom' when built by hand)."""
    vocab_size: int = 59457
    """Rows of the shared token table: 4 specials + 50260 BPE + <mask> + 8192 codes + 1000 bins (EN); 30325 for CN."""
    d_model: int = 256
    """Hidden width C of encoder and decoder (decoder dims always equal encoder dims in OFA)."""
    ffn_dim: int = 1024
    """Inner width F of the feed-forward blocks."""
    num_heads: int = 4
    """Attention heads H; head_dim = d_model / num_heads (80 for Huge)."""
    encoder_layers: int = 4
    """Number of encoder layers."""
    decoder_layers: int = 4
    """Number of decoder layers."""
    resnet_layers: tuple[int, int, int] = (3, 4, 6)
    """Bottleneck blocks in the three ResNet stages used: [3,4,6] 'resnet50', [3,4,23] 'resnet101', [3,8,36] 'resnet152'."""
    max_source_positions: int = 1024
    """Text positions of the encoder (the position table has this + 2 rows)."""
    max_target_positions: int = 1024
    """Text positions of the decoder (the position table has this + 2 rows)."""
    token_bucket_size: int = 256
    """1-D relative-position bucket size (table rows = 2*size - 1)."""
    image_bucket_size: int = 42
    """Side of the 2-D image position raster (42x42 ids; table rows = (2*size-1)^2 + 3)."""
    attn_scale_factor: float = 2.0
    """Attention logits are scaled by (head_dim * attn_scale_factor) ** -0.5 (OFA: 1/sqrt(2d))."""
    code_image_size: int = 128
    """Image side whose VQGAN codes (f=8) the decoder generates; sets the decoder image_position_idx length."""
    num_bins: int = 1000
    """Location bins <bin_0..num_bins-1> at the end of the vocabulary."""
    code_dict_size: int = 8192
    """Image-code tokens <code_0..> before the bins."""
    scale_attn: bool = True
    """NormFormer: LayerNorm after self/cross attention (attn_ln, self_attn_ln, cross_attn_ln)."""
    scale_fc: bool = True
    """NormFormer: LayerNorm inside the FFN (ffn_layernorm)."""
    scale_heads: bool = True
    """NormFormer: one learnable scale per head on the attention output (c_attn)."""
    frozen_bn: bool = False
    """Use FrozenBatchNorm2d in the ResNet (OFA's --freeze-resnet); plain BatchNorm2d otherwise."""
    dropout: float = 0.0
    """Residual/embedding dropout (OFA scripts use 0.1 when training)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the FFN activation."""
    encoder_drop_path_rate: float = 0.0
    """Maximum drop-path rate of the encoder (linear over layers from 0)."""
    decoder_drop_path_rate: float = 0.0
    """Maximum drop-path rate of the decoder (linear over layers from 0)."""
    resnet_drop_path_rate: float = 0.0
    """Maximum drop-path rate inside ResNet stages."""
    kernel_backend: KernelBackend = "torch"
    """Attention/LayerNorm implementation: 'torch', 'triton', or 'auto' (Triton on CUDA with compute capability >= 8)."""

    def __post_init__(self) -> None:
        self.resnet_layers = tuple(self.resnet_layers)  # JSON gives a list
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.kernel_backend not in ("torch", "triton", "auto"):
            raise ValueError(f"kernel_backend must be 'torch', 'triton' or 'auto', got {self.kernel_backend!r}")
        if len(self.resnet_layers) != 3:
            raise ValueError(f"resnet_layers needs three stage depths, got {self.resnet_layers}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "ModelConfig") -> "ModelConfig":
        _check_keys(cls, data, where)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, where: str = "ModelConfig") -> "ModelConfig":
        return cls.from_dict(json.loads(text), where)


def _preset(name: str, d: int, f: int, h: int, enc: int, dec: int, resnet: tuple[int, int, int]) -> ModelConfig:
    return ModelConfig(name=name, d_model=d, ffn_dim=f, num_heads=h, encoder_layers=enc, decoder_layers=dec,
                       resnet_layers=resnet)


PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset("tiny", 256, 1024, 4, 4, 4, (3, 4, 6)),
    "medium": _preset("medium", 512, 2048, 8, 4, 4, (3, 4, 23)),
    "base": _preset("base", 768, 3072, 12, 6, 6, (3, 4, 23)),
    "large": _preset("large", 1024, 4096, 16, 12, 12, (3, 8, 36)),
    "huge": _preset("huge", 1280, 5120, 16, 24, 12, (3, 8, 36)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of a preset with optional field overrides (`preset("base", dropout=0.1)`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
