"""Exponential moving average of the weights (OFA's VQA recipe: fairseq's EMA with --ema-fp32, docs/ofa.md#ema).

After every optimizer step that was applied (not skipped for an fp16/bf16 overflow, and with a finite loss), every
floating-point parameter and buffer t of the trained model updates its float32 shadow e:

    e <- decay * e + (1 - decay) * float32(t)        decay = 0 while updates < start_update, else `decay`

There is no warm-up and no bias correction; the shadow starts as the weights the run starts from (the --init
checkpoint or the fresh initialisation; on --resume the checkpoint's shadow). Non-float entries are not averaged.

What is unusual, per layout (what `t` is, and where the shadow lives):
  * ZeRO 0-2 ("replicated"): every rank holds the whole module, so every rank keeps the same whole shadow; rank 0
    writes it as `ema.pt` in the checkpoint folder.
  * ZeRO-3 ("partitioned"): a parameter's full tensor exists only while a module runs; what a rank owns between
    steps is its flat partition `param.ds_tensor`, which the optimizer writes after each step. Each rank keeps the
    shadow of exactly its partitions (no communication per step, 1/world of the memory, the same layout as
    DeepSpeed's own ZeRO-3 checkpoint) and writes `ema_rank<r>.pt`; gathering per module would cost an all-gather of
    the whole model every step. The consolidated EMA exists only on rank 0 at export. A resume needs the same world
    size (as DeepSpeed's ZeRO-3 checkpoint itself).
  * Pipeline ("pipeline"): each stage keeps the shadow of its own layers (data-parallel replicas keep equal copies);
    data-parallel rank 0 of stage s writes `ema_stage<s>.pt`, keyed by layer index like the pipeline's layer files.
  * Evaluation with the EMA (`swapped`) copies the shadow into the live weights (ZeRO-3: into the partitions, then
    re-gathers the persistent small parameters as DeepSpeed does after a step) and restores them afterwards.
  * `dense_state_from_checkpoint` rebuilds the official-name fp32 state dict from a checkpoint folder's EMA files on
    one process, without an engine: the export (`final/ema/`) and `launch/evaluate.py --ema` use it.
"""
from __future__ import annotations

import contextlib
import glob
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

EMA_FILES = ("ema.pt", "ema_rank*.pt", "ema_stage*.pt")


def _float_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """name -> parameter or floating buffer of `module` (tied tensors once, under their first name)."""
    out: dict[str, Tensor] = dict(module.named_parameters())
    out.update((n, b) for n, b in module.named_buffers() if b.is_floating_point() and "version" not in n)
    return out


def _local(t: Tensor) -> Tensor:
    """What this rank owns of `t`: the ZeRO-3 partition of a partitioned parameter, else the tensor itself."""
    return t.ds_tensor if hasattr(t, "ds_tensor") else t


class EMA:
    """The shadow weights of one rank; see the module docstring. `layout`: replicated, partitioned or pipeline."""

    def __init__(self, module: torch.nn.Module, decay: float, start_update: int = 0, layout: str = "replicated",
                 stage: int = 0, writer: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) when EMA is on, got {decay}")
        self.module, self.decay, self.start_update = module, decay, start_update
        self.layout, self.stage, self.writer = layout, stage, writer
        self.updates = 0
        self.shadow: dict[str, Tensor] = {}
        self.reset()

    # ---- the average -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Shadow = the current weights (fairseq: a checkpoint without EMA state starts the EMA from the model)."""
        self.shadow = {n: _local(t).detach().float().clone() for n, t in _float_tensors(self.module).items()}

    @torch.no_grad()
    def update(self, num_updates: int) -> None:
        """One EMA step after the optimizer step that brought the run to `num_updates` applied updates."""
        d = 0.0 if num_updates < self.start_update else self.decay
        for n, t in _float_tensors(self.module).items():
            s = self.shadow[n]
            s.mul_(d).add_(_local(t).detach().float(), alpha=1.0 - d)
        self.updates += 1

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def _file(self) -> str:
        if self.layout == "partitioned":
            return f"ema_rank{dist.get_rank()}.pt"
        return f"ema_stage{self.stage}.pt" if self.layout == "pipeline" else "ema.pt"

    def _payload(self) -> dict:
        p: dict = {"layout": self.layout, "decay": self.decay, "updates": self.updates, "shadow": self.shadow}
        if self.layout == "partitioned":
            tensors = _float_tensors(self.module)
            p["world"] = dist.get_world_size()
            p["full"] = {n: (tuple(t.ds_shape), int(t.ds_numel)) for n, t in tensors.items()
                         if hasattr(t, "ds_tensor")}
        if self.layout == "pipeline":
            from ofa_ds.training.pipeline import local_layers
            ids = {id(t): n for n, t in _float_tensors(self.module).items()}
            p["layers"] = {idx: {k: ids[id(v)] for k, v in m.state_dict(keep_vars=True).items() if id(v) in ids}
                           for idx, m in local_layers(self.module).items()}
        return p

    def save(self, folder: str) -> None:
        """Write this rank's part into a checkpoint folder (called before the checkpoint is marked complete)."""
        if self.writer:
            torch.save(self._payload(), os.path.join(folder, self._file()))

    def load(self, folder: str) -> bool:
        """Restore the shadow from a checkpoint folder; False (shadow left as is) when the folder has no EMA."""
        path = os.path.join(folder, self._file())
        if not os.path.isfile(path):
            if any(glob.glob(os.path.join(folder, f)) for f in EMA_FILES):
                raise RuntimeError(f"{folder} holds EMA weights of another layout than this run's ({self.layout}, "
                                   f"{path} missing): resume with the ZeRO stage / pipeline and world size it was "
                                   f"saved with")
            return False
        p = torch.load(path, map_location="cpu", weights_only=True)
        if p["layout"] != self.layout or (self.layout == "partitioned" and p["world"] != dist.get_world_size()):
            raise RuntimeError(f"{path}: EMA saved as {p['layout']} on {p.get('world', '?')} ranks; this run is "
                               f"{self.layout} on {dist.get_world_size()}: resume with the layout it was saved with")
        missing = sorted(set(self.shadow) ^ set(p["shadow"]))
        if missing:
            raise RuntimeError(f"{path}: EMA entries do not match the model ({missing[:5]})")
        for n, s in self.shadow.items():
            s.copy_(p["shadow"][n].to(s.device))
        self.updates = int(p["updates"])
        return True

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the live weights are the EMA (cast to the training dtype); restored exactly on exit."""
        tensors = _float_tensors(self.module)
        backup = {n: _local(t).detach().clone() for n, t in tensors.items()}
        try:
            with torch.no_grad():
                for n, t in tensors.items():
                    _local(t).copy_(self.shadow[n])
            self._regather(tensors)
            yield
        finally:
            with torch.no_grad():
                for n, t in tensors.items():
                    _local(t).copy_(backup[n])
            self._regather(tensors)

    @staticmethod
    def _regather(tensors: dict[str, Tensor]) -> None:
        """ZeRO-3 keeps small parameters gathered for good ("persistent"): refresh them from the partitions."""
        persist = [t for t in tensors.values() if getattr(t, "ds_persist", False)]
        if persist:
            persist[0].all_gather(persist)


def for_trainer(tr) -> EMA | None:
    """The EMA of a Trainer's engine for train.ema_decay > 0 (None when off)."""
    t = tr.run_cfg.train
    if t.ema_decay <= 0:
        return None
    if tr.strategy.name == "pipeline":
        s = tr.strategy
        return EMA(tr.engine.module, t.ema_decay, t.ema_start_update, "pipeline", stage=s.stage,
                   writer=s.dp_rank == 0)
    layout = "partitioned" if tr.zero == 3 else "replicated"
    return EMA(tr.engine.module, t.ema_decay, t.ema_start_update, layout, writer=layout == "partitioned" or
               tr.rank == 0)


