"""The training loop: `Trainer(run).run()` pretrains or finetunes OFA through a DeepSpeed engine.

One loop for every parallel layout. What differs between the dense model (data parallel, ZeRO 0-3) and the pipeline
(DeepSpeed PipelineModule) sits behind a small strategy interface, `training/dense.py` and
`training/pipeline_strategy.py`; the ds_config's "pipeline" block picks the second. A strategy builds the module,
names the data shard, resolves its ds_config, runs one optimizer step, and provides the model for evaluation/export.

What is unusual:
  * The RunConfig is resolved once in `setup` (the checkpoint named by --init decides the architecture, train.epochs
    becomes max_steps, "auto" precision is taken from the ds_config) into a new object, `self.run_cfg`; it is written to
    config.json and only read afterwards.
  * One optimizer step = `grad_accum` micro-batches per rank; the loss is normalised by the step's global sample size
    (fairseq's convention, see `training/dense.py`).
  * Resume restores weights, optimizer, scheduler, data position (epoch, batch) and RNG states, so the continued run
    produces the same losses and sample ids as an uninterrupted one.
  * The final report (held-out metrics + run facts) is written to `<out>/report.json` and returned; the command line
    prints it as rank 0's last JSON line.
  * Faults end as one-line `RunFault`s (`training/faults.py`): input files and the run folder are checked before
    anything is built, a --resume checkpoint of another model size is refused before the model is built (config.json
    is written only after the resume loaded), and a save or export that fails leaves the last complete checkpoint
    as it was. Bad data rows are counted per category and logged (bad_rows, bad_rows_by_reason); past
    data.bad_row_threshold the data stream raises TooManyBadRows while drawing the next batch, so no checkpoint is
    written after the data went bad. A run resumed at its last step does not rewrite that checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ofa_ds.config import RunConfig
from ofa_ds.data.tsv import CATEGORIES
from ofa_ds.model import OFAModel
from ofa_ds.training import ema as ema_mod
from ofa_ds.training import cpu_malloc, evaluate, prompt_tuning, scst
from ofa_ds.training.checkpoints import (RUN_OWN_MODEL_FIELDS, check_resume_model, find_resume_tag, load_checkpoint,
                                         resume_failure, save_checkpoint, tag_for)
from ofa_ds.training.dense import DenseStrategy
from ofa_ds.training.ds_config import raw_ds_config, resolve_ds_path, resolve_precision, zero_stage
from ofa_ds.training.engine import all_reduce, grad_norm, init_distributed, initialize, loss_scale
from ofa_ds.training.faults import RunFault, check_readable, check_writable, write_failure
from ofa_ds.training.metrics_log import MetricsLogger, device_peak_tflops, peak_mem_gib
from ofa_ds.training.objective import micro_batch_sizes, parts_of
from ofa_ds.training.pipeline_strategy import PipelineStrategy, has_pipeline_block
from ofa_ds.training.zero3 import ShardedInit, open_sharded_init

BAD_ROW_CATEGORIES = tuple(CATEGORIES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPORT_FILE = "report.json"


def strategy_for(run: RunConfig) -> DenseStrategy | PipelineStrategy:
    """The pipeline strategy when the run's DeepSpeed JSON has a "pipeline" block, else the dense one."""
    if isinstance(run.ds_config, str) and run.ds_config and os.path.exists(resolve_ds_path(run.ds_config)):
        check_readable(resolve_ds_path(run.ds_config), "DeepSpeed config")
    try:
        pipelined = has_pipeline_block(run.ds_config)
    except ValueError as e:                                   # not valid JSON: the message names the file
        raise RunFault(str(e), status=2, every_rank=True) from None
    return PipelineStrategy(run) if pipelined else DenseStrategy()


def load_init(run: RunConfig, sharded_rank: int | None = None) -> OFAModel | ShardedInit | None:
    """The weights named by train.init (an official .pt, an exported folder, or one of our run folders: its final/
    folder), or None for a fresh model. This run's dropout and kernel settings are kept; the checkpoint decides the
    architecture. With `sharded_rank` (a ZeRO-3 build) nothing is loaded yet: rank 0 opens the file and every rank
    gets its ModelConfig (`training/zero3.py` loads it module by module into the sharded model)."""
    init = run.train.init
    if not init:
        return None
    check_readable(init, "--init checkpoint")
    if os.path.isdir(init) and os.path.isdir(os.path.join(init, "final")):
        init = os.path.join(init, "final")
    keep = {k: getattr(run.model, k) for k in RUN_OWN_MODEL_FIELDS} | prompt_tuning.model_overrides(run)
    if sharded_rank is not None:
        return open_sharded_init(init, sharded_rank, **keep)
    from ofa_ds.checkpoint import load_any
    return load_any(init, **keep)


