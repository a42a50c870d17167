"""Prompt tuning (OFA-prompt): per-layer prefix keys and values for the encoder and/or decoder self-attention.

What is unusual compared with "soft prompt" tokens:
  * The prompts are not tokens of the input sequence. Each layer gets its own P keys and P values, prepended to that
    layer's self-attention keys/values only (`MultiheadAttention(..., prompt_kv=...)`): they never pass an FFN, never
    produce an output row and never enter cross-attention. The encoder output has no prompt positions.
  * The prompt columns get no position bias (zeros are prepended to the attention bias) and are never padding; in
    the decoder every target position sees every prompt (the causal mask is bottom-right aligned, so a prefix of P
    extra keys is visible to all rows). During incremental decoding the cache holds the real keys only and the
    prompts are prepended again at every step.
  * One `PromptEncoder` per side, with OFA's parameter names: `encoder.encoder_prompt_encoder.embedding.weight`
    [P, L·2·C] without projection; with projection `embedding.weight` [P, C] and an MLP `trans.0` (Linear C→dim),
    ReLU, `trans.2` (Linear dim→L·2·C). The flat L·2·C vector of prompt position p holds, for layer l, the key
    (kv=0) then the value (kv=1), head-major: offset ((l·2 + kv)·H + h)·d + j. Dropout (0.2 in OFA) is drawn per
    sample on the prompt keys/values.
  * The prompt parameters can live on their own in a small safetensors file (`save_prompts` / `load_prompts`), with
    the shape facts in its metadata, and can be merged into a prompt-free model (`attach_prompts`).
Facts: docs/ofa.md#prompt-tuning; the training side (freezing, saving during a run): docs/training.md#prompt-tuning.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofa_ds.config import ModelConfig, PromptTuningConfig

SIDES = ("encoder", "decoder")
PROMPT_FILE = "prompts.safetensors"
"""The file name a prompt-tuning run writes its prompts to (run folder and final/)."""


def prompt_key(side: str) -> str:
    """The official attribute name of a side's prompt encoder: 'encoder_prompt_encoder' / 'decoder_prompt_encoder'."""
    return f"{side}_prompt_encoder"


def is_prompt_param(name: str) -> bool:
    """Whether a parameter/state-dict name belongs to a prompt encoder (`*_prompt_encoder.*`)."""
    return "_prompt_encoder." in name


