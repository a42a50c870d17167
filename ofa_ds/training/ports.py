"""Small process helpers shared by the trainer, the tests and the benchmarks (no deepspeed import here).

Unusual:
* `remove_shm_buffers` exists because DeepSpeed's CPU shared-memory all-reduce leaves one ~66 MB /dev/shm file
  per rank and job (RAM, never freed); jobs started on a known port can remove theirs afterwards.
* `exit_process` ends a finished distributed worker with `os._exit`. A DeepSpeed engine stays reachable after
  `del` (its bound methods sit in autograd-hook lists), so its gloo process groups, and their worker threads,
  outlive `destroy_process_group()` and are torn down during interpreter shutdown; in 1 of 12 two-rank launches
  measured here one rank then aborted with "terminate called without an active exception" (exit -6, or 250
  through a shell) after a run that succeeded, and the launcher reported the job as failed. Everything the job
  writes is flushed and closed before that point, so the worker flushes stdio and logging and leaves without the
  interpreter's teardown."""
from __future__ import annotations

import glob
import logging
import os
import socket
import sys


def free_port() -> int:
    """A TCP port nothing listens on now (a fixed or pid-derived port can collide with another job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remove_shm_buffers(port: int) -> None:
    """Remove the /dev/shm all-reduce buffers of the DeepSpeed job that used master port `port`."""
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(f)
        except OSError:
            pass


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