class Trainer:
    def __init__(self, run: RunConfig, resume: bool = False):
        self.requested = run
        self.run_cfg = run                      # replaced by the resolved config in setup()
        self.resume = resume
        self.resume_tag: str | None = None      # the checkpoint --resume continues from (set in setup)
        self.strategy = strategy_for(run)
        self.grad_norm: float | None = None
        self.last_loss: float | None = None
        self.ema: ema_mod.EMA | None = None      # train.ema_decay > 0: the EMA weights (set in setup)

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        run, strategy = self.requested, self.strategy
        strategy.check(None)                                   # before any process group exists: a clean exit 2
        self.rank, self.world, self.device = init_distributed()
        strategy.check(self.world)
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))   # ranks share the cores
        if self.device.type == "cpu":
            cpu_malloc.tune()                                  # freed step memory is reused, not re-faulted
        self.out = run.out_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        check_writable(self.out)
        self.resume_tag = self._resume_tag() if self.resume else None
        if run.synthetic_root:
            self._ensure_synthetic(run.synthetic_root)
        self._check_inputs(run)
        torch.manual_seed(run.train.seed)
        raw_ds = raw_ds_config(run.ds_config)
        sharded = isinstance(strategy, DenseStrategy) and zero_stage(raw_ds) == 3
        init = load_init(run, self.rank if sharded else None)      # ZeRO-3: built sharded (training/zero3.py)
        self.precision = resolve_precision(run.train.precision, raw_ds)
        model_cfg = prompt_tuning.model_config(run, init.cfg if init is not None else run.model)
        self.run_cfg = dataclasses.replace(run, model=model_cfg,
                                       train=dataclasses.replace(run.train, precision=self.precision))
        self.model_cfg = self.run_cfg.model
        if self.resume_tag is not None:
            check_resume_model(self.ckpt_dir, self.resume_tag, self.run_cfg)
        module = strategy.build(self, init)
        del init
        prompt_tuning.prepare(self, module)
        from ofa_ds.data import DataStream
        self.stream = DataStream(self.run_cfg.data, "train", *strategy.data_shard(self))
        self.tok = self.stream.task.tok
        t = self.run_cfg.train
        if t.epochs > 0:                  # OFA's --max-epoch: steps from this rank's batches per epoch
            steps = t.epochs * math.ceil(len(self.stream) / t.grad_accum)
            self.run_cfg = dataclasses.replace(self.run_cfg,
                                               train=dataclasses.replace(self.run_cfg.train, max_steps=steps))
        self.dtype = DTYPES[self.precision]
        self.ds_cfg, engine_cfg = strategy.ds_configs(self, self.run_cfg)
        self.zero = zero_stage(self.ds_cfg)
        self.engine = initialize(module, self.run_cfg, engine_cfg)
        strategy.attach(self)
        self._maybe_resume()
        self._setup_ema()
        self._write_run_files()           # after the resume: a checkpoint that does not load leaves config.json be
        self.eval_sets = self._eval_sets(*strategy.eval_shard(self))
        self.peak = device_peak_tflops(self.precision)

    def _write_run_files(self) -> None:
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                f.write(self.run_cfg.to_json() + "\n")
            with open(os.path.join(self.out, "ds_config.json"), "w") as f:
                json.dump(self.ds_cfg, f, indent=2, sort_keys=True)

    def _check_inputs(self, run: RunConfig) -> None:
        """Every input file that exists must be readable (a missing one is reported where it is opened, with its
        role in the message); a clear line instead of a PermissionError deep in the loader."""
        d = run.data
        files = [(p, "data file") for p in d.paths()] + [(p, "data file") for p in run.eval.data.values()]
        files += [(p, f"data.{k} file") for k, p in (("text_data", d.text_data), ("image_data", d.image_data),
                                                     ("detection_data", d.detection_data),
                                                     ("ans2label_file", d.ans2label_file)) if p]
        for path, what in files:
            for p in str(path).split(","):
                if p and os.path.exists(p):
                    check_readable(p, what)

    def _resume_tag(self) -> str:
        tag = find_resume_tag(self.ckpt_dir)
        if tag is None:
            raise RunFault(f"--resume: no complete checkpoint under {self.ckpt_dir}", status=2, every_rank=True)
        return tag

    def _maybe_resume(self) -> None:
        self.step = 0
        self.skipped = 0
        if not self.resume:
            return
        tag = self.resume_tag
        try:
            client = load_checkpoint(self.engine, self.ckpt_dir, tag)
        except (RuntimeError, KeyError, ValueError) as e:
            raise resume_failure(e, self.ckpt_dir, tag, self.run_cfg) from e
        self.stream.load_state_dict(client["data"])
        self.step, self.skipped = int(client["step"]), int(client.get("skipped", 0))
        if self.rank == 0:
            print(f"resumed from {os.path.join(self.ckpt_dir, tag)} at step {self.step}", flush=True)

    def _ensure_synthetic(self, root: str) -> None:
        """Generate the default run's world into `root` if it has no manifest; an existing folder is used as it is
        (a variant written by `python -m ofa_ds.data synthetic` included), with a note when it is another world."""
        if self.rank == 0:
            from ofa_ds.data.synthetic import DEFAULT_RUN_WORLD, generate, world_differences
            manifest = os.path.join(root, "manifest.json")
            if not os.path.isfile(manifest):
                print(f"generating the synthetic dataset in {root}", flush=True)
                generate(root, **DEFAULT_RUN_WORLD)
            else:
                with open(manifest) as fh:
                    other = world_differences(json.load(fh))
                if other:
                    print(f"note: {root} holds another synthetic world than the default run's ({other}; default "
                          f"{DEFAULT_RUN_WORLD}); using it as it is, delete the folder to regenerate", flush=True)
        dist.barrier()

    def _eval_sets(self, rank: int, world: int) -> dict[str, dict]:
        """Per task: shard `rank` of `world` of the held-out batches (kept in memory), candidates and baseline."""
        from ofa_ds.data import DataStream
        run, ev = self.run_cfg, self.run_cfg.eval
        tasks = dict(ev.data)
        if not tasks and run.data.task != "pretrain" and len(run.data.paths()) > 1:
            tasks = {run.data.task: run.data.paths()[-1]}
        sets = {}
        for task, path in tasks.items():
            kw: dict[str, Any] = dict(task=task, data=path, batch_size=ev.batch_size, shuffle=False, augment=False,
                                      num_workers=0, selected_cols=None)
            if run.data.task == "pretrain":
                kw["prompt_type"] = "none"          # the pretraining layout: answer right after bos
            if task == "vqa":
                kw["ans2label_file"] = ev.vqa_answers or run.data.ans2label_file
            dc = dataclasses.replace(run.data, **kw)
            st = DataStream(dc, "valid", rank, world)
            n = evaluate.num_eval_batches(ev.max_samples, ev.batch_size, world, len(st))
            batches = []
            for i, b in enumerate(st):
                batches.append(b)
                if i + 1 >= n:
                    break
            cands = getattr(st.task, "ans2label", None)
            ref = ev.reference_stats.get(task, "")
            base = None
            if ref and self.rank == 0:
                base = {"vqa": lambda p: evaluate.vqa_baselines(p, ev.vqa_answer_types), "snli_ve": None,
                        "caption": evaluate.majority_caption, "refcoco": evaluate.mean_box}.get(task)
                base = base(ref) if base else None
            sets[task] = {"batches": batches, "candidates": cands, "baseline": base}
        return sets

    # ---- one step --------------------------------------------------------------------------------------------------
    def train_step(self, micro: list[Any]) -> dict[str, float]:
        sizes = [micro_batch_sizes(self.model_cfg, self.run_cfg.train, b) for b in micro]
        scst_run = self.run_cfg.train.loss == "scst"            # caption stage 2: training/scst.py
        step = scst.train_step if scst_run else self.strategy.train_step
        loss_sum, nll_sum, total_size, bad = step(self, micro, sizes)
        self.skipped += int(bad > 0)
        if self.ema is not None and not bad and self.engine.was_step_applied():
            self.ema.update(self.step + 1)            # only after applied steps (not an fp16 overflow skip)
        if self.run_cfg.train.record_ids:
            ids = [int(i) for b in micro for p in parts_of(b) for i in p["id"].tolist()]
            with open(os.path.join(self.out, f"ids_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step + 1, "ids": ids}) + "\n")
        return {"loss": loss_sum / max(total_size, 1e-9), "nll_loss": nll_sum / max(total_size, 1e-9),
                "samples": sum(s.samples for s in sizes), "tokens": sum(s.tokens for s in sizes),
                "flops": sum(s.flops for s in sizes), **({"nll_loss": None, "reward": nll_sum} if scst_run else {})}

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics on rank 0 ({} elsewhere). Collective."""
        from ofa_ds.training.compile import eager_unless
        with self._ema_weights(), eager_unless(False):    # compiled layers run eager here (ofa_ds/training/compile.py)
            model, dtype, sharded = self.strategy.eval_model(self)
            return self._evaluate(model, dtype, sharded)

    def _evaluate(self, model, dtype, sharded) -> dict[str, float]:
        results: dict[str, float] = {}
        if model is not None:
            was_training = model.training
            model.eval()
            try:
                for task, s in self.eval_sets.items():
                    recs, ls, ss = evaluate.evaluate_task(
                        model, task, s["batches"], self.tok, device=self.device, dtype=dtype,
                        max_len=self.run_cfg.eval.max_len, num_bins=self.run_cfg.data.num_bins,
                        max_image_size=self.run_cfg.data.max_image_size, candidates=s["candidates"],
                        eps=self.run_cfg.train.label_smoothing)
                    if sharded:
                        recs = evaluate.gather_records(recs)
                        ls, ss = all_reduce([ls, ss])
                    else:
                        recs = evaluate.unique_records(recs)
                    if self.rank == 0:
                        if ss > 0:
                            results[f"{task}_loss"] = ls / ss
                        results.update(evaluate.summarise(task, recs, s["baseline"], self.tok))
            finally:
                model.train(was_training)
        if not sharded:
            dist.barrier()
        return results

    # ---- loop ------------------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Any]:
        while True:
            yielded = False
            for b in self.stream:
                yielded = True
                yield b
            if not yielded and self.stream.batch == 0 and len(self.stream.files) == 1:
                raise RuntimeError("the training stream produced no batch in a whole epoch (all rows bad?)")

    def _save(self) -> str:
        client = {"data": self.stream.state_dict(), "skipped": self.skipped, "config": self.run_cfg.to_dict()}
        tag = save_checkpoint(self.engine, self.ckpt_dir, self.step, client, self.run_cfg.train.keep_checkpoints,
                              extra=self.ema.save if self.ema is not None else None)
        prompt_tuning.save(self)
        return tag

    # ---- EMA weights (train.ema_decay, training/ema.py) ------------------------------------------------------------
    def _setup_ema(self) -> None:
        """The EMA starts from the weights the run starts from, or from the resumed checkpoint's EMA."""
        self.ema = ema_mod.for_trainer(self)
        self.last_tag: str | None = self.resume_tag
        if self.ema is not None and self.resume_tag is not None:
            self.ema.load(os.path.join(self.ckpt_dir, self.resume_tag))

    def _ema_weights(self):
        """Context for an evaluation with train.ema_eval: the EMA in the live weights (or, once the pipeline engine
        is released, in the dense evaluation model, read from the final checkpoint)."""
        if not self.run_cfg.train.ema_eval:
            return contextlib.nullcontext()
        if self.engine is not None:
            return self.ema.swapped()
        dense = getattr(self.strategy, "dense", None)
        if dense is None or self.last_tag is None:
            if self.rank == 0:
                print("warning: train.ema_eval: no checkpoint holds the pipeline's EMA (train.save_final=false?); "
                      "this evaluation uses the live weights", file=sys.stderr, flush=True)
            return contextlib.nullcontext()
        return ema_mod.loaded_into(dense, os.path.join(self.ckpt_dir, self.last_tag), self.model_cfg)

    @property
    def ema_on(self) -> bool:
        return self.run_cfg.train.ema_decay > 0

    def _export_ema(self, tag: str) -> None:
        if self.rank == 0 and self.ema_on:
            from ofa_ds.checkpoint import export_folder
            export_folder(ema_mod.ema_model(os.path.join(self.ckpt_dir, tag), self.model_cfg),
                          os.path.join(self.out, "final", "ema"))

    def _export(self, tag: str) -> None:
        final = os.path.join(self.out, "final")
        try:
            self.strategy.export(self, tag)
            self._export_ema(tag)
        except (OSError, RuntimeError) as e:            # a full disk: one line; anything else keeps its traceback
            raise write_failure(e, final, f"exporting the final weights to {final}",
                                f"the checkpoint {os.path.join(self.ckpt_dir, tag)} is complete: rerun with --resume "
                                f"to export it again") from e
        prompt_tuning.save_final(self)

    def run(self) -> dict[str, Any]:
        t_start = time.time()
        self.setup()
        t = self.run_cfg.train
        log = MetricsLogger(self.out, t.max_steps, self.rank, progress=t.progress, start_step=self.step)
        batches = self._batches()
        acc = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "flops": 0.0, "time": 0.0}
        last_tag = None
        final_eval: dict[str, float] = {}
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                lr = self.engine.get_lr()[0]
                st = self.train_step([next(batches) for _ in range(t.grad_accum)])
                self.step += 1
                dt = time.perf_counter() - t0
                for k in ("samples", "tokens", "flops"):
                    acc[k] += st[k]
                acc["loss"] += st["loss"]
                acc["n"] += 1
                acc["time"] += dt
                log.advance(1, loss=st["loss"])
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._log(log, acc, st, lr)
                    acc = {k: 0.0 if isinstance(v, float) else 0 for k, v in acc.items()}
                if t.save_every and self.step % t.save_every == 0:
                    last_tag = self._save()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    log.log_eval(self.step, self.evaluate())
            if last_tag is None and self.resume_tag == tag_for(self.step):
                last_tag = self.resume_tag    # resumed at the last step: that checkpoint is final, never rewritten
            if t.save_final and (last_tag is None or last_tag != tag_for(self.step)):
                last_tag = self._save()
            self.last_tag = last_tag
            self.strategy.finish(self, last_tag)
            if self.engine is None:
                self.ema = None                          # the pipeline released its engine: so does the EMA
            if self.eval_sets:
                final_eval = self.evaluate()
                log.log_eval(self.step, final_eval)
            if t.export_final and last_tag is not None:
                self._export(last_tag)
        finally:
            log.close()
        report = {**final_eval, "steps": self.step, "train_loss_last": self.last_loss, **self._facts(),
                  "wall_s": round(time.time() - t_start, 1)}
        if self.rank == 0:
            with open(os.path.join(self.out, REPORT_FILE), "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
        return report

    def _facts(self) -> dict[str, Any]:
        """Run facts for the final report. Collective (peak memory per rank: CUDA max allocated, or the process's max
        RSS on CPU, over the whole run including evaluation and export)."""
        peaks = all_reduce([peak_mem_gib() if r == self.rank else 0.0 for r in range(self.world)])
        return {"world_size": self.world, "precision": self.precision, "zero_stage": zero_stage(self.ds_cfg),
                "peak_mem_gib_ranks": [round(x, 3) for x in peaks], **self.strategy.facts(self),
                **prompt_tuning.facts(self)}

    def _log(self, log: MetricsLogger, acc: dict, st: dict, lr: float) -> None:
        n, secs = max(acc["n"], 1), max(acc["time"], 1e-9)
        reasons = self.stream.counter.reasons
        local = [float(reasons.get(k, 0)) for k in BAD_ROW_CATEGORIES]
        local.append(float(sum(v for k, v in reasons.items() if k not in BAD_ROW_CATEGORIES)))
        samples, tokens, flops, bad_rows, *by_reason = (x / self.strategy.shard_copies for x in all_reduce(
            [acc["samples"], acc["tokens"], acc["flops"], float(self.stream.counter.bad), *local]))
        by_reason = {k: int(v) for k, v in zip((*BAD_ROW_CATEGORIES, "other"), by_reason) if v}
        tflops = flops / self.world / secs / 1e12
        self.last_loss = acc["loss"] / n
        log.log_step({
            "step": self.step, "loss": acc["loss"] / n, "lr": lr,
            "grad_norm": self.grad_norm if self.zero == 0 else grad_norm(self.engine),
            "loss_scale": loss_scale(self.engine), "samples_per_s": samples / secs, "tokens_per_s": tokens / secs,
            "tflops_per_gpu": tflops, "mfu": (tflops / self.peak) if self.peak else None,
            "peak_mem_gib": peak_mem_gib(), "step_ms": 1000 * secs / n,
            "skipped_steps": self.skipped + int(getattr(self.engine, "skipped_steps", 0) or 0),
            "bad_rows": int(bad_rows), "bad_rows_by_reason": by_reason, "nll_loss": st["nll_loss"],
            **({"reward": st["reward"]} if "reward" in st else {}),
            "epoch": self.stream.epoch})

