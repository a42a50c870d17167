"""Every checkpoint ofa_ds reads, loaded into an eval-mode OFAModel; the device, dtype and vocabulary to use.

`load_model(path)` accepts an official OFA `.pt` (`ema=True` for VQA finetunes' EMA weights; with a folder: its
`ema/` export or a training checkpoint's EMA files), a folder written by
`python -m ofa_ds.checkpoint to-folder` / `export_folder`, or a training checkpoint of ours: a DeepSpeed checkpoint
folder (has `latest`; consolidated with deepspeed's zero_to_fp32) or a `.pt` holding a bare state dict or
{"module"/"model": state}, with the ModelConfig from a `config.json` next to it or `preset_name`. `launch/evaluate.py`
loads through the same function. Failures are `RunFault`s with one line naming the path.

The vocabulary follows from the weights: a 30325-entry token table is OFA-CN (BERT-Chinese dictionary, Chinese
prompts), 59457 the English one.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ofa_ds.config import ModelConfig, preset
from ofa_ds.training.faults import RunFault

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _config_near(path: str, preset_name: Optional[str]) -> ModelConfig:
    for d in (path if os.path.isdir(path) else os.path.dirname(path), os.path.dirname(os.path.abspath(path))):
        cfg_file = os.path.join(d, "config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                meta = json.load(f)
            for key in ("ofa_ds_config", "model"):
                if isinstance(meta.get(key), dict):
                    return ModelConfig.from_dict(meta[key], where=cfg_file)
    if preset_name:
        return preset(preset_name)
    raise RunFault(f"{path}: no config.json with the model config next to it; pass --preset", status=2)


def load_model(path: str, ema: bool = False, preset_name: Optional[str] = None):
    """The eval-mode OFAModel stored at `path` (see the module docstring for the accepted layouts)."""
    from ofa_ds.checkpoint import load_folder, load_official, load_state_strict, read_checkpoint_file
    from ofa_ds.model import OFAModel
    if not os.path.exists(path):
        raise RunFault(f"{path}: no such checkpoint file or folder", status=2)
    if ema and os.path.isdir(path):
        return _ema_model(path, preset_name)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.safetensors")):
        return load_folder(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            tag_dir = os.path.join(path, f.read().strip())
        ds_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
        if not any("optim_states" in n for n in os.listdir(tag_dir)) and os.path.isfile(ds_file):
            state = torch.load(ds_file, map_location="cpu", weights_only=True)["module"]    # ZeRO stage 0
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(path)
        model = OFAModel(_config_near(path, preset_name))
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if "embed_tokens" not in k and "output_projection" not in k] or unexpected:
            raise RunFault(f"{path}: does not match the model of its config.json (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})", status=2)
        return model.eval()
    if os.path.isfile(path):
        try:
            ckpt = read_checkpoint_file(path)
        except Exception:
            ckpt = None
        if ckpt is not None and (ckpt.get("cfg") or ckpt.get("args")):
            return load_official(path, ema=ema)
        if ckpt is not None:
            state = ckpt["model"]
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:           # noqa: BLE001 (torch raises many types for a file it cannot read)
                raise RunFault(f"{path}: not a checkpoint torch.load can read ({type(e).__name__})",
                               status=2) from None
            state = obj.get("module", obj.get("model", obj)) if isinstance(obj, dict) else obj
        model = OFAModel(_config_near(path, preset_name))
        load_state_strict(model, state, path)
        return model.eval()
    raise RunFault(f"{path}: not a checkpoint file or folder", status=2)


def _ema_model(path: str, preset_name: Optional[str]):
    """`ema=True` with a folder: an export's `ema/` subfolder (a run's final/, or the run folder itself), else the EMA
    files of a DeepSpeed checkpoint folder's latest checkpoint (training/ema.py)."""
    import sys
    from ofa_ds.checkpoint import load_folder
    from ofa_ds.training.ema import ema_model, has_ema
    for sub in ("ema", os.path.join("final", "ema")):
        if os.path.isfile(os.path.join(path, sub, "model.safetensors")):
            print(f"using the EMA weights of {os.path.join(path, sub)}", file=sys.stderr, flush=True)
            return load_folder(os.path.join(path, sub))
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag_dir = os.path.join(path, f.read().strip())
        if has_ema(tag_dir):
            print(f"using the EMA weights of {tag_dir}", file=sys.stderr, flush=True)
            return ema_model(tag_dir, _config_near(path, preset_name))
    raise RunFault(f"{path}: --ema but no EMA weights there (no ema/ export, no EMA files in a checkpoint; the run "
                   f"needs train.ema_decay > 0)", status=2)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' = the first CUDA device when there is one, else the CPU; otherwise torch.device(device)."""
    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = fp16 on CUDA (OFA's evaluation scripts run with --fp16), fp32 elsewhere; or fp32 / fp16 / bf16."""
    if dtype in ("auto", None):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def vocabulary(model) -> str:
    """'zh' when the model's token table is the BERT-Chinese dictionary (OFA-CN, 30325 entries), else 'en' (59457);
    the same rule as the official checkpoint writer's `bpe` field."""
    return "en" if model.cfg.vocab_size > 40000 else "zh"
