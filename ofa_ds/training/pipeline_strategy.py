"""The pipeline strategy: OFA as a DeepSpeed PipelineModule (`training/pipeline.py`), chosen by the Trainer when the
run's DeepSpeed JSON has a "pipeline" block {"stages", "partition", "activation_checkpoint_interval"}. Same command
line, loop, metric names, checkpoints, `--resume`, `final/` export and final held-out evaluation as the dense
strategy. What differs:

  * Model: `build_pipeline` with the block's stage count / partition method / activation checkpointing (also on
    with train.activation_checkpointing). `--init` weights are read on every rank and copied into the local stage.
    A fresh pipeline is initialised like the dense model (same distributions, not the same numbers: each stage draws
    its own layers).
  * Ranks: world = stages x data-parallel replicas (DeepSpeed's topology). All stages of a replica read the same
    data shard (sharded by data-parallel rank): the first stage needs the inputs, the last one the targets, and every
    stage needs the step's sample sizes for the normalisation.
  * Micro-batches: each of the train.grad_accum batches of a step becomes P pipeline micro-batches, P = 2 when the
    task can produce pretraining (v1, v2) pairs (pretrain with text/image/detection extras), else 1; DeepSpeed's
    gradient_accumulation_steps = grad_accum x P (the resolved ds_config.json shows it). A batch that is not a pair
    fills its second slot with one text-only row of itself at weight 0 (no ResNet call, so BatchNorm statistics do
    not move); fixed shapes of the schedule are not needed (dynamic_shape).
  * Loss: the labels of micro-batch k are just `tensor([k])`; the PipelineModule's loss function (`StepLoss`, on the
    last stage) looks the k-th entry up in the step's table (the batch dict, weight w, pair flag) and applies the
    same `objective.batch_loss` as the dense strategy. It returns loss * w, or loss / ntokens * w for a pair part,
    with w = dp * gas / (the step's global sample size, pair = 1): after DeepSpeed's 1/gas scaling and data-parallel
    averaging the gradient is sum(loss) / sum(sample_size) over the step, and a pair contributes
    loss_v1/n_v1 + loss_v2/n_v2, exactly `losses.pair_loss`. A non-finite part contributes zero gradient and counts
    as a skipped step (the dense strategy zeroes the whole pair; here only the bad part).
  * Gradient norm and clipping: ZeRO-1 computes the norm over all stages itself (tied table counted once). With
    ZeRO-0 DeepSpeed's fp32 clipping counts only stage 0's gradients (it keeps model-parallel rank 0, which is the
    stage index under a pipeline grid), so for ZeRO-0 DeepSpeed is given gradient_clipping 0 and a hook before the
    optimizer step (`ds_compat.before_optimizer_step`) computes the norm over all stages (tied table once) and
    applies DeepSpeed's own clip rule, coef = min(1, clip / (norm + 1e-6)). ZeRO-0 + bf16/fp16 clipping is left to
    DeepSpeed's mixed-precision optimizers (the shipped pipeline configs are ZeRO-1).
  * Evaluation and export run on a dense fp32 `OFAModel` on global rank 0 (all held-out batches; the other ranks
    wait). At the end the engine is released first and rank 0 reads the final checkpoint's layer files
    (`universal.pipeline_checkpoint_to_dense`), so the peak is the dense model, not engine + model; a mid-run
    evaluation (eval_every) or a run without a final checkpoint gathers the stages' weights with
    `pipeline.gather_dense_state` instead.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ofa_ds.config import RunConfig
from ofa_ds.model import OFAModel
from ofa_ds.training import pipeline
from ofa_ds.training.checkpoints import tag_for
from ofa_ds.training.ds_compat import before_optimizer_step
from ofa_ds.training.ds_config import ConfigMismatch, build_ds_config, raw_ds_config, zero_stage
from ofa_ds.training.engine import all_reduce
from ofa_ds.training.evaluate import to_device
from ofa_ds.training.objective import MicroSizes, batch_loss, parts_of


def has_pipeline_block(ds: str | dict | None) -> bool:
    return bool(raw_ds_config(ds).get("pipeline"))


def check_pipeline_config(ds: dict, where: str, world: int | None = None) -> None:
    """ZeRO-2/3 cannot be combined with a pipeline (DeepSpeed's PipelineEngine asserts stage < 2); the stage count
    must divide the world size. Raises ConfigMismatch naming the file and the values."""
    z = zero_stage(ds)
    block = json.dumps(ds.get("pipeline"), sort_keys=True)
    if z >= 2:
        raise ConfigMismatch(
            f"{where}: zero_optimization.stage = {z} together with a \"pipeline\" block {block}; DeepSpeed's "
            f"pipeline engine supports ZeRO stage 0 or 1 only. Use ds_configs/pipeline_2stage_*.json (ZeRO-1) for "
            f"pipeline parallelism, or remove the \"pipeline\" block to train the dense model with ZeRO-{z}.")
    n = pipeline.pipeline_settings(ds)["num_stages"]
    if n < 1 or (world is not None and world % n):
        raise ConfigMismatch(f"{where}: pipeline.stages = {n} does not divide the world size {world} "
                             f"(launch stages x data-parallel replicas ranks)")


def can_pair(run: RunConfig) -> bool:
    """Whether the training data can produce pretraining (v1, v2) pairs."""
    d = run.data
    return d.task == "pretrain" and bool(d.text_data or d.image_data or d.detection_data)


def _filler(b: dict) -> dict:
    """One text-only row of batch `b`: the unused second slot of a step whose batch is not a pair (weight 0)."""
    one = {k: b[k][:1] for k in ("src_tokens", "prev_output_tokens", "target")}
    return {**one, "patch_images": None, "patch_masks": None, "code_masks": None,
            "ntokens": int(one["target"].ne(1).sum()), "nsentences": 1}


class StepLoss:
    """loss_fn of the PipelineModule: labels = tensor([k]) -> entry k of the current step's table (see the header)."""

    __name__ = "ofa_step_loss"

    def __init__(self, strategy: "PipelineStrategy", tr):
        self.strategy, self.tr = strategy, tr
        self.table: list[tuple[dict, float, bool]] = []
        self.sums = [0.0, 0.0, 0.0]

    def begin(self, table: list[tuple[dict, float, bool]]) -> None:
        self.table, self.sums = table, [0.0, 0.0, 0.0]

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        k = int((labels[0] if isinstance(labels, (tuple, list)) else labels).reshape(-1)[0])
        b, w, pair = self.table[k]
        out = batch_loss(self.tr.run_cfg.train, logits, b, self.tr.step + 1)
        finite = float(torch.isfinite(out.loss).item())
        s = self.strategy
        if s.dp > 1:        # the same decision on every replica (the dense strategy all-reduces it too)
            t = torch.tensor([finite], device=out.loss.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=s.dp_group)
            finite = float(t.item())
        if not finite:
            self.sums[2] += float(w > 0)
            return logits.float().sum() * 0.0
        scale = 1.0 / max(out.ntokens, 1) if pair else 1.0
        if w > 0:
            self.sums[0] += float(out.loss.detach()) * scale
            self.sums[1] += float(out.nll) * scale
        return out.loss * (scale * w)


class PipelineStrategy:
    name = "pipeline"

    def __init__(self, run: RunConfig):
        self.where = run.ds_config if isinstance(run.ds_config, str) else "ds_config"
        self.raw = raw_ds_config(run.ds_config)
        self.settings = pipeline.pipeline_settings(self.raw)
        self.stages = self.shard_copies = self.settings["num_stages"]
        self.parts_per_batch = 2 if can_pair(run) else 1
        self.dense: OFAModel | None = None       # rank 0's dense model for evaluation/export once training is over
        self.enc_embed = None
        self.clip = 0.0
        self.prompts = run.train.prompt_tuning.enabled

    def check(self, world: int | None) -> None:
        check_pipeline_config(self.raw, self.where, world)
        if self.prompts:
            raise ConfigMismatch(f"{self.where}: a \"pipeline\" block together with train.prompt_tuning; the pipeline "
                                 f"stages have no prompt encoders. Prompt-tune with the dense strategy (ZeRO 0-3).")

    def build(self, tr, init: OFAModel | None) -> torch.nn.Module:
        from ofa_ds.model.prompt import has_prompts
        if has_prompts(tr.model_cfg):
            raise ConfigMismatch(f"{self.where}: the model has prompt-tuning prompts (from --init); the pipeline "
                                 f"stages have none. Train it with the dense strategy (ZeRO 0-3).")
        if tr.run_cfg.train.compile:
            raise ConfigMismatch(f"{self.where}: a \"pipeline\" block together with train.compile=true; compiling is "
                                 "implemented for the dense strategy only (ZeRO 0-3). Set train.compile=false.")
        dense_state = None if init is None else init.state_dict()
        self.loss_fn = StepLoss(self, tr)
        module = pipeline.build_pipeline(tr.model_cfg, num_stages=self.stages, loss_fn=self.loss_fn,
                                         partition_method=self.settings["partition_method"],
                                         activation_checkpointing=(self.settings["activation_checkpointing"]
                                                                   or tr.run_cfg.train.activation_checkpointing))
        if dense_state is not None:
            pipeline.load_dense_into_pipeline(module, dense_state, tr.model_cfg)
            del dense_state
        if tr.run_cfg.train.freeze_embeddings:
            self._freeze_tied_table(module)
        self.enc_embed = next((m for m in module.modules() if isinstance(m, pipeline.EncoderEmbedPipe)), None)
        grid = module.mpu()
        self.stage, self.dp_rank = grid.get_stage_id(), grid.get_data_parallel_rank()
        self.dp, self.dp_group = grid.get_data_parallel_world_size(), grid.get_data_parallel_group()
        if tr.rank == 0:
            print(f"pipeline: {self.stages} stages x {self.dp} data-parallel, layer bounds {module.parts}",
                  flush=True)
        return module

    @staticmethod
    def _freeze_tied_table(module) -> None:
        """Frozen token table: no gradient, so nothing to all-reduce between its first and last stage."""
        if pipeline.TIED_KEY in module.tied_modules:
            for p in module.tied_modules[pipeline.TIED_KEY].parameters():
                p.requires_grad_(False)
        module.tied_comms.pop(pipeline.TIED_KEY, None)

    def data_shard(self, tr) -> tuple[int, int]:
        return self.dp_rank, self.dp

    def eval_shard(self, tr) -> tuple[int, int]:
        return 0, 1                                   # evaluated by global rank 0 alone

    def ds_configs(self, tr, run: RunConfig) -> tuple[dict, dict]:
        """(recorded, engine) ds_configs; DeepSpeed's accumulation counts pipeline micro-batches (grad_accum x P)."""
        self.gas = run.train.grad_accum * self.parts_per_batch
        run_gas = dataclasses.replace(run, train=dataclasses.replace(run.train, grad_accum=self.gas))
        cfg = build_ds_config(run.ds_config, run_gas, self.dp)
        engine_cfg = cfg
        if zero_stage(cfg) == 0 and tr.precision == "fp32":
            self.clip = float(cfg.get("gradient_clipping", 0.0) or 0.0)
            engine_cfg = {**cfg, "gradient_clipping": 0.0}      # clipped in _clip_before_step
        return cfg, engine_cfg

    def attach(self, tr) -> None:
        if tr.zero == 0:
            before_optimizer_step(tr.engine, lambda engine: self._clip_before_step(tr, engine))

    def _clip_before_step(self, tr, engine) -> None:
        """ZeRO-0: the gradient norm over all stages (tied table once), then DeepSpeed's clip rule."""
        params = [p for p in engine.module.parameters() if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64, device=tr.device)
        for p in params:
            if not getattr(p, "ds_pipe_replicated", False):
                sq += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=engine.grid.get_model_parallel_group())    # the stages of this replica
        norm = float(sq.sqrt())
        tr.grad_norm = norm
        if self.clip > 0:
            coef = min(1.0, self.clip / (norm + 1e-6))
            for p in params:
                p.grad.mul_(coef)

    # ---- one step --------------------------------------------------------------------------------------------------
    def _feed(self, feed: list) -> Iterator[tuple]:
        """The step's micro-batches for engine.train_batch. Stage 0 runs ForwardPass(k) right after loading k, so
        the patch sampling of v1 parts (train.sample_patch_num) is set on the local encoder embedding here."""
        for item, spn in feed:
            if self.enc_embed is not None:
                self.enc_embed.sample_patch_num = spn
            yield item

    def train_step(self, tr, micro: list[Any], sizes: list[MicroSizes]) -> tuple[float, float, float, int]:
        total_size = all_reduce([sum(s.size for s in sizes)])[0] / self.stages
        w = self.dp * self.gas / max(total_size, 1e-9)
        spn = tr.run_cfg.train.sample_patch_num or None
        table: list[tuple[dict, float, bool]] = []
        feed = []
        for b in micro:
            b = to_device(b, tr.device, tr.dtype)
            parts = list(parts_of(b))
            if len(parts) > self.parts_per_batch:
                raise RuntimeError("a (v1, v2) pretraining pair from a task set up without v2 extras")
            pair = len(parts) == 2
            for j in range(self.parts_per_batch):
                real = j < len(parts)
                p = parts[j] if real else _filler(parts[0])
                table.append((p, w if real else 0.0, pair))
                inputs, _ = pipeline.batch_to_pipe(p)
                feed.append(((inputs, torch.tensor([len(table) - 1])), spn if (pair and j == 0) else None))
        self.loss_fn.begin(table)
        tr.grad_norm = None
        tr.engine.train_batch(self._feed(feed))
        loss_sum, nll_sum, bad = all_reduce(self.loss_fn.sums)       # only the last stages hold non-zero sums
        return loss_sum, nll_sum, total_size, int(bad > 0)

    # ---- dense model for evaluation / export -----------------------------------------------------------------------
    def _dense_model(self, tr, state: dict, where: str) -> OFAModel:
        from ofa_ds.checkpoint import load_state_strict
        model = OFAModel(tr.model_cfg)
        load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, where)
        return model

    def _gathered_dense(self, tr) -> OFAModel | None:
        """Collective: the current weights as a dense OFAModel on rank 0 (None elsewhere)."""
        state = pipeline.gather_dense_state(tr.engine.module, tr.model_cfg)
        return self._dense_model(tr, state, "the pipeline stages") if tr.rank == 0 else None

    def _release_engine(self, tr) -> None:
        tr.engine = None
        self.enc_embed = None
        self.loss_fn.table = []
        gc.collect()

    def finish(self, tr, last_tag: str | None) -> None:
        t = tr.run_cfg.train
        if not tr.eval_sets and not (t.export_final and last_tag):
            return
        if last_tag is not None and last_tag == tag_for(tr.step):
            self._release_engine(tr)                  # the final weights are on disk: read them there
            dist.barrier()
            if tr.rank == 0:
                from ofa_ds.training.universal import pipeline_checkpoint_to_dense
                path = os.path.join(tr.ckpt_dir, last_tag)
                self.dense = self._dense_model(tr, pipeline_checkpoint_to_dense(tr.ckpt_dir, tr.model_cfg,
                                                                                last_tag), path)
        else:
            self.dense = self._gathered_dense(tr)
            self._release_engine(tr)

    def eval_model(self, tr) -> tuple[torch.nn.Module | None, torch.dtype, bool]:
        """(model, dtype, sharded): rank 0 evaluates all held-out batches with fp32 dense weights, the rest wait."""
        model = self.dense if tr.engine is None else self._gathered_dense(tr)
        return (model.to(tr.device) if model is not None else None), torch.float32, False

    def export(self, tr, tag: str) -> None:
        """<out>/final/: consolidated_fp32.pt + HF-style folder of the final weights, as the dense strategy writes."""
        if tr.rank == 0:
            from ofa_ds.checkpoint import export_folder
            if self.dense is None:
                raise RuntimeError("export without a dense model (PipelineStrategy.finish did not run)")
            final = os.path.join(tr.out, "final")
            os.makedirs(final, exist_ok=True)
            torch.save({k: v.cpu() for k, v in self.dense.state_dict().items()},
                       os.path.join(final, "consolidated_fp32.pt"))
            export_folder(self.dense, final)
        dist.barrier()

    def facts(self, tr) -> dict[str, Any]:
        return {"pipeline_stages": self.stages, "data_parallel": self.dp}
