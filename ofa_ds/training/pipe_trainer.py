"""Pipeline-parallel training: `PipeTrainer`, chosen by `trainer.trainer_for` (and so by `launch/pretrain.py` and
`launch/finetune.py`) when the run's DeepSpeed JSON has a "pipeline" block {"stages", "partition",
"activation_checkpoint_interval"}. It is a `Trainer` subclass: same command line, loop, metric names (JSONL,
TensorBoard, console), checkpoints, `--resume`, `final/` export and final held-out evaluation. What differs:

  * Model: `build_pipeline` with the block's stage count / partition method / activation checkpointing (also on
    with train.activation_checkpointing). `--init` (official .pt, exported folder, one of our run folders) is read
    on every rank with `load_any` and copied into the local stage (`load_dense_into_pipeline`). A fresh pipeline is
    initialised like the dense model (same distributions, not the same numbers: each stage draws its own layers).
  * Ranks: world = stages × data-parallel replicas (DeepSpeed's topology). All stages of a replica read the same
    data shard (sharded by data-parallel rank, not global rank): the first stage needs the inputs, the last one the
    targets, and every stage needs the step's sample sizes for the normalisation.
  * Micro-batches: each of the train.grad_accum batches of a step becomes P pipeline micro-batches, P = 2 when the
    task can produce pretraining (v1, v2) pairs (pretrain with text/image/detection extras), else 1; DeepSpeed's
    gradient_accumulation_steps = grad_accum × P (the resolved ds_config.json shows it). A batch that is not a pair
    fills its second slot with one text-only row of itself at weight 0 (no ResNet call, so BatchNorm statistics do
    not move); fixed shapes of the schedule are not needed (dynamic_shape).
  * Loss: the labels of micro-batch k are just `tensor([k])`; the PipelineModule's loss function (`StepLoss`, on the
    last stage) looks the k-th entry up in the step's table (the batch dict, weight w, pair flag) and applies the
    dense trainer's own `_loss` (label smoothing, conf, constraint masks, drop_worst, encouraging loss). It returns
    loss·w, or loss/ntokens·w for a pair part, with w = dp·gas / (the step's global sample size, pair = 1): after
    DeepSpeed's 1/gas scaling and data-parallel averaging the gradient is Σ loss / Σ sample_size over the step,
    and a pair contributes loss_v1/n_v1 + loss_v2/n_v2 — exactly `losses.pair_loss` and the dense `Trainer`.
    A non-finite part contributes zero gradient and counts in skipped_steps (the dense trainer zeroes the whole
    pair; here only the bad part).
  * Gradient norm and clipping: ZeRO-1 computes the norm over all stages itself (tied table counted once). With
    ZeRO-0 DeepSpeed's fp32 clipping counts only stage 0's gradients (runtime/utils.clip_grad_norm_ keeps model
    parallel rank 0, which is the stage index under a pipeline grid), so for ZeRO-0 DeepSpeed is given
    gradient_clipping 0 and the OptimizerStep instruction is wrapped: norm over all stages (tied table once), then
    DeepSpeed's own clip rule (coef = min(1, clip / (norm + 1e-6))), then the step. ZeRO-0 + bf16/fp16 clipping is
    left to DeepSpeed's mixed-precision optimizers (not exercised here; the shipped pipeline configs are ZeRO-1).
  * Evaluation and export run on a dense fp32 `OFAModel` on global rank 0 (all held-out batches; the other ranks
    wait; with bf16/fp16 training the dense trainer would evaluate its half-precision module instead).
    At the end the engine is released first and rank 0 reads the final checkpoint's layer files
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
from ofa_ds.training import engine as E
from ofa_ds.training import evaluate as EV
from ofa_ds.training.metrics import device_peak_tflops
from ofa_ds.training.trainer import DTYPES, Trainer, _all_reduce, init_source


def _raw_ds(ds: str | dict | None) -> dict:
    if not ds:
        return {}
    return E.load_ds_json(ds) if isinstance(ds, str) else ds


def has_pipeline_block(ds: str | dict | None) -> bool:
    return bool(_raw_ds(ds).get("pipeline"))


def check_pipeline_config(ds: dict, where: str, world: int | None = None) -> None:
    """ZeRO-2/3 cannot be combined with a pipeline (DeepSpeed's PipelineEngine asserts stage < 2); the stage count
    must divide the world size. Raises ConfigMismatch naming the file and the values."""
    from ofa_ds.training.pipeline import pipeline_settings
    z = E.zero_stage(ds)
    block = json.dumps(ds.get("pipeline"), sort_keys=True)
    if z >= 2:
        raise E.ConfigMismatch(
            f"{where}: zero_optimization.stage = {z} together with a \"pipeline\" block {block}; DeepSpeed's "
            f"pipeline engine supports ZeRO stage 0 or 1 only. Use ds_configs/pipeline_2stage_*.json (ZeRO-1) for "
            f"pipeline parallelism, or remove the \"pipeline\" block to train the dense model with ZeRO-{z}.")
    n = pipeline_settings(ds)["num_stages"]
    if n < 1 or (world is not None and world % n):
        raise E.ConfigMismatch(f"{where}: pipeline.stages = {n} does not divide the world size {world} "
                               f"(launch stages × data-parallel replicas ranks)")


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
    """loss_fn of the PipelineModule: labels = tensor([k]) → entry k of the current step's table (see the header)."""

    __name__ = "ofa_step_loss"

    def __init__(self, trainer: "PipeTrainer"):
        self.tr = trainer
        self.table: list[tuple[dict, float, bool]] = []
        self.sums = [0.0, 0.0, 0.0]

    def begin(self, table: list[tuple[dict, float, bool]]) -> None:
        self.table, self.sums = table, [0.0, 0.0, 0.0]

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        k = int((labels[0] if isinstance(labels, (tuple, list)) else labels).reshape(-1)[0])
        b, w, pair = self.table[k]
        out = self.tr._loss(logits, b)
        finite = float(torch.isfinite(out.loss).item())
        if self.tr.dp > 1:        # the same decision on every replica (the dense trainer all-reduces it too)
            t = torch.tensor([finite], device=out.loss.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tr.dp_group)
            finite = float(t.item())
        if not finite:
            self.sums[2] += float(w > 0)
            return logits.float().sum() * 0.0
        scale = 1.0 / max(out.ntokens, 1) if pair else 1.0
        if w > 0:
            self.sums[0] += float(out.loss.detach()) * scale
            self.sums[1] += float(out.nll) * scale
        return out.loss * (scale * w)


class PipeTrainer(Trainer):
    _dense = None           # rank 0's dense OFAModel for evaluation/export once training is over
    _enc_embed = None

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from ofa_ds.training.pipeline import EncoderEmbedPipe, build_pipeline, load_dense_into_pipeline, \
            pipeline_settings
        run = self.run_cfg
        where = run.ds_config if isinstance(run.ds_config, str) else "ds_config"
        raw = _raw_ds(run.ds_config)
        check_pipeline_config(raw, where)                  # before any process group exists: a clean exit 2
        self.rank, self.world, self.device = E.init_distributed()
        check_pipeline_config(raw, where, self.world)
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        self.out = run.out_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        if run.synthetic_root:
            self._ensure_synthetic(run.synthetic_root)
        settings = pipeline_settings(raw)
        self.stages = self.shard_copies = settings["num_stages"]
        torch.manual_seed(run.train.seed)
        dense_state = None
        src = init_source(run)
        if src is not None:
            from ofa_ds.checkpoint import load_any
            m = load_any(src[0], **src[1])
            run.model = m.cfg                      # the checkpoint decides the architecture
            dense_state = m.state_dict()
            del m
        self.loss_fn = StepLoss(self)
        module = build_pipeline(run.model, num_stages=self.stages, loss_fn=self.loss_fn,
                                partition_method=settings["partition_method"],
                                activation_checkpointing=(settings["activation_checkpointing"]
                                                          or run.train.activation_checkpointing))
        if dense_state is not None:
            load_dense_into_pipeline(module, dense_state, run.model)
            del dense_state
        if run.train.freeze_embeddings:
            self._freeze_tied_table(module)
        self._enc_embed = next((m for m in module.modules() if isinstance(m, EncoderEmbedPipe)), None)
        grid = module.mpu()
        self.stage, self.dp_rank = grid.get_stage_id(), grid.get_data_parallel_rank()
        self.dp, self.dp_group = grid.get_data_parallel_world_size(), grid.get_data_parallel_group()
        if self.rank == 0:
            print(f"pipeline: {self.stages} stages x {self.dp} data-parallel, layer bounds {module.parts}",
                  flush=True)
        from ofa_ds.data import DataStream
        self.stream = DataStream(run.data, "train", self.dp_rank, self.dp)
        self.tok = self.stream.task.tok
        self.parts_per_batch = 2 if can_pair(run) else 1
        self.gas = run.train.grad_accum * self.parts_per_batch
        if run.train.epochs > 0:
            run.train.max_steps = run.train.epochs * -(-len(self.stream) // run.train.grad_accum)
        run_gas = dataclasses.replace(run, train=dataclasses.replace(run.train, grad_accum=self.gas))
        self.ds_cfg = E.build_ds_config(run.ds_config, run_gas, self.dp)
        self.precision = E.resolve_precision(run.train.precision, self.ds_cfg)
        run.train.precision = self.precision
        self.dtype = DTYPES[self.precision]
        self.zero = E.zero_stage(self.ds_cfg)
        self._write_run_files()
        engine_cfg = self.ds_cfg
        self._clip = 0.0
        if self.zero == 0 and self.precision == "fp32":
            self._clip = float(self.ds_cfg.get("gradient_clipping", 0.0) or 0.0)
            engine_cfg = {**self.ds_cfg, "gradient_clipping": 0.0}      # clipped in _wrap_optimizer_step
        self.engine = E.initialize(module, run, engine_cfg)
        if self.zero == 0:
            self._wrap_optimizer_step()
        self.model_cfg = run.model
        self._maybe_resume()
        self.eval_sets = self._eval_sets(0, 1)               # evaluated by global rank 0 alone
        self.peak = device_peak_tflops(self.precision)

    @staticmethod
    def _freeze_tied_table(module) -> None:
        """Frozen token table: no gradient, so nothing to all-reduce between its first and last stage."""
        from ofa_ds.training.pipeline import TIED_KEY
        if TIED_KEY in module.tied_modules:
            for p in module.tied_modules[TIED_KEY].parameters():
                p.requires_grad_(False)
        module.tied_comms.pop(TIED_KEY, None)

    def _wrap_optimizer_step(self) -> None:
        """ZeRO-0: measure the gradient norm over all stages (tied table once) and clip, then DeepSpeed's step."""
        eng, tr = self.engine, self
        key = next(k for k in eng._INSTRUCTION_MAP if k.__name__ == "OptimizerStep")
        orig = eng._INSTRUCTION_MAP[key]

        def optimizer_step(engine, *args, **kwargs):
            params = [p for p in engine.module.parameters() if p.grad is not None]
            sq = torch.zeros(1, dtype=torch.float64, device=tr.device)
            for p in params:
                if not getattr(p, "ds_pipe_replicated", False):
                    sq += p.grad.detach().double().pow(2).sum()
            dist.all_reduce(sq, group=engine.grid.get_model_parallel_group())    # the stages of this replica
            norm = float(sq.sqrt())
            tr._grad_norm = norm
            if tr._clip > 0:
                coef = min(1.0, tr._clip / (norm + 1e-6))
                for p in params:
                    p.grad.mul_(coef)
            return orig(engine, *args, **kwargs)

        eng._INSTRUCTION_MAP = {**eng._INSTRUCTION_MAP, key: optimizer_step}

    # ---- one step --------------------------------------------------------------------------------------------------
    def _feed(self, feed: list) -> Iterator[tuple]:
        """The step's micro-batches for engine.train_batch. Stage 0 runs ForwardPass(k) right after loading k, so
        the patch sampling of v1 parts (train.sample_patch_num) is set on the local encoder embedding here."""
        for item, spn in feed:
            if self._enc_embed is not None:
                self._enc_embed.sample_patch_num = spn
            yield item

    def train_step(self, micro: list[Any]) -> dict[str, float]:
        from ofa_ds.training.pipeline import batch_to_pipe
        info = [self._micro_sizes(b) for b in micro]
        total_size = _all_reduce([sum(i[0] for i in info)])[0] / self.stages
        w = self.dp * self.gas / max(total_size, 1e-9)
        spn = self.run_cfg.train.sample_patch_num or None
        table: list[tuple[dict, float, bool]] = []
        feed = []
        for b in micro:
            b = EV.to_device(b, self.device, self.dtype)
            parts = list(b) if isinstance(b, tuple) else [b]
            if len(parts) > self.parts_per_batch:
                raise RuntimeError("a (v1, v2) pretraining pair from a task set up without v2 extras")
            pair = len(parts) == 2
            for j in range(self.parts_per_batch):
                real = j < len(parts)
                p = parts[j] if real else _filler(parts[0])
                table.append((p, w if real else 0.0, pair))
                inputs, _ = batch_to_pipe(p)
                feed.append(((inputs, torch.tensor([len(table) - 1])), spn if (pair and j == 0) else None))
        self.loss_fn.begin(table)
        self._grad_norm = None
        self.engine.train_batch(self._feed(feed))
        loss_sum, nll_sum, bad = _all_reduce(self.loss_fn.sums)       # only the last stages hold non-zero sums
        self.skipped += int(bad > 0)
        if self.run_cfg.train.record_ids:
            ids = [int(i) for b in micro for p in (b if isinstance(b, tuple) else (b,)) for i in p["id"].tolist()]
            with open(os.path.join(self.out, f"ids_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step + 1, "ids": ids}) + "\n")
        return {"loss": loss_sum / max(total_size, 1e-9), "nll_loss": nll_sum / max(total_size, 1e-9),
                "samples": sum(i[2] for i in info), "tokens": sum(i[3] for i in info),
                "flops": sum(i[4] for i in info)}

    # ---- dense model for evaluation / export -----------------------------------------------------------------------
    def _gathered_dense(self):
        """Collective: the current weights as a dense OFAModel on rank 0 (None elsewhere)."""
        from ofa_ds.training.pipeline import gather_dense_state
        state = gather_dense_state(self.engine.module, self.model_cfg)
        return self._dense_model(state, "the pipeline stages") if self.rank == 0 else None

    def _dense_model(self, state: dict, where: str):
        from ofa_ds.checkpoint import load_state_strict
        from ofa_ds.model import OFAModel
        model = OFAModel(self.model_cfg)
        load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, where)
        return model

    def _release_engine(self) -> None:
        self.engine = None
        self._enc_embed = None
        self.loss_fn.table = []
        gc.collect()

    def _finish_training(self, last_tag: str | None) -> None:
        t = self.run_cfg.train
        if not self.eval_sets and not (t.export_final and last_tag):
            return
        if last_tag is not None and last_tag == E.tag_for(self.step):
            self._release_engine()                  # the final weights are on disk: read them there
            dist.barrier()
            if self.rank == 0:
                from ofa_ds.training.universal import pipeline_checkpoint_to_dense
                path = os.path.join(self.ckpt_dir, last_tag)
                self._dense = self._dense_model(pipeline_checkpoint_to_dense(self.ckpt_dir, self.model_cfg,
                                                                             last_tag), path)
        else:
            self._dense = self._gathered_dense()
            self._release_engine()

    def evaluate(self) -> dict[str, float]:
        model = self._dense if self.engine is None else self._gathered_dense()
        results: dict[str, float] = {}
        if self.rank == 0:
            model.to(self.device).eval()            # fp32 weights (the dense trainer evaluates its bf16/fp16 module)
            for task, s in self.eval_sets.items():
                recs, ls, ss = self._eval_task(model, task, s, torch.float32)
                recs = EV.unique_records(recs)
                if ss > 0:
                    results[f"{task}_loss"] = ls / ss
                results.update(EV.summarise(task, recs, s["baseline"], self.tok))
        dist.barrier()
        return results

    def _export(self, tag: str | None) -> None:
        """<out>/final/: consolidated_fp32.pt + HF-style folder of the final weights, as the dense trainer writes."""
        if tag is None:
            return
        if self.rank == 0:
            from ofa_ds.checkpoint import export_folder
            model = self._dense
            if model is None:
                raise RuntimeError("export without a dense model (PipeTrainer._finish_training did not run)")
            final = os.path.join(self.out, "final")
            os.makedirs(final, exist_ok=True)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(final, "consolidated_fp32.pt"))
            export_folder(model, final)
        dist.barrier()

    def _facts(self) -> dict[str, Any]:
        return {**super()._facts(), "pipeline_stages": self.stages, "data_parallel": self.dp}
