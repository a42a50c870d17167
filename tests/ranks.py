"""Run a test worker on several CPU ranks (spawned processes, gloo) and collect what each rank reports."""
import socket

import torch.multiprocessing as mp


def run_ranks(worker, *args, world: int = 2, timeout: float = 300) -> dict:
    """Start `worker(rank, port, *args, queue)` on `world` spawned processes; {rank: result} from each rank's
    `queue.put((rank, result))`. Every process must exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return res