def has_ema(folder: str) -> bool:
    return any(glob.glob(os.path.join(folder, f)) for f in EMA_FILES)


def dense_state_from_checkpoint(folder: str, cfg) -> dict[str, Tensor]:
    """The EMA as an official-name fp32 state dict (tied table under its first name only), read from the EMA files
    of one checkpoint folder (`<ckpt>/<tag>`). RuntimeError when the folder has none."""
    single = os.path.join(folder, "ema.pt")
    if os.path.isfile(single):
        return dict(torch.load(single, map_location="cpu", weights_only=True)["shadow"])
    ranks = sorted(glob.glob(os.path.join(folder, "ema_rank*.pt")), key=lambda p: int(p.rsplit("rank", 1)[1][:-3]))
    if ranks:
        parts = [torch.load(p, map_location="cpu", weights_only=True) for p in ranks]
        if len(parts) != parts[0]["world"]:
            raise RuntimeError(f"{folder}: {len(parts)} EMA partition files for a world of {parts[0]['world']}")
        out = {}
        for n, s in parts[0]["shadow"].items():
            if n in parts[0]["full"]:
                shape, numel = parts[0]["full"][n]
                out[n] = torch.cat([p["shadow"][n] for p in parts])[:numel].view(shape).clone()
            else:
                out[n] = s
        return out
    stages = glob.glob(os.path.join(folder, "ema_stage*.pt"))
    if stages:
        from ofa_ds.training.pipeline import pipe_state_to_dense
        layers: dict[int, dict[str, Tensor]] = {}
        for path in stages:
            p = torch.load(path, map_location="cpu", weights_only=True)
            for idx, names in p["layers"].items():
                layers[int(idx)] = {k: p["shadow"][n] for k, n in names.items()}
        return pipe_state_to_dense(cfg, layers)
    raise RuntimeError(f"{folder}: no EMA weights (train.ema_decay was 0 in the run that wrote it)")


@contextlib.contextmanager
def loaded_into(model: torch.nn.Module, folder: str, cfg) -> Iterator[None]:
    """Inside: `model` (a dense OFAModel) holds the EMA weights of checkpoint folder `folder`; restored on exit."""
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = ema_model(folder, cfg)
    model.load_state_dict(src.state_dict())
    del src
    try:
        yield
    finally:
        model.load_state_dict(backup)


def ema_model(folder: str, cfg):
    """An OFAModel (eval mode) holding the EMA weights of checkpoint folder `folder`."""
    from ofa_ds.model import OFAModel
    state = dense_state_from_checkpoint(folder, cfg)
    model = OFAModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"decoder.embed_tokens.weight", "decoder.output_projection.weight", "encoder.embed_tokens.weight"}
    bad = [k for k in missing if k not in tied and not k.endswith(("rp_bucket", "image_position_idx"))
           and "num_batches_tracked" not in k and "version" not in k]
    if bad or unexpected:
        raise RuntimeError(f"{folder}: the EMA weights do not match the model (missing {bad[:5]}, unexpected "
                           f"{unexpected[:5]})")
    return model.eval()
