"""How a finished distributed worker leaves: `release_distributed` (ordered teardown), then `exit_process`.

The abort this guards against: after a successful two-rank ZeRO-3 run one rank sometimes died with "terminate
called without an active exception" (SIGABRT; exit 250 through the launcher). What was measured here: gloo runs
collectives on C++ threads (`pt_gloo_runloop`, two per process group, `gloo_tcp_loop`, and rank 0's TCPStore thread
`pt_tcpstore_uv`); all of them are still running after `destroy_process_group()` and after the engine's `destroy()`,
because DeepSpeed keeps its process groups reachable to the end (each ZeRO-3 parameter's `ds_process_group`, the
engine's and the optimizer's group attributes, `deepspeed.utils.groups`, the zero.Init context, hook closures). They
are therefore torn down during interpreter finalisation. There, CPython ends any thread that asks for the GIL with
pthread_exit; a gloo worker asks for it when it drops the last reference to a tensor that has a Python object (the
buffers of a collective it has just finished), and the forced unwinding then meets a noexcept C++ destructor, which
calls std::terminate: exactly that message. Work still in flight at the end makes it likely: ZeRO-3 prefetches
parameters with asynchronous all-gathers, and the last evaluation or checkpoint save leaves such work behind.

So the teardown (1) releases the engine while everything is alive: the ZeRO-3 all-gathers still in flight
(prefetches) are waited for (`ds_compat.wait_zero3_prefetches`) and DeepSpeed's `destroy()` removes the engine's
hooks; (2) lets every rank pass a barrier twice (gloo's barrier completes after all earlier work of its group; the
second one after the first is released), so no collective is in flight on any rank; (3) destroys the process groups;
(4) leaves with `os._exit`, so no gloo thread ever meets a finalising interpreter. Everything the job writes is
flushed and closed before that point. `benchmarks/bench_exit.py` counts rank exit codes over consecutive two-rank
ZeRO-3 runs (docs/scale.md has the figure).
"""
from __future__ import annotations

import gc
import logging
import os
import sys


def release_distributed(engine=None) -> None:
    """Ordered teardown of a finished distributed job (collective: every rank calls it): in-flight ZeRO-3
    all-gathers waited for, the engine's hooks removed, two barriers, every process group destroyed. No-op without
    a process group."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if engine is not None:
        from ofa_ds.training.ds_compat import wait_zero3_prefetches
        wait_zero3_prefetches(engine)   # ZeRO-3 all-gathers issued ahead of a forward that never came
        destroy = getattr(engine, "destroy", None)
        if destroy is not None:
            destroy()                   # ZeRO-3: module and gradient hooks removed
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
