"""OFAModel weights in and out: strict state-dict loading and the Hugging Face-style folder.

* `load_state_strict(model, state, where)` loads a state dict in the model's own key layout (the fairseq names of
  the official checkpoints) and accounts for every key: missing, unexpected and mis-shaped entries are all named in
  one `CheckpointError`. The three tied token tables (`TIED`) may be stored once; if more are stored they must be
  equal. The index buffers in `DERIVED_BUFFERS` are recomputed by the model, so they may be absent; the relative
  position bucket tables, when present, must equal the ones the model builds. Prompt-tuning parameters
  (`*_prompt_encoder.*`) the model has and the file lacks keep the model's fresh values, as OFA's
  upgrade_state_dict_named does: a pretrained checkpoint loads into a model built with prompts.
* `export_folder(model, folder)` writes `config.json` (the ModelConfig) + `model.safetensors` (tied table once,
  derived buffers omitted) + the tokenizer files; `read_folder(folder)` returns its config and state dict, and
  `OFAModel.from_pretrained(folder)` builds the model from them.

This module does not know the model class (it takes any module with OFA's state-dict keys), so that the class can
offer `from_pretrained` without an import cycle. The official `.pt` format is in ofa_ds/checkpoint.py, which
re-exports these names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import torch
from torch import nn

from ofa_ds.config import ModelConfig

TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")
# Index buffers the model recomputes from constants; an official file must carry them, a folder need not.
DERIVED_BUFFERS = ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                   "decoder.image_rp_bucket", "decoder.image_position_idx", "encoder.version", "decoder.version")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the offending entries."""


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load an official-layout state dict into `model`, accounting for every key (errors name them)."""
    state = dict(state)
    tied = [state[k] for k in TIED if k in state]
    if not tied:
        raise CheckpointError(f"{where}: missing the token table ({TIED[0]})")
    for k in TIED[1:]:
        if k in state and not torch.equal(state[k], tied[0]):
            raise CheckpointError(f"{where}: {k} differs from {TIED[0]}; OFA ties these three tensors")
    for k in TIED:
        state.setdefault(k, tied[0])
    own = model.state_dict()
    for k in DERIVED_BUFFERS:  # recomputable: accept their absence (folders), check their values when present
        if k not in state:
            state[k] = own[k]
    for k in own:              # prompts the file does not have: the model's own (fresh) ones
        if "_prompt_encoder." in k and k not in state:
            state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {missing[:20]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:20]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {shapes[:20]}")
        raise CheckpointError(f"{where}: state dict does not match the model; " + "; ".join(parts))
    for k in ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
              "decoder.image_rp_bucket"):
        if not torch.equal(state[k].long(), own[k]):
            raise CheckpointError(f"{where}: buffer {k} differs from the bucket table OFA defines")
    model.load_state_dict(state, strict=True)


def export_folder(model: nn.Module, folder: str) -> None:
    """config.json + model.safetensors (tied table once, derived buffers omitted) + tokenizer files."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if k not in TIED[1:] and k not in DERIVED_BUFFERS}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt", "ofa_ds": "1"})
    meta = {"model_type": "ofa", "architectures": ["OFAModel"], "ofa_ds_config": model.cfg.to_dict()}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    sub = "bpe" if model.cfg.vocab_size > 40000 else "bert_cn"
    for name in os.listdir(os.path.join(ASSETS, sub)):
        shutil.copy(os.path.join(ASSETS, sub, name), os.path.join(folder, name))
    shutil.copy(os.path.join(ASSETS, "NOTICE.md"), os.path.join(folder, "NOTICE.md"))


def read_folder(folder: str, **config_overrides: Any) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """The ModelConfig (with `config_overrides` replacing fields), the state dict and the weights file's path of a
    folder written by `export_folder`."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(folder, "config.json")
    weights = os.path.join(folder, "model.safetensors")
    for p in (cfg_path, weights):
        if not os.path.isfile(p):
            raise CheckpointError(f"{folder}: not an ofa_ds model folder ({os.path.basename(p)} is missing)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if "ofa_ds_config" not in meta:
        raise CheckpointError(f"{cfg_path}: no 'ofa_ds_config' entry; was this folder written by ofa_ds?")
    cfg = ModelConfig.from_dict(meta["ofa_ds_config"], where=cfg_path)
    return dataclasses.replace(cfg, **config_overrides), load_file(weights), weights
