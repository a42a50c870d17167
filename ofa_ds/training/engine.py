"""The only module of ofa_ds that imports deepspeed: DeepSpeed config resolution, engine set-up, checkpoints.

DeepSpeed JSON (`ds_configs/*.json`) holds engine choices only (ZeRO stage, offload, bf16/fp16 block, buckets).
Fields the RunConfig owns may be "auto" (or absent) and are filled here — the Hugging Face convention:
  train_micro_batch_size_per_gpu  <- data.batch_size          gradient_accumulation_steps <- train.grad_accum
  train_batch_size                <- micro × accum × world     gradient_clipping           <- train.clip_norm
  optimizer.params.{lr, betas, eps, weight_decay}              <- train.*
  scheduler (WarmupDecayLR only) .{warmup_min_lr, warmup_max_lr, warmup_num_steps, total_num_steps}
  fp16.enabled / bf16.enabled     <- train.precision ("auto" precision is taken from the JSON instead)
  zero_optimization.{reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold}
                                  <- h², 0.9·h², 10·h of the model width h
  zero_optimization.offload_*.nvme_path  <- $OFA_DS_NVME_PATH (else /local_nvme)
A non-"auto" value that disagrees with the RunConfig raises ConfigMismatch naming both values; an "auto" left with
nothing to fill it is an error too, so plain DeepSpeed never sees "auto".

Without a scheduler block (the shipped configs) the learning rate follows OFA's polynomial decay with linear warmup,
implemented as a torch LambdaLR handed to deepspeed.initialize (it is saved and restored with the checkpoint).

Checkpoints: `<ckpt>/<tag>/` is written by DeepSpeed (save_latest=False) plus one `client_rank<r>.pt` per rank (data
position, RNG states, step); only when every rank has finished does rank 0 write `<tag>/COMPLETE` and then replace
`<ckpt>/latest` atomically (write + fsync + rename). A crash mid-save therefore leaves `latest` pointing at the
previous complete checkpoint; `find_resume_tag` also ignores any tag without COMPLETE.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import deepspeed

from ofa_ds.training.ports import free_port

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


# ---- distributed + engine -------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, nccl on GPU) if the launcher set one up; (rank, world, device)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def polynomial_lambda(max_steps: int, warmup: int, lr: float, end_lr: float, power: float):
    """OFA's polynomial_decay as a LambdaLR factor: linear warmup from 0, then (lr−end)·(1−p)^power + end."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        if step >= max_steps or lr == 0:
            return end_lr / lr if lr else 0.0
        frac = 1.0 - (step - warmup) / max(1, max_steps - warmup)
        return ((lr - end_lr) * frac ** power + end_lr) / lr
    return f


def initialize(model: torch.nn.Module, run, ds_cfg: dict):
    """deepspeed.initialize with DeepSpeed's own Adam (fused on GPU, CPU Adam with offload) and OFA's schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    sched = None
    if "scheduler" not in ds_cfg:
        t = run.train
        fn = polynomial_lambda(t.max_steps, t.warmup, t.lr, t.end_lr, t.lr_power)
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn)  # noqa: E731
    if not torch.cuda.is_available() and not _uses_cpu_adam(ds_cfg):
        # FusedAdam is a CUDA kernel; plain CPU runs without offload use torch's AdamW (same update rule) in its
        # fused CPU form: DeepSpeed's torch_adam path would otherwise build the per-tensor loop (torch picks foreach
        # only for CUDA tensors), measured 4.8x slower on OFA-Tiny (benchmarks/bench_optimizer.py).
        ds_cfg = copy.deepcopy(ds_cfg)
        ds_cfg["optimizer"]["params"]["torch_adam"] = True
        if _cpu_fused_adamw_available():                   # torch >= 2.4; older builds keep the loop
            ds_cfg["optimizer"]["params"].setdefault("fused", True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_cfg, lr_scheduler=sched)
    if dist.get_world_size() == 1 and zero_stage(ds_cfg) == 0:
        # One rank: the backward all-reduce is an identity (sum over one rank, divided by 1) that still flattens
        # and copies every gradient, ~50 ms of a ~460 ms default-run step on 2 CPU cores (cProfile). Skip it.
        engine.enable_backward_allreduce = False
    return engine


def _cpu_fused_adamw_available() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def _uses_cpu_adam(ds_cfg: dict) -> bool:
    z = ds_cfg.get("zero_optimization", {})
    dev = (z.get("offload_optimizer") or {}).get("device", "none")
    return dev in ("cpu", "nvme") and zero_stage(ds_cfg) > 0


def loss_scale(engine) -> float:
    opt = getattr(engine, "optimizer", None)
    for name in ("cur_scale", "loss_scale"):
        v = getattr(opt, name, None)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, torch.Tensor):
            return float(v)
    return 1.0


def grad_norm(engine) -> float | None:
    v = engine.get_global_grad_norm()
    if v is None:
        return None
    return float(v)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, t, "COMPLETE")))


def find_resume_tag(ckpt_dir: str) -> str | None:
    """`latest` when it names a complete checkpoint, else the newest complete one, else None."""
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        tag = open(latest).read().strip()
        if os.path.isfile(os.path.join(ckpt_dir, tag, "COMPLETE")):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save_checkpoint(engine, ckpt_dir: str, step: int, client: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
    torch.save({**client, "rng": rng_state(), "step": step, "world_size": dist.get_world_size()},
               os.path.join(ckpt_dir, tag, f"client_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        _atomic_write(os.path.join(ckpt_dir, tag, "COMPLETE"), json.dumps({"step": step}) + "\n")
        _atomic_write(os.path.join(ckpt_dir, "latest"), tag + "\n")
        for old in complete_tags(ckpt_dir)[:-max(keep, 1)]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: str, tag: str) -> dict:
    """Load engine + optimizer + scheduler state and return this rank's client state (RNG already restored)."""
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    rank, world = dist.get_rank(), dist.get_world_size()
    own = os.path.join(ckpt_dir, tag, f"client_rank{rank}.pt")
    if not os.path.isfile(own):  # resumed on more ranks than saved: take rank 0's data position and RNG
        own = os.path.join(ckpt_dir, tag, "client_rank0.pt")
    client = torch.load(own, map_location="cpu", weights_only=False)
    if client.get("world_size", world) == world:
        set_rng_state(client["rng"])
    return client


def consolidated_state_dict(engine, ckpt_dir: str, tag: str) -> dict[str, torch.Tensor] | None:
    """fp32 state dict of the whole model on rank 0 (None elsewhere): gathered from the ZeRO shards of a saved
    checkpoint for stages 1-3 (DeepSpeed's zero_to_fp32 logic), the module's own for stage 0."""
    if dist.get_rank() != 0:
        return None
    if engine.zero_optimization_stage() == 0:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
