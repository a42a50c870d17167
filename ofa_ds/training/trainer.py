"""The training loop: `Trainer(run).run()` pretrains or finetunes OFA through a DeepSpeed engine.

One optimizer step = `grad_accum` micro-batches per rank. What is unusual:
  * Loss normalisation is fairseq's, not DeepSpeed's: the summed token losses of all micro-batches on all ranks are
    divided by their summed sample size (tokens, or 1 per pretraining (v1, v2) pair, §7.1). The sample sizes of a
    step are all-reduced before the first backward; each micro-batch's loss is scaled by world·accum / total so that
    DeepSpeed's averaging over ranks and accumulation lands exactly on Σ∇loss / Σ sample_size.
  * ZeRO-3 gathers parameters per module call, so every rank must call the same modules the same number of times
    (user-needs §2.1): `code_masks` is always a tensor (the model then runs both decoder variants), image tasks
    always carry images (zeros + patch_masks False for text-only samples, done by the collater), and when ranks
    disagree on whether a micro-batch is a (v1, v2) pair the ranks with fewer parts repeat a forward with weight 0.
  * A micro-batch whose loss is not finite on any rank contributes zero gradient on every rank (the same graph is
    still run, so collectives stay matched) and is counted in skipped_steps; fp16 overflow skips are added to it.
  * Resume restores weights, optimizer, scheduler, data position (epoch, batch) and RNG states, so the continued run
    produces the same losses and sample ids as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ofa_ds.config import RunConfig
from ofa_ds.losses import LossOut, encouraging_loss, label_smoothed_ce, pair_loss, sample_weights
from ofa_ds.model import OFAModel, train_flops_per_sample
from ofa_ds.model.flops import resnet_train_flops
from ofa_ds.model.ofa import distinct_images
from ofa_ds.training import engine as E
from ofa_ds.training import evaluate as EV
from ofa_ds.training.metrics import MetricsLogger, device_peak_tflops, peak_mem_gib
from ofa_ds.training.model import TrainingOFA, as_training_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def init_source(run: RunConfig) -> tuple[str, dict[str, Any]] | None:
    """(path, ModelConfig overrides) of the weights named by train.init, or None for a fresh model: an official .pt,
    an exported folder, or one of our run folders (its final/ folder). The overrides keep this run's dropout and
    kernel settings; the checkpoint decides the architecture."""
    init = run.train.init
    if not init:
        return None
    if os.path.isdir(init) and os.path.isdir(os.path.join(init, "final")):
        init = os.path.join(init, "final")
    keep = {k: getattr(run.model, k) for k in ("dropout", "attention_dropout", "activation_dropout",
                                              "encoder_drop_path_rate", "decoder_drop_path_rate",
                                              "resnet_drop_path_rate", "kernel_backend", "frozen_bn")}
    return init, keep


def build_model(run: RunConfig) -> OFAModel:
    """A fresh OFA model, or the weights named by train.init (official .pt, exported folder, or one of our runs)."""
    torch.manual_seed(run.train.seed)
    src = init_source(run)
    if src is None:
        return TrainingOFA(run.model)
    from ofa_ds.checkpoint import load_any
    model = load_any(src[0], **src[1])
    run.model = model.cfg          # the checkpoint decides the architecture; the resolved config records it
    return as_training_model(model).train()


def trainer_for(run: RunConfig, resume: bool = False) -> "Trainer":
    """The pipeline-parallel trainer when the run's DeepSpeed JSON has a "pipeline" block, else the dense one."""
    from ofa_ds.training.pipe_trainer import PipeTrainer, has_pipeline_block
    return (PipeTrainer if has_pipeline_block(run.ds_config) else Trainer)(run, resume=resume)


