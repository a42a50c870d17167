"""`exit_process`: how a finished distributed worker leaves (no deepspeed import here).

It ends the process with `os._exit` instead of returning to the interpreter. A DeepSpeed engine stays reachable
after `del` (its bound methods sit in autograd-hook lists), so its gloo process groups, and their worker threads,
outlive `destroy_process_group()` and are torn down during interpreter shutdown; in 1 of 12 two-rank launches
measured here one rank then aborted with "terminate called without an active exception" (exit -6, or 250 through a
shell) after a run that succeeded, and the launcher reported the job as failed. Everything the job writes is flushed
and closed before that point, so the worker flushes stdio and logging and leaves without the interpreter's teardown.
"""
from __future__ import annotations

import logging
import os
import sys


def exit_process(code: int | None = 0) -> None:
    """Leave a finished (distributed) worker with exit status `code` (None = 0), skipping interpreter teardown.
    Call it from a script's `__main__` block only, after its outputs are closed: it flushes stdio and logging,
    destroys the default process group if one is up, and calls os._exit (see the module header for why)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(int(code or 0))
