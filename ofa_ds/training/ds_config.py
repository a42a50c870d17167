"""DeepSpeed JSON resolution: a shipped `ds_configs/*.json` (engine choices only) + a RunConfig -> the dict that
`deepspeed.initialize` receives.

Fields the RunConfig owns may be "auto" (or absent) and are filled here, the Hugging Face convention:
  train_micro_batch_size_per_gpu  <- data.batch_size          gradient_accumulation_steps <- train.grad_accum
  train_batch_size                <- micro x accum x world     gradient_clipping           <- train.clip_norm
  optimizer.params.{lr, betas, eps, weight_decay}              <- train.*
  scheduler (WarmupDecayLR only) .{warmup_min_lr, warmup_max_lr, warmup_num_steps, total_num_steps}
  fp16.enabled / bf16.enabled     <- train.precision ("auto" precision is taken from the JSON instead)
  zero_optimization.{reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold}
                                  <- h^2, 0.9 h^2, 10 h of the model width h
  zero_optimization.offload_*.nvme_path  <- $OFA_DS_NVME_PATH (else /local_nvme)
A non-"auto" value that disagrees with the RunConfig raises ConfigMismatch naming both values; an "auto" left with
nothing to fill it is an error too, so plain DeepSpeed never sees "auto". Imports deepspeed only to validate.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

AUTO = "auto"


class ConfigMismatch(ValueError):
    """A DeepSpeed JSON value disagrees with the RunConfig (or an "auto" field cannot be filled)."""


# ---- DeepSpeed config resolution ------------------------------------------------------------------------------------
def resolve_ds_path(path: str) -> str:
    """A relative path that does not exist from the working directory is looked up in the checkout's root, so the
    recipes' `ds_configs/...` work from any directory."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    alt = os.path.join(root, path)
    return alt if os.path.isfile(alt) else path


def load_ds_json(path: str) -> dict:
    path = resolve_ds_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config {path!r} does not exist (see ds_configs/ for the shipped ones)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def raw_ds_config(ds: str | dict | None) -> dict:
    """A ds_config as written (a path is read; nothing = {}), before build_ds_config fills its 'auto' fields."""
    if not ds:
        return {}
    return load_ds_json(ds) if isinstance(ds, str) else ds


def json_precision(ds: dict) -> str | None:
    """The precision a JSON fixes on its own (None when both blocks are absent or "auto")."""
    bf, fp = ds.get("bf16", {}).get("enabled"), ds.get("fp16", {}).get("enabled")
    if bf is True and fp is True:
        raise ConfigMismatch("the DeepSpeed config enables both bf16 and fp16")
    if bf is True:
        return "bf16"
    if fp is True:
        return "fp16"
    if bf is False and fp in (False, None) or fp is False and bf in (False, None):
        return "fp32"
    return None


def resolve_precision(requested: str, ds: dict, where: str = "ds_config") -> str:
    fixed = json_precision(ds)
    if requested == "auto":
        return fixed or "fp32"
    if fixed is not None and fixed != requested:
        raise ConfigMismatch(f"{where} selects precision {fixed!r} but train.precision is {requested!r}; "
                             f"set the JSON's bf16/fp16 'enabled' to \"auto\" or --set train.precision={fixed}")
    return requested


def _fill(node: dict, key: str, value: Any, where: str, mismatches: list[str]) -> None:
    """Replace "auto" by value; record a mismatch for a different explicit value (HF's fill_match)."""
    if key not in node or node[key] == AUTO:
        node[key] = value
        return
    have = node[key]
    same = have == value
    if isinstance(value, (list, tuple)) and isinstance(have, (list, tuple)):
        same = [float(x) for x in have] == [float(x) for x in value]
    elif isinstance(value, float) or isinstance(have, float):
        try:
            same = abs(float(have) - float(value)) <= 1e-12 * max(1.0, abs(float(value)))
        except (TypeError, ValueError):
            same = False
    if not same:
        mismatches.append(f"{where}.{key} = {have!r} in the DeepSpeed config but the RunConfig gives {value!r}")


