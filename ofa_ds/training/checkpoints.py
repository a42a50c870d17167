"""Training checkpoints: DeepSpeed's own folders plus one client file per rank, written so that a crash never
leaves a half-written checkpoint that looks complete.

`<ckpt>/<tag>/` is written by DeepSpeed (save_latest=False) plus one `client_rank<r>.pt` per rank (data position, RNG
states, step); only when every rank has finished does rank 0 write `<tag>/COMPLETE` and then replace `<ckpt>/latest`
atomically (write + fsync + rename). A crash mid-save therefore leaves `latest` pointing at the previous complete
checkpoint; `find_resume_tag` also ignores any tag without COMPLETE.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

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
