"""Training metrics with fixed names, written three ways (console line, metrics.jsonl, TensorBoard) by rank 0.

Names (identical in the console line, the JSONL records, TensorBoard tags and benchmark CSVs):
  step, loss, lr, grad_norm, loss_scale, samples_per_s, tokens_per_s, tflops_per_gpu, mfu, peak_mem_gib, step_ms,
  skipped_steps, bad_rows   (plus nll_loss, epoch, and eval metrics as eval/<name> in TensorBoard).
bad_rows counts the data rows skipped so far over all ranks; `bad_rows_by_reason` ({category: rows}, the categories of
ofa_ds/data/tsv.py's CATEGORIES that occurred) splits it: a JSONL field, TensorBoard scalars bad_rows/<category>, and
"(image 2, columns 1)" after bad_rows on the console line.

TFLOP/s per device = the model's analytic training FLOPs of the samples this rank processed / step time. MFU is that
over the peak dense throughput of the device in the run's precision (table below; None on CPU or an unknown GPU).
Peak memory: CUDA max allocated on a GPU, the process's max resident set size on CPU. A progress bar with ETA goes to
stderr on rank 0 (tqdm); the console line goes through it so the two do not interleave.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

import torch

METRIC_NAMES = ("step", "loss", "lr", "grad_norm", "loss_scale", "samples_per_s", "tokens_per_s", "tflops_per_gpu",
                "mfu", "peak_mem_gib", "step_ms", "skipped_steps", "bad_rows")

# Dense peak TFLOP/s per device: (bf16/fp16 tensor cores, fp32 without TF32). SXM parts; H200 has H100's compute.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "V100": (125.0, 15.7),
}


def device_peak_tflops(precision: str, device_name: str | None = None) -> float | None:
    """Peak TFLOP/s of the current CUDA device for `precision`, None on CPU or for a GPU not in the table."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, (low, fp32) in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return fp32 if precision == "fp32" else low
    return None


def peak_mem_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def _fmt(k: str, v: Any) -> str:
    if v is None:
        return f"{k} -"
    if isinstance(v, float):
        if k in ("lr",):
            return f"{k} {v:.3e}"
        return f"{k} {v:.4g}"
    return f"{k} {v}"


def _by_count(counts: dict[str, int]) -> str:
    """'image 2, columns 1': most frequent first."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class MetricsLogger:
    """Rank-0 sink for step records and evaluation results. Other ranks get a logger that does nothing."""

    def __init__(self, out_dir: str, total_steps: int, rank: int = 0, progress: bool = True, tensorboard: bool = True,
                 start_step: int = 0):
        self.active = rank == 0
        self.total = total_steps
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0, disable=None)

    def echo(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        sys.stdout.flush()

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def log_step(self, record: dict[str, Any]) -> None:
        """One console line + one JSONL record + TensorBoard scalars, all with the fixed names."""
        if not self.active:
            return
        rec = {k: record.get(k) for k in METRIC_NAMES}
        rec.update({k: v for k, v in record.items() if k not in rec})
        rec["time"] = round(time.time(), 3)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        reasons = rec.get("bad_rows_by_reason") or {}
        self.echo(f"step {rec['step']}/{self.total} | " + " | ".join(_fmt(k, rec[k]) for k in METRIC_NAMES[1:])
                  + (f" ({_by_count(reasons)})" if reasons else ""))
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, float(v), rec["step"])
            for reason, n in reasons.items():
                self.tb.add_scalar(f"bad_rows/{reason}", float(n), rec["step"])
            self.tb.flush()

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "eval": metrics, "time": round(time.time(), 3)}) + "\n")
        self.echo(f"eval step {step} | " + " | ".join(_fmt(k, v) for k, v in metrics.items()))
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"eval/{k}", float(v), step)
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
