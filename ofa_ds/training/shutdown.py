"""How a finished distributed worker leaves: `release_distributed` (ordered teardown), then `exit_process`.

Why a rank could abort after a successful run ("terminate called without an active exception", SIGABRT, exit 250
through the launcher): gloo runs each collective on its own C++ worker threads (`pt_gloo_runloop`, two per process
group, plus `gloo_tcp_loop` and rank 0's TCPStore thread `pt_tcpstore_uv`). A worker that finishes a collective
drops the work's tensors, and dropping the last reference to a tensor that has a Python object takes the GIL. A
DeepSpeed engine, its ZeRO-3 parameters (each carries `ds_process_group`) and its process groups stay reachable to
the end (hook closures, deepspeed.utils.groups, deepspeed.comm), so `destroy_process_group()` joins none of those
threads; they are still running when the interpreter finalises. A worker that then asks for the GIL is ended by
CPython with pthread_exit, whose forced unwinding reaches a noexcept C++ destructor (the work's) and calls
std::terminate: the message above, from whichever rank lost the race. Collectives still in flight at the end make
it likely: ZeRO-3 prefetches the next modules' parameters asynchronously, and the last evaluation or save leaves
such work behind.

The teardown therefore (1) releases the engine while everything is alive: DeepSpeed's `destroy()` removes the
ZeRO-3 hooks and hands back every gathered or prefetched parameter (waiting for its all-gather), (2) lets every
rank reach a barrier twice (gloo's barrier waits for all earlier work of its group; the second one for the first's
release), so that no collective is in flight on any rank, (3) destroys the process groups, and (4) leaves with
`os._exit`, skipping interpreter finalisation, where gloo's threads would meet a dying interpreter. Everything the
job writes is flushed and closed before that point. benchmarks/bench_exit.py counts rank exit codes over many
two-rank ZeRO-3 runs (docs/scale.md has the figure).
"""
from __future__ import annotations

import gc
import logging
import os
import sys


def release_distributed(engine=None) -> None:
    """Ordered teardown of a finished distributed job (collective: every rank calls it): the engine's hooks and
    gathered parameters released, two barriers, every process group destroyed. No-op without a process group."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if engine is not None:
        destroy = getattr(engine, "destroy", None)
        if destroy is not None:
            destroy()                   # ZeRO-3: hooks removed, in-flight / prefetched all-gathers waited and freed
    gc.collect()                        # work handles and tensors dropped here, on this thread, with the GIL
    dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def exit_process(code: int | None = 0) -> None:
    """Leave a finished (distributed) worker with exit status `code` (None = 0), skipping interpreter teardown.
    Call it from a script's `__main__` block only, after its outputs are closed and `release_distributed` ran: it
    flushes stdio and logging, destroys the default process group if one is still up, and calls os._exit (see the
    module header for why)."""
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
