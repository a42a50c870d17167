"""ZeRO-3 built sharded: the model is made under `deepspeed.zero.Init`, initialised and loaded one module at a time.

No rank ever holds all parameters: `zero.Init` partitions each submodule's parameters over the ranks as soon as
that submodule is constructed. What is unusual:
  * Initialisation is the dense model's (`OFAModel.init_steps`: the same functions, in the same order): for each
    step the module's own parameters are gathered (`GatheredParameters`, modifier rank 0), rank 0 initialises them
    and they are partitioned again. The values differ from a dense build (construction draws from the generator
    differently: ResNet's construction-time init sees empty partitions), the distribution per tensor is the same.
  * `--init` weights are read on rank 0 only, one module at a time, through a per-tensor reader
    (`ofa_ds.checkpoint.open_weights`: an official .pt is memory-mapped, so its tensors are paged in as they are
    copied; an exported folder's safetensors are read per tensor); every rank receives the module's values when
    its gathered parameters are partitioned again. Buffers (BatchNorm statistics) are broadcast from rank 0.
  * Keys are checked before anything is copied (`plan_load`: the accounting of `load_state_strict` on shapes);
    a mismatch raises the same CheckpointError on every rank (rank 0 decides, the others receive its message).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ofa_ds.config import ModelConfig
from ofa_ds.model import OFAModel
from ofa_ds.model.weights import DERIVED_BUFFERS, CheckpointError, TensorSource, check_bucket_tables, plan_load


@dataclass
class ShardedInit:
    """What a sharded build loads: the checkpoint's ModelConfig (every rank) and its tensor reader (rank 0 only)."""

    cfg: ModelConfig
    source: TensorSource | None
    path: str


def open_sharded_init(path: str, rank: int, **config_overrides) -> ShardedInit:
    """Rank 0 opens `path` (no tensor data read) and sends its ModelConfig to every rank; a checkpoint that cannot
    be opened raises the same CheckpointError on every rank."""
    from ofa_ds.checkpoint import open_weights
    cfg = source = err = None
    if rank == 0:
        try:
            cfg, source = open_weights(path, **config_overrides)
        except CheckpointError as e:
            err = str(e)
    box = [None if cfg is None else cfg.to_dict(), err]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    return ShardedInit(ModelConfig.from_dict(box[0], where=path), source, path)


def build_sharded(cfg: ModelConfig, ds_cfg: dict, init: ShardedInit | None = None) -> OFAModel:
    """OFAModel built under zero.Init with `ds_cfg` (its ZeRO-3 block and precision); initialised like the dense
    model, or loaded from `init` module by module."""
    import deepspeed
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")   # ResNet's own init, redone below
        model = OFAModel(cfg, init=False)
    if init is None:
        initialise(model)
    else:
        load_module_by_module(model, init)
    return model


def _own_params(m: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(m.parameters(recurse=False))


def initialise(model: OFAModel, only: set[int] | None = None) -> None:
    """Run `model.init_steps()` on a zero.Init model: each step's module gathered, set on rank 0, re-partitioned
    (`only`: the ids of the modules to initialise; None = all)."""
    import deepspeed
    rank = dist.get_rank()
    for m, fn in model.init_steps():
        own = _own_params(m)
        if not own or (only is not None and id(m) not in only):
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0), torch.no_grad():
            if rank == 0:
                fn(m)


def full_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict key -> full shape (a partitioned parameter's `ds_shape`), parameters under every name they have
    (the tied token table appears three times, as in the official layout)."""
    shapes = {}
    for mod_name, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in m.named_parameters(recurse=False):
            shapes[prefix + n] = tuple(getattr(p, "ds_shape", p.shape))
        for n, b in m.named_buffers(recurse=False):
            if n not in getattr(m, "_non_persistent_buffers_set", ()):
                shapes[prefix + n] = tuple(b.shape)
    return shapes


def load_module_by_module(model: OFAModel, init: ShardedInit) -> None:
    """Copy `init`'s tensors into the zero.Init model, one module at a time, read on rank 0 only."""
    import deepspeed
    rank = dist.get_rank()
    plan, err = None, None
    if rank == 0:
        try:
            plan = plan_load(full_shapes(model), init.source)
            check_bucket_tables(lambda k: None if plan.get(k) is None else init.source.get(plan[k]),
                                dict(model.named_buffers()), init.source.where)
        except CheckpointError as e:
            err = str(e)
    box = [err]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    fresh = [n for n, _ in model.named_parameters() if "_prompt_encoder." in n]
    if fresh:       # prompts the file may lack (decided on rank 0, the same on every rank): initialised first
        initialise(model, only={id(m) for n, m in model.named_modules() if "_prompt_encoder" in n})
    with torch.no_grad():
        for mod_name, m in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            own = dict(m.named_parameters(recurse=False))
            if own:
                with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0):
                    if rank == 0:
                        for n, p in own.items():
                            if plan[prefix + n] is not None:
                                p.data.copy_(init.source.get(plan[prefix + n]))
            for n, b in m.named_buffers(recurse=False):
                key = prefix + n
                if key in DERIVED_BUFFERS or n in getattr(m, "_non_persistent_buffers_set", ()):
                    continue                    # recomputed by the model (checked against the file above)
                if rank == 0:
                    b.copy_(init.source.get(plan[key]))
                dist.broadcast(b, src=0)

