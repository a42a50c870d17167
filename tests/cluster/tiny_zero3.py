"""A few ZeRO-3 steps of a tiny torch model: the smallest real job that proves a multi-node launch path.

Started by any launcher that DeepSpeed understands (the `deepspeed` runner with pdsh, OpenMPI, `--no_ssh` per-node
launch, or plain `deepspeed --num_gpus N` on one host). Every rank draws its own slice of a fixed global batch, so
the losses depend on the world size only, not on how the ranks are spread over hosts: a two-host run must print the
same losses as a one-host run with the same number of ranks. Rank 0 writes one JSON object per step to
`<out>/losses.jsonl` with the global mean loss, plus `<out>/world.json` saying which host each rank ran on.

    deepspeed --num_gpus 2 tests/cluster/tiny_zero3.py --out /tmp/x --steps 4
"""
import argparse
import json
import os
import socket
import sys

import deepspeed
import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert args.global_batch % world == 0, "global batch must divide by the world size"
    micro = args.global_batch // world
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"

    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.global_batch,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    gen = torch.Generator().manual_seed(99)
    w_true = torch.randn(16, 4, generator=gen)
    losses = []
    for step in range(args.steps):
        x = torch.randn(args.global_batch, 16, generator=gen)
        y = x @ w_true
        xs, ys = x[rank * micro:(rank + 1) * micro].to(device), y[rank * micro:(rank + 1) * micro].to(device)
        loss = torch.nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    hosts = [None] * world
    dist.all_gather_object(hosts, {"rank": rank, "host": socket.gethostname(),
                                   "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
                                   "ifname": os.environ.get("GLOO_SOCKET_IFNAME", "")})
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "losses.jsonl"), "w") as f:
            for step, value in enumerate(losses):
                f.write(json.dumps({"step": step + 1, "loss": value}) + "\n")
        with open(os.path.join(args.out, "world.json"), "w") as f:
            json.dump({"world_size": world, "ranks": hosts}, f)
        print("tiny_zero3 losses:", " ".join(f"{v:.6f}" for v in losses), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # a checkout too
    from ofa_ds.training.shutdown import exit_process
    main()
    exit_process(0)   # not a plain return: see ofa_ds.training.shutdown
