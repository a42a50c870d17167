"""The dense strategy: the whole OFAModel in one DeepSpeed engine on every rank (data parallel, ZeRO 0-3).

What is unusual:
  * Loss normalisation is fairseq's, not DeepSpeed's: the summed token losses of all micro-batches on all ranks are
    divided by their summed sample size (tokens, or 1 per pretraining (v1, v2) pair). The sample sizes of a step are
    all-reduced before the first backward; each micro-batch's loss is scaled by world * accum / total so that
    DeepSpeed's averaging over ranks and accumulation lands exactly on sum(grad loss) / sum(sample_size).
  * ZeRO-3 gathers parameters per module call, so every rank must call the same modules the same number of times:
    `code_masks` is always a tensor (the model then runs both decoder variants), image tasks always carry images
    (the collater fills text-only samples with zeros and patch_masks False), and when ranks disagree on whether a
    micro-batch is a (v1, v2) pair the ranks with fewer parts repeat a forward with weight 0.
  * A micro-batch whose loss is not finite on any rank contributes zero gradient on every rank (the same graph still
    runs, so collectives stay matched) and counts as a skipped step.
  * The forward returns packed logits of the real target positions only (`OFAModel.forward(keep=...)`): the tied
    output projection is not spent on padding.
  * Held-out evaluation runs on the engine's module on every rank (each rank its shard, records gathered).
  * With ZeRO-3 the model is built under deepspeed.zero.Init, initialised and --init-loaded one module at a time
    (`training/zero3.py`).
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from ofa_ds.losses import pair_loss
from ofa_ds.model import OFAModel
from ofa_ds.training.checkpoints import consolidated_state_dict
from ofa_ds.training.ds_config import build_ds_config, raw_ds_config, zero_stage
from ofa_ds.training.engine import all_reduce
from ofa_ds.training.evaluate import net_input, to_device
from ofa_ds.training.objective import MicroSizes, batch_loss, parts_of
from ofa_ds.training.zero3 import ShardedInit, build_sharded


class DenseStrategy:
    name = "dense"
    shard_copies = 1
    """How many ranks read the same data shard."""

    def check(self, world: int | None) -> None:
        """Nothing to check: any world size works."""

    def build(self, tr, init: OFAModel | ShardedInit | None) -> torch.nn.Module:
        sharded = isinstance(init, ShardedInit) or zero_stage(raw_ds_config(tr.run_cfg.ds_config)) == 3
        if sharded:
            # built under zero.Init (its ZeRO-3 block and precision from the resolved config): no rank ever holds
            # all parameters
            cfg = build_ds_config(tr.run_cfg.ds_config, tr.run_cfg, tr.world)
            model = build_sharded(tr.model_cfg, cfg, init).train()
        else:
            model = OFAModel(tr.model_cfg) if init is None else init.train()
        if tr.run_cfg.train.freeze_embeddings:
            model.encoder.embed_tokens.weight.requires_grad_(False)
        if tr.run_cfg.train.activation_checkpointing:
            from ofa_ds.training.activation_checkpoint import set_activation_checkpointing
            n = set_activation_checkpointing(model, True)
            if tr.rank == 0:
                print(f"activation checkpointing on {n} layers", file=sys.stderr, flush=True)
        if tr.run_cfg.train.compile:
            from ofa_ds.training.compile import compile_model
            compile_model(model, tr.device, zero3=sharded)
        return model

    def data_shard(self, tr) -> tuple[int, int]:
        return tr.rank, tr.world

    def eval_shard(self, tr) -> tuple[int, int]:
        return tr.rank, tr.world

    def ds_configs(self, tr, run) -> tuple[dict, dict]:
        """(the resolved ds_config recorded in the run folder, the one handed to the engine): the same here."""
        cfg = build_ds_config(run.ds_config, run, tr.world)
        return cfg, cfg

    def attach(self, tr) -> None:
        """Nothing to hook into the engine."""

    # ---- one step --------------------------------------------------------------------------------------------------
    def _forward(self, tr, batch: Any, n_parts: int):
        parts = list(parts_of(batch))
        spn = tr.run_cfg.train.sample_patch_num or None
        outs, logits_all = [], []
        for j in range(n_parts):
            b = parts[min(j, len(parts) - 1)]
            ni = net_input(b)
            if ni["code_masks"] is None:
                ni["code_masks"] = torch.zeros(b["src_tokens"].shape[0], dtype=torch.bool, device=tr.device)
            keep = b["target"].ne(1) if j < len(parts) else None       # packed logits of real targets
            logits = tr.engine(**ni, sample_patch_num=spn if (len(parts) == 2 and j == 0) else None, keep=keep)
            logits_all.append(logits)
            if j < len(parts):
                outs.append(batch_loss(tr.run_cfg.train, logits, b, tr.step + 1))
        out = pair_loss(*outs) if len(outs) == 2 else outs[0]
        return out, logits_all

    def train_step(self, tr, micro: list[Any], sizes: list[MicroSizes]) -> tuple[float, float, float, int]:
        """Forward/backward/step of one optimizer step: (global loss sum, nll sum, sample size, bad micro-batches)."""
        gas, world = len(micro), tr.world
        total_size, = all_reduce([sum(s.size for s in sizes)])
        n_parts = [int(x) for x in all_reduce([s.parts for s in sizes], dist.ReduceOp.MAX)]
        loss_sum = nll_sum = 0.0
        bad = 0
        tr.grad_norm = None
        for k, (b, n) in enumerate(zip(micro, n_parts)):
            b = to_device(b, tr.device, tr.dtype)
            out, logits = self._forward(tr, b, n)
            finite, = all_reduce([float(torch.isfinite(out.loss).item())], dist.ReduceOp.MIN)
            if finite:
                loss = out.loss * (world * gas / max(total_size, 1e-9))
                loss_sum += float(out.loss.detach())
                nll_sum += float(out.nll)
            else:
                loss = out.loss.new_zeros(())
                bad += 1
            extra = logits[len(b) if isinstance(b, tuple) else 1:]
            zero = sum((0.0 * x.float().sum() for x in (logits if not finite else extra)), out.loss.new_zeros(()))
            tr.engine.backward(loss + zero)
            if k == gas - 1 and tr.zero == 0:        # DeepSpeed reports no norm without ZeRO: measure it
                gs = [p.grad.detach().float() for p in tr.engine.module.parameters() if p.grad is not None]
                tr.grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))) if gs else 0.0
            tr.engine.step()
        loss_sum, nll_sum = all_reduce([loss_sum, nll_sum])
        return loss_sum, nll_sum, total_size, bad

    # ---- evaluation and export -------------------------------------------------------------------------------------
    def eval_model(self, tr) -> tuple[torch.nn.Module | None, torch.dtype, bool]:
        """(model, dtype, sharded): every rank evaluates its shard of the held-out sets with the engine's module."""
        return tr.engine.module, tr.dtype, True

    def finish(self, tr, last_tag: str | None) -> None:
        """Nothing to do between the last step and the final evaluation."""

    def export(self, tr, tag: str) -> None:
        """<out>/final/: consolidated fp32 state dict (consolidated_fp32.pt) + HF-style folder (from_pretrained)."""
        sd = consolidated_state_dict(tr.engine, tr.ckpt_dir, tag)
        if tr.rank == 0:
            from ofa_ds.checkpoint import export_folder
            final = os.path.join(tr.out, "final")
            os.makedirs(final, exist_ok=True)
            model = OFAModel(tr.model_cfg)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            tied = {"decoder.embed_tokens.weight", "decoder.output_projection.weight", "encoder.embed_tokens.weight"}
            real_missing = [k for k in missing if k not in tied and not k.endswith(("rp_bucket", "image_position_idx"))]
            if real_missing or unexpected:
                raise RuntimeError(f"consolidated state dict does not match the model: missing {real_missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
            torch.save(model.state_dict(), os.path.join(final, "consolidated_fp32.pt"))
            export_folder(model, final)
        dist.barrier()

    def facts(self, tr) -> dict[str, Any]:
        return {}