def _leftover_autos(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leftover_autos(v, f"{path}.{k}" if path else k)]
    return [path] if node == AUTO else []


def build_ds_config(ds: dict | str, run, world_size: int) -> dict:
    """The DeepSpeed config dict for `run` on `world_size` ranks: "auto" fields filled, disagreements raised."""
    where = ds if isinstance(ds, str) else "ds_config"
    cfg = copy.deepcopy(load_ds_json(ds) if isinstance(ds, str) else ds)
    t, mm = run.train, []
    micro = run.data.batch_size
    _fill(cfg, "train_micro_batch_size_per_gpu", micro, "", mm)
    _fill(cfg, "gradient_accumulation_steps", t.grad_accum, "", mm)
    _fill(cfg, "train_batch_size", micro * t.grad_accum * world_size, "", mm)
    _fill(cfg, "gradient_clipping", float(t.clip_norm), "", mm)
    prec = resolve_precision(t.precision, cfg, where)
    for block, on in (("fp16", prec == "fp16"), ("bf16", prec == "bf16")):
        if block in cfg or on:
            cfg.setdefault(block, {})
            _fill(cfg[block], "enabled", on, block, mm)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        mm.append(f"optimizer.type = {opt.get('type')!r}: OFA trains with AdamW (Adam with decoupled decay)")
    p = opt.setdefault("params", {})
    _fill(p, "lr", float(t.lr), "optimizer.params", mm)
    _fill(p, "betas", [float(b) for b in t.betas], "optimizer.params", mm)
    _fill(p, "eps", float(t.adam_eps), "optimizer.params", mm)
    _fill(p, "weight_decay", float(t.weight_decay), "optimizer.params", mm)
    if "scheduler" in cfg:
        sch = cfg["scheduler"]
        if sch.get("type") != "WarmupDecayLR" or t.end_lr != 0 or t.lr_power != 1:
            mm.append(f"scheduler {sch.get('type')!r} cannot express OFA's schedule (end_lr {t.end_lr}, power "
                      f"{t.lr_power}); remove the scheduler block to use the built-in polynomial decay")
        sp = sch.setdefault("params", {})
        sp.setdefault("warmup_type", "linear")
        for k, v in (("warmup_min_lr", 0.0), ("warmup_max_lr", float(t.lr)), ("warmup_num_steps", t.warmup),
                     ("total_num_steps", t.max_steps)):
            _fill(sp, k, v, "scheduler.params", mm)
    z = cfg.setdefault("zero_optimization", {"stage": 0})
    h = run.model.d_model
    for k, v in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                 ("stage3_param_persistence_threshold", 10 * h)):
        if z.get(k) == AUTO:
            z[k] = v
    nvme = os.environ.get("OFA_DS_NVME_PATH", "/local_nvme")
    for k in ("offload_optimizer", "offload_param"):
        if isinstance(z.get(k), dict) and z[k].get("nvme_path") == AUTO:
            z[k]["nvme_path"] = nvme
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if (cfg["train_batch_size"] != cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
            * world_size):
        mm.append(f"train_batch_size {cfg['train_batch_size']} != micro batch {cfg['train_micro_batch_size_per_gpu']}"
                  f" x accumulation {cfg['gradient_accumulation_steps']} x world size {world_size}")
    left = _leftover_autos(cfg)
    if left:
        mm.append(f"fields left as \"auto\" with nothing to fill them: {left}")
    if mm:
        raise ConfigMismatch(f"{where}: " + "; ".join(mm))
    return cfg


def validate_ds_config(cfg: dict) -> None:
    """Let DeepSpeed's own parser check a resolved dict without a process group. Its batch check then runs for a
    world of one, so train_batch_size is presented per rank (build_ds_config checked the world arithmetic)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    c = copy.deepcopy(cfg)
    c["train_batch_size"] = c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"]
    DeepSpeedConfig(c)


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))

