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

* Module-by-module loading (a model whose parameters are sharded, so that no process holds them all): a
  `TensorSource` reads one tensor at a time (`FolderSource`: safetensors, per tensor; `DictSource`: a state dict,
  e.g. an official file opened with `torch.load(mmap=True)` so its tensors are paged in only when read);
  `plan_load(own_shapes, source, where)` does `load_state_strict`'s accounting on shapes alone and says which
  stored tensor fills each model entry.

This module does not know the model class (it takes any module with OFA's state-dict keys), so that the class can
offer `from_pretrained` without an import cycle. The official `.pt` format is in ofa_ds/checkpoint.py, which
re-exports these names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import torch
from torch import nn

from ofa_ds.config import ModelConfig

TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")
# Index buffers the model recomputes from constants; an official file must carry them, a folder need not.
BUCKET_TABLES = ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                 "decoder.image_rp_bucket")
DERIVED_BUFFERS = BUCKET_TABLES + ("decoder.image_position_idx", "encoder.version", "decoder.version")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the offending entries."""


def check_match(where: str, missing: list, unexpected: list, shapes: list) -> None:
    """Raise one CheckpointError naming (up to 20 of) the missing keys, unexpected keys and shape mismatches."""
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {missing[:20]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:20]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {shapes[:20]}")
        raise CheckpointError(f"{where}: state dict does not match the model; " + "; ".join(parts))


def check_bucket_tables(read: Callable[[str], torch.Tensor | None], own: dict[str, torch.Tensor], where: str) -> None:
    """The relative-position bucket tables a checkpoint carries (`read(key)`, None when absent) must be the ones the
    model builds (`own`: its buffers)."""
    for k in BUCKET_TABLES:
        stored = read(k)
        if stored is not None and not torch.equal(stored.long(), own[k]):
            raise CheckpointError(f"{where}: buffer {k} differs from the bucket table OFA defines")


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
    for k in [k for k in state if k.endswith("num_batches_tracked") and k not in own]:
        del state[k]           # a BatchNorm counter the FrozenBatchNorm2d of model.frozen_bn does not keep
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    check_match(where, missing, unexpected, shapes)
    check_bucket_tables(state.get, own, where)
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

    cfg, weights = read_folder_config(folder, **config_overrides)
    return cfg, load_file(weights), weights


def read_folder_config(folder: str, **config_overrides: Any) -> tuple[ModelConfig, str]:
    """The ModelConfig of an exported folder (with `config_overrides`) and its weights file's path; no tensor is
    read."""
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
    return dataclasses.replace(cfg, **config_overrides), weights


class TensorSource:
    """A checkpoint read one tensor at a time: `keys()`, `shape(key)`, `get(key)` (a CPU tensor); `where` names it."""

    where = "?"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class DictSource(TensorSource):
    """A state dict already opened (an official file loaded with mmap=True keeps its tensors on disk until read)."""

    def __init__(self, state: dict[str, torch.Tensor], where: str):
        self.state, self.where = state, where

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


class FolderSource(TensorSource):
    """The model.safetensors of an exported folder, read per tensor (nothing else is loaded)."""

    def __init__(self, weights: str):
        from safetensors import safe_open
        self.where = weights
        self._f = safe_open(weights, framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


def plan_load(own_shapes: dict[str, tuple[int, ...]], source: TensorSource) -> dict[str, str | None]:
    """For every model entry (`own_shapes`: state-dict key -> shape), the stored key that fills it, or None for a
    recomputable buffer or a prompt the source lacks (the model keeps its own). The accounting of `load_state_strict`
    (tied tables stored once or equal, derived buffers optional, every missing / unexpected / mis-shaped key named
    in one CheckpointError), done on shapes so that no tensor is read; tied tables are compared when several are
    stored."""
    where = source.where
    stored = set(source.keys())
    tied = [k for k in TIED if k in stored]
    if not tied:
        raise CheckpointError(f"{where}: missing the token table ({TIED[0]})")
    first = source.get(tied[0]) if len(tied) > 1 else None
    for k in tied[1:]:
        if not torch.equal(source.get(k), first):
            raise CheckpointError(f"{where}: {k} differs from {TIED[0]}; OFA ties these three tensors")
    plan: dict[str, str | None] = {}
    for k in own_shapes:
        if k in stored:
            plan[k] = k
        elif k in TIED:
            plan[k] = tied[0]
        elif k in DERIVED_BUFFERS or "_prompt_encoder." in k:
            plan[k] = None          # recomputed buffers; prompts the file lacks keep the model's fresh values
    missing = sorted(set(own_shapes) - set(plan))
    unexpected = sorted(stored - set(own_shapes))
    shapes = [f"{k}: file {source.shape(v)} vs model {tuple(own_shapes[k])}"
              for k, v in plan.items() if v is not None and source.shape(v) != tuple(own_shapes[k])]
    check_match(where, missing, unexpected, shapes)
    return plan
