"""Training checkpoints: DeepSpeed's own folders plus one client file per rank, written so that a crash never
leaves a half-written checkpoint that looks complete.

`<ckpt>/<tag>/` is written by DeepSpeed (save_latest=False) plus one `client_rank<r>.pt` per rank (data position, RNG
states, step); only when every rank has finished does rank 0 write `<tag>/COMPLETE` and then replace `<ckpt>/latest`
atomically (write + fsync + rename). A crash mid-save therefore leaves `latest` pointing at the previous complete
checkpoint; `find_resume_tag` also ignores any tag without COMPLETE. A save that fails (a full disk: torch reports it
as "basic_ios::clear: iostream error" or "unexpected pos ...") raises a one-line RunFault naming the cause, the
checkpoint and the last complete one (`training/faults.py`); a resume whose checkpoint holds another model than the
run builds names the model fields that differ (`resume_failure`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ofa_ds.training.faults import RunFault, write_failure

SHAPE_ERRORS = ("size mismatch", "Missing key", "Unexpected key", "shape mismatch", "does not match",
                "must match the size")          # what torch / DeepSpeed (ZeRO-3: flat partitions) say on other shapes
READ_ERRORS = ("PytorchStreamReader", "central directory", "unpickling", "EOF", "corrupt", "truncated")

RUN_OWN_MODEL_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "encoder_drop_path_rate",
                        "decoder_drop_path_rate", "resnet_drop_path_rate", "kernel_backend", "frozen_bn")
"""Model settings a run may change on --resume or take from itself with --init: they shape no parameter."""


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def save_checkpoint(engine, ckpt_dir: str, step: int, client: dict, keep: int, extra=None) -> str:
    """Collective: every rank calls it. Returns the tag written. A failed write (full disk, ...) raises a RunFault
    that names the checkpoint and the last complete one, which stays as it was. `extra(folder)`: writes more of
    this rank's files into the checkpoint folder before it is marked complete (the EMA weights)."""
    tag = tag_for(step)
    rank = dist.get_rank()
    previous = find_resume_tag(ckpt_dir)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
        torch.save({**client, "rng": rng_state(), "step": step, "world_size": dist.get_world_size()},
                   os.path.join(ckpt_dir, tag, f"client_rank{rank}.pt"))
        if extra is not None:
            extra(os.path.join(ckpt_dir, tag))
    except (OSError, RuntimeError) as e:
        raise _save_failure(e, ckpt_dir, tag, previous) from e
    dist.barrier()
    if rank == 0:
        try:
            _atomic_write(os.path.join(ckpt_dir, tag, "COMPLETE"), json.dumps({"step": step}) + "\n")
            _atomic_write(os.path.join(ckpt_dir, "latest"), tag + "\n")
        except OSError as e:
            raise _save_failure(e, ckpt_dir, tag, previous) from e
        for old in complete_tags(ckpt_dir)[:-max(keep, 1)]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def _save_failure(exc: BaseException, ckpt_dir: str, tag: str, previous: str | None) -> BaseException:
    path = os.path.join(ckpt_dir, tag)
    if previous is not None:
        after = (f"the last complete checkpoint {os.path.join(ckpt_dir, previous)} is intact (the incomplete {tag} "
                 f"is ignored and may be deleted); rerun with --resume once this is fixed")
    else:
        after = "no complete checkpoint was written yet"
    return write_failure(exc, path, f"saving checkpoint {path}", after)


def saved_config(ckpt_dir: str, tag: str) -> dict:
    """The RunConfig (as a dict) a checkpoint was saved with ({} when its client file does not say)."""
    try:
        client = torch.load(os.path.join(ckpt_dir, tag, "client_rank0.pt"), map_location="cpu", weights_only=False)
    except Exception:      # noqa: BLE001 (unreadable client file: the caller reports the engine's own failure)
        return {}
    return client.get("config", {}) if isinstance(client, dict) else {}


def model_differences(saved: dict, run) -> str:
    """"model.d_model 128 in the checkpoint, 64 in this run; ..." for the model fields that differ."""
    here = dataclasses.asdict(run.model)
    diffs = []
    for k, v in (saved.get("model") or {}).items():
        mine = here.get(k)
        if isinstance(mine, tuple):
            mine = list(mine)
        if k in here and v != mine and k not in ("name",) + RUN_OWN_MODEL_FIELDS:
            diffs.append(f"model.{k} {v} in the checkpoint, {mine} in this run")
    return "; ".join(diffs)


def _other_model(path: str, diff: str) -> RunFault:
    return RunFault(f"--resume: the checkpoint {path} holds another model than this run builds ({diff}); resume "
                    f"with the settings it was saved with, or train into another --out", status=2, every_rank=True)


def _param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from ofa_ds.model import OFAModel
    with torch.device("meta"):                         # shapes only: no memory, no initialisation work
        return {k: tuple(v.shape) for k, v in OFAModel(cfg).state_dict().items()}


def check_resume_model(ckpt_dir: str, tag: str, run) -> None:
    """Before anything is built: RunFault when the checkpoint's model (from its client file) has other parameter
    shapes than `run.model` (model fields that shape nothing, such as dropout, may differ). Every rank decides
    alike. Checkpoints without a recorded config are left to the engine's own load (`resume_failure`)."""
    from ofa_ds.config import ModelConfig
    saved = saved_config(ckpt_dir, tag)
    diff = model_differences(saved, run)
    if not diff:
        return
    try:
        theirs = ModelConfig.from_dict(dict(saved["model"]), where=os.path.join(ckpt_dir, tag, "client_rank0.pt"))
    except (KeyError, TypeError, ValueError):
        return
    if _param_shapes(theirs) != _param_shapes(run.model):
        raise _other_model(os.path.join(ckpt_dir, tag), diff)


def resume_failure(exc: BaseException, ckpt_dir: str, tag: str, run) -> BaseException:
    """The RunFault for a checkpoint that the engine fails to load: another model size (names the differing model
    fields) or an unreadable file; `exc` itself for anything else. Raised on the ranks whose part fails (a pipeline
    stage without the differing layers loads fine), so each of them prints it."""
    path = os.path.join(ckpt_dir, tag)
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if any(s in text for s in SHAPE_ERRORS):
        fault = _other_model(path, model_differences(saved_config(ckpt_dir, tag), run) or first)
    elif isinstance(exc, OSError) or any(s in text for s in READ_ERRORS):
        fault = RunFault(f"--resume: cannot read the checkpoint {path} ({first.split('. ')[0]}); delete that folder "
                         f"to resume from the complete checkpoint before it, if any", status=2)
    else:
        return exc
    fault.every_rank = False
    return fault


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
