"""The one place where ofa_ds reaches into DeepSpeed internals (anything not in DeepSpeed's public API).

Three hooks.
  * `one_rank_backend`: on CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op
    (`deepspeed_shm_comm`, C++ built with ninja on first use: 1-4 minutes on two cores, a large part of a fresh
    install's first default run) when the process group starts, whatever the world size. A one-rank run never
    all-reduces between processes, so there DeepSpeed's `build_shm_op` is made to return None (what it returns
    itself where the op is unsupported; torch.distributed's collectives are used then).
  * `before_optimizer_step`: the pipeline strategy with ZeRO-0 must measure the gradient norm over all pipeline
    stages and clip before the optimizer step, because DeepSpeed's fp32 clipping under a pipeline grid counts only
    stage 0's gradients. `PipelineEngine` has no public hook there; it dispatches each schedule instruction through
    the class attribute `_INSTRUCTION_MAP` (instruction type -> method), so the engine instance gets its own copy of
    that map with the OptimizerStep entry wrapped.
  * `wait_zero3_prefetches`: at the end of a ZeRO-3 job, wait for the parameter all-gathers ZeRO-3 issued ahead of
    use (its coordinator keeps their handles in a private registry), so that no collective is in flight when the
    job tears down (training/shutdown.py).

Internals move between DeepSpeed releases, so the adapter checks the installed version against the range it was
written for and fails with a message naming both, instead of misbehaving silently on another layout.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator

KNOWN_VERSIONS = ((0, 14), (0, 19))
"""Inclusive (major, minor) range of DeepSpeed releases whose PipelineEngine dispatch this adapter matches; setup.py
pins the same range, so an install never brings an unknown one."""


def _version() -> tuple[int, int]:
    import deepspeed

    parts = deepspeed.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (-1, -1)


def check_version() -> None:
    """Raise RuntimeError unless the installed DeepSpeed is in KNOWN_VERSIONS."""
    import deepspeed

    lo, hi = KNOWN_VERSIONS
    if not lo <= _version() <= hi:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} is outside the range {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} that "
            f"ofa_ds/training/ds_compat.py was written for (it wraps PipelineEngine._INSTRUCTION_MAP for ZeRO-0 "
            f"pipeline clipping). Install a DeepSpeed in that range, or use a ZeRO-1 pipeline config "
            f"(ds_configs/pipeline_2stage_*.json), which does not need the hook.")


def before_optimizer_step(engine, hook: Callable[[object], None]) -> None:
    """Make the PipelineEngine `engine` call `hook(engine)` right before each OptimizerStep instruction."""
    check_version()
    from deepspeed.runtime.pipe import schedule

    table = getattr(type(engine), "_INSTRUCTION_MAP", None)
    if not isinstance(table, dict) or schedule.OptimizerStep not in table:
        raise RuntimeError(f"{type(engine).__name__} has no _INSTRUCTION_MAP entry for OptimizerStep; "
                           f"ofa_ds/training/ds_compat.py does not match this DeepSpeed")
    step = table[schedule.OptimizerStep]

    def optimizer_step(eng, *args, **kwargs):
        hook(eng)
        return step(eng, *args, **kwargs)

    engine._INSTRUCTION_MAP = {**table, schedule.OptimizerStep: optimizer_step}


@contextlib.contextmanager
def one_rank_backend(world_size: int) -> Iterator[None]:
    """Inside: DeepSpeed's CPU backend skips building its shared-memory all-reduce op when `world_size` is 1 (the op
    only speeds up collectives between processes of one node). Does nothing for larger worlds, or when the installed
    DeepSpeed has no `deepspeed.comm.torch.build_shm_op`."""
    try:                               # `from deepspeed.comm import torch` would give the torch package itself
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        ds_torch_comm = None
    if world_size != 1 or ds_torch_comm is None or not hasattr(ds_torch_comm, "build_shm_op"):
        yield
        return
    build = ds_torch_comm.build_shm_op
    ds_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_comm.build_shm_op = build


def wait_zero3_prefetches(engine) -> int:
    """Wait for every asynchronous ZeRO-3 parameter all-gather still registered as in flight (prefetched ahead of a
    forward that never came); returns how many there were. A no-op for other stages and other layouts."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    registry = getattr(coordinator, "_PartitionedParameterCoordinator__inflight_param_registry", None)
    if not registry:
        return 0
    n = 0
    for param in list(registry):
        registry.pop(param).wait()
        n += 1
    return n