class Trainer:
    shard_copies = 1
    """How many ranks read the same data shard (the pipeline trainer: one per stage); global sums of per-rank
    counts (samples, tokens, FLOPs, bad rows) are divided by it."""

    def __init__(self, run: RunConfig, resume: bool = False):
        self.run_cfg = run
        self.resume = resume

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        run = self.run_cfg
        self.rank, self.world, self.device = E.init_distributed()
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))   # ranks share the cores
        self.out = run.out_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        if run.synthetic_root:
            self._ensure_synthetic(run.synthetic_root)
        from ofa_ds.data import DataStream
        self.stream = DataStream(run.data, "train", self.rank, self.world)
        self.tok = self.stream.task.tok
        if run.train.epochs > 0:          # OFA's --max-epoch: steps from this rank's batches per epoch
            run.train.max_steps = run.train.epochs * math.ceil(len(self.stream) / run.train.grad_accum)
        model = build_model(run)
        if run.train.freeze_embeddings:
            model.encoder.embed_tokens.weight.requires_grad_(False)
        if run.train.activation_checkpointing:
            from ofa_ds.training.activation_checkpoint import set_activation_checkpointing
            n = set_activation_checkpointing(model, True)
            if self.rank == 0:
                print(f"activation checkpointing on {n} layers", file=sys.stderr, flush=True)
        self.ds_cfg = E.build_ds_config(run.ds_config, run, self.world)
        self.precision = E.resolve_precision(run.train.precision, self.ds_cfg)
        run.train.precision = self.precision
        self.dtype = DTYPES[self.precision]
        self._write_run_files()
        self.engine = E.initialize(model, run, self.ds_cfg)
        self.zero = E.zero_stage(self.ds_cfg)
        self.model_cfg = run.model
        self._maybe_resume()
        self.eval_sets = self._eval_sets(self.rank, self.world)
        self.peak = device_peak_tflops(self.precision)

    def _write_run_files(self) -> None:
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                f.write(self.run_cfg.to_json() + "\n")
            with open(os.path.join(self.out, "ds_config.json"), "w") as f:
                json.dump(self.ds_cfg, f, indent=2, sort_keys=True)

    def _maybe_resume(self) -> None:
        self.step = 0
        self.skipped = 0
        if not self.resume:
            return
        tag = E.find_resume_tag(self.ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.ckpt_dir}")
        client = E.load_checkpoint(self.engine, self.ckpt_dir, tag)
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
        import dataclasses
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
            n = EV.num_eval_batches(ev.max_samples, ev.batch_size, world, len(st))
            batches = []
            for i, b in enumerate(st):
                batches.append(b)
                if i + 1 >= n:
                    break
            cands = getattr(st.task, "ans2label", None)
            ref = ev.reference_stats.get(task, "")
            base = None
            if ref and self.rank == 0:
                base = {"vqa": lambda p: EV.vqa_baselines(p, ev.vqa_answer_types), "snli_ve": None,
                        "caption": EV.majority_caption, "refcoco": EV.mean_box}.get(task)
                base = base(ref) if base else None
            sets[task] = {"batches": batches, "candidates": cands, "baseline": base}
        return sets

    # ---- one step --------------------------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, b: dict) -> LossOut:
        t = self.run_cfg.train
        conf = b.get("conf")
        if t.token_weighting == "sample":
            conf = sample_weights(b["target"]) * (1.0 if conf is None else conf.to(torch.float32))
        kw = dict(eps=t.label_smoothing, conf=conf, constraint_masks=b.get("constraint_masks"),
                  constraint_rows=b.get("constraint_rows"), constraint_index=b.get("constraint_index"),
                  constraint_range=t.range_tuple(), drop_worst_ratio=t.drop_worst_ratio,
                  drop_worst_after=t.drop_worst_after, update_num=self.step + 1)
        if t.loss == "encouraging":
            return encouraging_loss(logits, b["target"], drop_best_ratio=t.drop_best_ratio,
                                    drop_best_after=t.drop_best_after, log_end=t.log_end, **kw)
        return label_smoothed_ce(logits, b["target"], **kw)

    def _forward(self, batch: Any, n_parts: int) -> tuple[LossOut, list[torch.Tensor]]:
        parts = list(batch) if isinstance(batch, tuple) else [batch]
        spn = self.run_cfg.train.sample_patch_num or None
        outs, logits_all = [], []
        for j in range(n_parts):
            b = parts[min(j, len(parts) - 1)]
            ni = EV.net_input(b)
            if ni["code_masks"] is None:
                ni["code_masks"] = torch.zeros(b["src_tokens"].shape[0], dtype=torch.bool, device=self.device)
            keep = b["target"].ne(1) if j < len(parts) else None       # packed logits of real targets
            logits = self.engine(**ni, sample_patch_num=spn if (len(parts) == 2 and j == 0) else None, keep=keep)
            logits_all.append(logits)
            if j < len(parts):
                outs.append(self._loss(logits, b))
        out = pair_loss(*outs) if len(outs) == 2 else outs[0]
        return out, logits_all

    def _micro_sizes(self, batch: Any) -> tuple[float, int, int, int, float]:
        """(sample size, parts, samples, target tokens, training FLOPs) of one micro-batch before the forward."""
        parts = batch if isinstance(batch, tuple) else (batch,)
        size = 1.0 if len(parts) == 2 else float(parts[0]["ntokens"])
        samples = sum(p["nsentences"] for p in parts)
        tokens = sum(p["ntokens"] for p in parts)
        flops = 0.0
        spn = self.run_cfg.train.sample_patch_num or None
        for j, p in enumerate(parts):
            img = p["patch_images"].shape[-1] if p.get("patch_images") is not None else None
            f = train_flops_per_sample(self.model_cfg, img, p["src_tokens"].shape[1], p["target"].shape[1],
                                       spn if (len(parts) == 2 and j == 0) else None)
            flops += f * p["nsentences"]
            groups = distinct_images(p["patch_images"]) if img and self.model_cfg.dedup_images else None
            if groups is not None:                   # one ResNet pass per distinct image (model.dedup_images)
                flops -= resnet_train_flops(self.model_cfg, img) * (p["nsentences"] - len(groups[0]))
        return size, len(parts), samples, tokens, flops

    def train_step(self, micro: list[Any]) -> dict[str, float]:
        gas, world = len(micro), self.world
        info = [self._micro_sizes(b) for b in micro]
        total_size, = _all_reduce([sum(i[0] for i in info)])
        n_parts = [int(x) for x in _all_reduce([i[1] for i in info], dist.ReduceOp.MAX)]
        loss_sum = nll_sum = 0.0
        bad = 0
        self._grad_norm = None
        for k, (b, n) in enumerate(zip(micro, n_parts)):
            b = EV.to_device(b, self.device, self.dtype)
            out, logits = self._forward(b, n)
            finite, = _all_reduce([float(torch.isfinite(out.loss).item())], dist.ReduceOp.MIN)
            if finite:
                loss = out.loss * (world * gas / max(total_size, 1e-9))
                loss_sum += float(out.loss.detach())
                nll_sum += float(out.nll)
            else:
                loss = out.loss.new_zeros(())
                bad += 1
            extra = logits[len(b) if isinstance(b, tuple) else 1:]
            zero = sum((0.0 * x.float().sum() for x in (logits if not finite else extra)), out.loss.new_zeros(()))
            self.engine.backward(loss + zero)
            if k == gas - 1 and self.zero == 0:        # DeepSpeed reports no norm without ZeRO: measure it
                gs = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
                self._grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))) if gs else 0.0
            self.engine.step()
        self.skipped += int(bad > 0)
        if self.run_cfg.train.record_ids:
            ids = [int(i) for b in micro for p in (b if isinstance(b, tuple) else (b,)) for i in p["id"].tolist()]
            with open(os.path.join(self.out, f"ids_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step + 1, "ids": ids}) + "\n")
        loss_sum, nll_sum = _all_reduce([loss_sum, nll_sum])
        return {"loss": loss_sum / max(total_size, 1e-9), "nll_loss": nll_sum / max(total_size, 1e-9),
                "samples": sum(i[2] for i in info), "tokens": sum(i[3] for i in info),
                "flops": sum(i[4] for i in info)}

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def _eval_task(self, model, task: str, s: dict, dtype) -> tuple[list[dict], float, float]:
        """This rank's records, summed loss and sample size of one held-out set (`self.eval_sets[task]`)."""
        return EV.evaluate_task(model, task, s["batches"], self.tok, device=self.device, dtype=dtype,
                                max_len=self.run_cfg.eval.max_len, num_bins=self.run_cfg.data.num_bins,
                                max_image_size=self.run_cfg.data.max_image_size, candidates=s["candidates"],
                                eps=self.run_cfg.train.label_smoothing)

    def evaluate(self) -> dict[str, float]:
        module = self.engine.module
        module.eval()
        results: dict[str, float] = {}
        try:
            for task, s in self.eval_sets.items():
                recs, ls, ss = self._eval_task(module, task, s, self.dtype)
                recs = EV.gather_records(recs)
                ls, ss = _all_reduce([ls, ss])
                if self.rank == 0 and ss > 0:
                    results[f"{task}_loss"] = ls / ss
                if self.rank == 0:
                    results.update(EV.summarise(task, recs, s["baseline"], self.tok))
        finally:
            module.train()
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
        return E.save_checkpoint(self.engine, self.ckpt_dir, self.step, client, self.run_cfg.train.keep_checkpoints)

    def run(self) -> dict[str, Any]:
        t_start = time.time()
        self._setup()
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
                    self._log(log, acc, st, lr, dt)
                    acc = {k: 0.0 if isinstance(v, float) else 0 for k, v in acc.items()}
                if t.save_every and self.step % t.save_every == 0:
                    last_tag = self._save()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    log.log_eval(self.step, self.evaluate())
            if t.save_final and (last_tag is None or last_tag != E.tag_for(self.step)):
                last_tag = self._save()
            self._finish_training(last_tag)
            if self.eval_sets:
                final_eval = self.evaluate()
                log.log_eval(self.step, final_eval)
            if t.export_final:
                self._export(last_tag)
        finally:
            log.close()
        report = {**final_eval, "steps": self.step, "train_loss_last": self._last_loss, **self._facts(),
                  "wall_s": round(time.time() - t_start, 1)}
        if self.rank == 0:
            with open(os.path.join(self.out, "eval.json"), "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
        return report

    _last_loss: float | None = None

    def _facts(self) -> dict[str, Any]:
        """Run facts for the final report (eval.json and the last output line). Collective (peak memory per rank:
        CUDA max allocated, or the process's max RSS on CPU, over the whole run including evaluation and export)."""
        peaks = _all_reduce([peak_mem_gib() if r == self.rank else 0.0 for r in range(self.world)])
        return {"world_size": self.world, "precision": self.precision, "zero_stage": E.zero_stage(self.ds_cfg),
                "peak_mem_gib_ranks": [round(x, 3) for x in peaks]}

    def _finish_training(self, last_tag: str | None) -> None:
        """Called once after the last step and the final checkpoint, before the final evaluation and export."""

    def _log(self, log: MetricsLogger, acc: dict, st: dict, lr: float, dt: float) -> None:
        n, secs = max(acc["n"], 1), max(acc["time"], 1e-9)
        samples, tokens, flops, bad_rows = (x / self.shard_copies for x in _all_reduce(
            [acc["samples"], acc["tokens"], acc["flops"], float(self.stream.counter.bad)]))
        tflops = flops / self.world / secs / 1e12
        self._last_loss = acc["loss"] / n
        log.log_step({
            "step": self.step, "loss": acc["loss"] / n, "lr": lr,
            "grad_norm": self._grad_norm if self.zero == 0 else E.grad_norm(self.engine),
            "loss_scale": E.loss_scale(self.engine), "samples_per_s": samples / secs, "tokens_per_s": tokens / secs,
            "tflops_per_gpu": tflops, "mfu": (tflops / self.peak) if self.peak else None,
            "peak_mem_gib": peak_mem_gib(), "step_ms": 1000 * secs / n,
            "skipped_steps": self.skipped + int(getattr(self.engine, "skipped_steps", 0) or 0),
            "bad_rows": int(bad_rows), "nll_loss": st["nll_loss"], "epoch": self.stream.epoch})

    def _export(self, tag: str | None) -> None:
        """<out>/final/: consolidated fp32 state dict (consolidated_fp32.pt) + HF-style folder (from_pretrained)."""
        if tag is None:
            return
        sd = E.consolidated_state_dict(self.engine, self.ckpt_dir, tag)
        if self.rank == 0:
            from ofa_ds.checkpoint import export_folder
            final = os.path.join(self.out, "final")
            os.makedirs(final, exist_ok=True)
            model = OFAModel(self.model_cfg)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            tied = {"decoder.embed_tokens.weight", "decoder.output_projection.weight", "encoder.embed_tokens.weight"}
            real_missing = [k for k in missing if k not in tied and not k.endswith(("rp_bucket", "image_position_idx"))]
            if real_missing or unexpected:
                raise RuntimeError(f"consolidated state dict does not match the model: missing {real_missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
            torch.save(model.state_dict(), os.path.join(final, "consolidated_fp32.pt"))
            export_folder(model, final)
        dist.barrier()
