"""Prompt tuning in a training run (`train.prompt_tuning`, recipes `<task>_prompt`): the model is built with prefix
prompts (ofa_ds/model/prompt.py), everything but the prompts is frozen, and the prompts are written on their own.

What is unusual:
  * Freezing happens before `deepspeed.initialize`, and the engine is handed only the trainable parameters, so the
    optimizer (and under ZeRO-1/2/3 its partitioned fp32 master copy and Adam moments) holds the prompts only.
  * Loading a prompts file (`train.prompt_tuning.prompts`) and writing one work on ZeRO-3 partitioned parameters
    too: the few prompt tensors are gathered (deepspeed.zero.GatheredParameters), never the model.
  * `<out>/prompts.safetensors` is rewritten (atomically) after every checkpoint and `<out>/final/prompts.safetensors`
    after the export; the exported final/ model itself carries the prompts under their official keys.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

import torch
import torch.distributed as dist
from torch import nn

from ofa_ds.config import ModelConfig, RunConfig
from ofa_ds.model.prompt import (PROMPT_FILE, check_prompt_file, freeze_all_but_prompts, is_prompt_param,
                                 load_prompts, save_prompts, with_prompts)
from ofa_ds.training.faults import RunFault

PROMPT_FIELDS = ("encoder_prompt_length", "decoder_prompt_length", "prompt_projection", "prompt_dim",
                 "prompt_dropout")


def model_overrides(run: RunConfig) -> dict:
    """ModelConfig fields a prompt-tuning run imposes on the model it loads with --init (none when it is off)."""
    if not run.train.prompt_tuning.enabled:
        return {}
    cfg = with_prompts(run.model, run.train.prompt_tuning)
    return {k: getattr(cfg, k) for k in PROMPT_FIELDS}


def model_config(run: RunConfig, cfg: ModelConfig) -> ModelConfig:
    """The run's model config with its prompts (`cfg`: the --init checkpoint's config or the recipe's)."""
    return with_prompts(cfg, run.train.prompt_tuning)


def _gathered(params: list[nn.Parameter], modify: bool):
    """Full values of ZeRO-3 partitioned `params` inside the context (written back from rank 0 when `modify`);
    a no-op for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def prepare(tr, module: nn.Module) -> None:
    """Before the engine exists: load train.prompt_tuning.prompts if given, freeze all but the prompts, print the
    parameter counts (rank 0) and keep them on the trainer (`tr.param_counts`)."""
    pt = tr.run_cfg.train.prompt_tuning
    if not pt.enabled:
        return
    if not any(is_prompt_param(k) for k, _ in module.named_parameters()):
        raise RunFault("train.prompt_tuning is on but the model has no prompt encoders (the pipeline strategy does "
                       "not support prompt tuning; use a ds_config without a \"pipeline\" block)", status=2,
                       every_rank=True)
    if pt.prompts:
        _load_file(module, tr.model_cfg, pt.prompts)
    trainable, total = freeze_all_but_prompts(module)
    tr.param_counts = (trainable, total)
    if tr.rank == 0:
        print(f"prompt tuning: trainable parameters {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)",
              file=sys.stderr, flush=True)


def _load_file(module: nn.Module, cfg: ModelConfig, path: str) -> None:
    try:
        state, facts = load_prompts(path)
        check_prompt_file(cfg, facts, path)
    except ValueError as e:
        raise RunFault(f"train.prompt_tuning.prompts: {e}", status=2, every_rank=True) from None
    params = {k: p for k, p in module.named_parameters() if is_prompt_param(k)}
    if set(params) != set(state):
        raise RunFault(f"train.prompt_tuning.prompts: {path} holds {sorted(state)}, the model has {sorted(params)}",
                       status=2, every_rank=True)
    with _gathered(list(params.values()), modify=True), torch.no_grad():
        if not dist.is_initialized() or dist.get_rank() == 0 or not hasattr(next(iter(params.values())), "ds_id"):
            for k, p in params.items():
                p.copy_(state[k].to(p.dtype))


def save(tr) -> None:
    """Collective under ZeRO-3: write the current prompts to <out>/prompts.safetensors (rank 0)."""
    if not tr.run_cfg.train.prompt_tuning.enabled:
        return
    params = {k: p for k, p in tr.engine.module.named_parameters() if is_prompt_param(k)}
    with _gathered(list(params.values()), modify=False):
        if tr.rank == 0:
            save_prompts({k: p.detach() for k, p in params.items()}, tr.model_cfg, os.path.join(tr.out, PROMPT_FILE))


def save_final(tr) -> None:
    """Rank 0, after the export: final/prompts.safetensors next to the exported model (same values)."""
    src, final = os.path.join(tr.out, PROMPT_FILE), os.path.join(tr.out, "final")
    if tr.run_cfg.train.prompt_tuning.enabled and tr.rank == 0 and os.path.isfile(src) and os.path.isdir(final):
        shutil.copyfile(src, os.path.join(final, PROMPT_FILE))


def facts(tr) -> dict:
    """Report entries: trainable / total parameter counts of a prompt-tuning run."""
    counts = getattr(tr, "param_counts", None)
    return {} if counts is None else {"params_trainable": counts[0], "params_total": counts[1]}
