"""Master-port helpers for jobs started on one machine (the trainer, the tests and the benchmarks).

Standard library only. `remove_shm_buffers` exists because DeepSpeed's CPU shared-memory all-reduce leaves one
~66 MB /dev/shm file per rank and job (RAM, never freed); a job started on a known master port can remove its own
afterwards.
"""
from __future__ import annotations

import glob
import os
import socket


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
