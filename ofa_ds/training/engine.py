"""The DeepSpeed engine boundary: process group start, `deepspeed.initialize` with OFA's optimizer and schedule,
and the engine's loss scale / gradient norm read back for logging.

Without a scheduler block (the shipped configs) the learning rate follows OFA's polynomial decay with linear warmup,
implemented as a torch LambdaLR handed to deepspeed.initialize (it is saved and restored with the checkpoint).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import deepspeed

from ofa_ds.cluster.ports import free_port
from ofa_ds.training.ds_compat import one_rank_backend
from ofa_ds.training.ds_config import zero_stage


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """Sum (or `op`) of a few floats over all ranks, in float64; the values themselves without a process group."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, nccl on GPU) if the launcher set one up; (rank, world, device)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world_env = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "0"
    with one_rank_backend(int(world_env)):                # one rank: DeepSpeed's shm all-reduce op is not built
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def polynomial_lambda(max_steps: int, warmup: int, lr: float, end_lr: float, power: float):
    """OFA's polynomial_decay as a LambdaLR factor: linear warmup from 0, then (lr−end)·(1−p)^power + end."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        if step >= max_steps or lr == 0:
            return end_lr / lr if lr else 0.0
        frac = 1.0 - (step - warmup) / max(1, max_steps - warmup)
        return ((lr - end_lr) * frac ** power + end_lr) / lr
    return f


def initialize(model: torch.nn.Module, run, ds_cfg: dict):
    """deepspeed.initialize with DeepSpeed's own Adam (fused on GPU, CPU Adam with offload) and OFA's schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    sched = None
    if "scheduler" not in ds_cfg:
        t = run.train
        fn = polynomial_lambda(t.max_steps, t.warmup, t.lr, t.end_lr, t.lr_power)
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn)  # noqa: E731
    if not torch.cuda.is_available() and not _uses_cpu_adam(ds_cfg):
        # FusedAdam is a CUDA kernel; plain CPU runs without offload use torch's AdamW (same update rule) in its
        # fused CPU form: DeepSpeed's torch_adam path would otherwise build the per-tensor loop (torch picks foreach
        # only for CUDA tensors), measured 4.8x slower on OFA-Tiny (benchmarks/bench_optimizer.py).
        ds_cfg = copy.deepcopy(ds_cfg)
        ds_cfg["optimizer"]["params"]["torch_adam"] = True
        if _cpu_fused_adamw_available():                   # torch >= 2.4; older builds keep the loop
            ds_cfg["optimizer"]["params"].setdefault("fused", True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_cfg, lr_scheduler=sched)
    if dist.get_world_size() == 1 and zero_stage(ds_cfg) == 0:
        # One rank: the backward all-reduce is an identity (sum over one rank, divided by 1) that still flattens
        # and copies every gradient, ~50 ms of a ~460 ms default-run step on 2 CPU cores (cProfile). Skip it.
        engine.enable_backward_allreduce = False
    return engine


def _cpu_fused_adamw_available() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def _uses_cpu_adam(ds_cfg: dict) -> bool:
    z = ds_cfg.get("zero_optimization", {})
    dev = (z.get("offload_optimizer") or {}).get("device", "none")
    return dev in ("cpu", "nvme") and zero_stage(ds_cfg) > 0


def loss_scale(engine) -> float:
    opt = getattr(engine, "optimizer", None)
    for name in ("cur_scale", "loss_scale"):
        v = getattr(opt, name, None)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, torch.Tensor):
            return float(v)
    return 1.0


def grad_norm(engine) -> float | None:
    v = engine.get_global_grad_norm()
    if v is None:
        return None
    return float(v)