class PromptEncoder(nn.Module):
    """The prompt table (and optional MLP) of one side: `forward(batch)` → per layer (key, value), each
    [B, H, P, d]."""

    def __init__(self, length: int, layers: int, d_model: int, num_heads: int, projection: bool = False,
                 prompt_dim: int = 0, dropout: float = 0.2):
        super().__init__()
        self.length, self.layers, self.num_heads = length, layers, num_heads
        self.head_dim = d_model // num_heads
        out = layers * 2 * d_model
        self.dropout = dropout
        if projection:
            dim = prompt_dim or 2 * d_model
            self.embedding = nn.Embedding(length, d_model)
            self.trans = nn.Sequential(nn.Linear(d_model, dim), nn.ReLU(), nn.Linear(dim, out))
        else:
            self.embedding = nn.Embedding(length, out)
            self.trans = None

    def forward(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        ids = torch.arange(self.length, device=self.embedding.weight.device)
        x = self.embedding(ids)                                   # called, not .weight read: ZeRO-3 gathers per call
        if self.trans is not None:
            x = self.trans(x)                                     # [P, L·2·C]
        x = x[None].expand(batch, -1, -1)
        x = F.dropout(x, self.dropout, self.training)            # per-sample masks, as OFA (B rows of the same table)
        x = x.view(batch, self.length, 2 * self.layers, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return [(x[2 * i], x[2 * i + 1]) for i in range(self.layers)]   # each [B, H, P, d]


def build_prompt_encoder(cfg: ModelConfig, side: str) -> PromptEncoder | None:
    """The prompt encoder `cfg` asks for on `side` ('encoder'/'decoder'), or None when its length is 0."""
    length = cfg.encoder_prompt_length if side == "encoder" else cfg.decoder_prompt_length
    if length <= 0:
        return None
    layers = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
    return PromptEncoder(length, layers, cfg.d_model, cfg.num_heads, cfg.prompt_projection, cfg.prompt_dim,
                         cfg.prompt_dropout)


def with_prompts(cfg: ModelConfig, pt: PromptTuningConfig) -> ModelConfig:
    """`cfg` with the prompts a `train.prompt_tuning` section asks for (unchanged when it is off)."""
    if not pt.enabled:
        return cfg
    return dataclasses.replace(cfg, encoder_prompt_length=pt.encoder_length, decoder_prompt_length=pt.decoder_length,
                               prompt_projection=pt.projection, prompt_dim=pt.prompt_dim, prompt_dropout=pt.dropout)


def has_prompts(cfg: ModelConfig) -> bool:
    return cfg.encoder_prompt_length > 0 or cfg.decoder_prompt_length > 0


def freeze_all_but_prompts(model: nn.Module) -> tuple[int, int]:
    """OFA's prompt-tuning freeze: every parameter off except the prompt encoders'. The ResNet's BatchNorm layers
    also stay in eval mode for good (running statistics used, never updated; OFA's code would update them unless
    --freeze-resnet), so the frozen model is exactly the one the prompts were tuned on and a prompts file alone
    reproduces the tuned model. Returns (trainable, total) parameter counts (the tied token table counted once)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_prompt_param(name))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = types.MethodType(_stay_in_eval, m)
            m.eval()
    return count_params(model)


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements; ZeRO-3 partitioned parameters count with their full size (ds_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ---- prompts on their own ----------------------------------------------------------------------------------------
_SHAPE_FIELDS = ("encoder_prompt_length", "decoder_prompt_length", "prompt_projection", "prompt_dim",
                 "prompt_dropout", "encoder_layers", "decoder_layers", "d_model", "num_heads")


def prompt_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The prompt entries of a full state dict, official names kept."""
    return {k: v for k, v in state.items() if is_prompt_param(k)}


def save_prompts(state: dict[str, Tensor], cfg: ModelConfig, path: str) -> None:
    """Write the prompt entries of `state` (full model state or prompts only) with `cfg`'s shape facts in the
    metadata, atomically (a temporary file renamed)."""
    from safetensors.torch import save_file
    prompts = {k: v.detach().to("cpu").float().contiguous() for k, v in prompt_state_dict(state).items()}
    if not prompts:
        raise ValueError(f"{path}: nothing to save, the state has no *_prompt_encoder.* entries")
    meta = {k: getattr(cfg, k) for k in _SHAPE_FIELDS}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(prompts, tmp, metadata={"ofa_ds_prompts": json.dumps(meta)})
    os.replace(tmp, path)


def load_prompts(path: str) -> tuple[dict[str, Tensor], dict]:
    """(prompt tensors, shape facts) of a file written by `save_prompts`."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such prompts file")
    with safe_open(path, "pt") as f:
        meta = (f.metadata() or {}).get("ofa_ds_prompts")
    if meta is None:
        raise ValueError(f"{path}: not a prompts file (no 'ofa_ds_prompts' metadata); write it with save_prompts")
    return load_file(path), json.loads(meta)


def check_prompt_file(cfg: ModelConfig, facts: dict, path: str) -> None:
    """Refuse a prompts file whose shapes differ from what `cfg` builds, naming every difference."""
    diffs = [f"{k} {facts[k]} in the file, {getattr(cfg, k)} in the model" for k in _SHAPE_FIELDS
             if k != "prompt_dropout" and k in facts and facts[k] != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"{path}: the prompts do not fit this model: " + "; ".join(diffs))


def attach_prompts(model: nn.Module, path: str) -> nn.Module:
    """Merge a prompts file into an OFAModel without prompts (or with prompts of the same shapes): the prompt
    encoders are built from the file's facts and loaded; `model.cfg` (and its encoder/decoder's) then describe
    them, so an export of `model` carries them. Returns `model`."""
    state, facts = load_prompts(path)
    cfg = dataclasses.replace(model.cfg, **{k: facts[k] for k in ("encoder_prompt_length", "decoder_prompt_length",
                                                                  "prompt_projection", "prompt_dim",
                                                                  "prompt_dropout")})
    check_prompt_file(cfg, facts, path)
    add_prompt_encoders(model, cfg)
    own = {k: v for k, v in model.state_dict().items() if is_prompt_param(k)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: prompt entries do not match: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {shapes}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    return model


@torch.no_grad()
def add_prompt_encoders(model: nn.Module, cfg: ModelConfig) -> None:
    """Give an OFAModel the prompt encoders `cfg` describes (fresh N(0, 0.02), OFA's init), replacing any it has
    whose shape differs, and make `cfg` the model's config."""
    dev = next(model.parameters()).device
    for side in SIDES:
        part = getattr(model, side)
        old = getattr(part, prompt_key(side), None)
        new = build_prompt_encoder(cfg, side)
        if new is not None and old is not None and _same_shapes(old, new):
            old.dropout = new.dropout
            continue
        if new is not None:
            for m in new.modules():                                     # OFA's init_bert_params
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            new.to(dev).train(part.training)
        setattr(part, prompt_key(side), new)
        part.cfg = cfg
    model.cfg = cfg


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
