"""The one place where ofa_ds reaches into DeepSpeed internals (anything not in DeepSpeed's public API).

Today that is a single hook: the pipeline strategy with ZeRO-0 must measure the gradient norm over all pipeline
stages and clip before the optimizer step, because DeepSpeed's fp32 clipping under a pipeline grid counts only stage
0's gradients. `PipelineEngine` has no public hook there; it dispatches each schedule instruction through the class
attribute `_INSTRUCTION_MAP` (instruction type -> method), so the engine instance gets its own copy of that map with
the OptimizerStep entry wrapped.

Internals move between DeepSpeed releases, so the adapter checks the installed version against the range it was
written for and fails with a message naming both, instead of misbehaving silently on another layout.
"""
from __future__ import annotations

from typing import Callable

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
