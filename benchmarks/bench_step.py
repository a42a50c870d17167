"""Time of one OFA training step in train mode (plain PyTorch, one process, no DeepSpeed), as a fraction of this
machine's own fp32 GEMM peak, with a per-module breakdown.

    python benchmarks/bench_step.py --preset base            # batch 2, 384x384, 20+20 tokens, dropout/drop-path/LS 0.1
    python benchmarks/bench_step.py --default-run            # the default run's step: OFA-Tiny on its real batches
    python benchmarks/bench_step.py --preset base --profile  # + where the time goes (torch.profiler)
    python benchmarks/bench_step.py --compare ../old --rounds 3   # before/after table: alternating subprocesses

Two kinds of step:
  * synthetic (`--preset`): random tokens and images of a fixed shape; forward + OFA's label-smoothed CE + backward
    (add `--optimizer` for the AdamW step). The FLOPs are `ofa_ds.model.flops` (OFA's count, 3 x forward).
  * `--default-run`: the model and batches of `recipes.default()` (16 samples of 64 px, real lengths, packed logits,
    the configured loss), backward, gradient clipping and fused AdamW, i.e. what `deepspeed launch/pretrain.py`
    does per step minus DeepSpeed's bookkeeping. FLOPs per step as the trainer counts them.

What is reported: median/p20/p80 step ms, achieved GFLOP/s, `gemm_peak_gflops` (benchmarks/common.py: the best
1024^3 fp32 matmul rate with the same thread count, measured in this process right before the timed steps) and the
step's fraction of it. On shared CPUs only ratios measured in one run mean anything: `--compare TREE` runs this file
alternately against TREE's `ofa_ds` (e.g. a `git worktree add` of an older commit) and this tree's, A B B A ...,
measuring the GEMM peak in every round, and reports both.

`--profile` attributes the CPU time of one extra step to ResNet, encoder/decoder embedding, position biases (absolute
and relative), encoder layers, decoder layers, output projection, loss and optimizer: forward ops by the labelled
region they run in, backward ops by the autograd sequence number of the forward op that created them (gradient
accumulation into .grad is reported as its own row). It also splits the time into GEMM/convolution kernels and the
rest. Profiling adds per-op overhead, so the shares of small-batch steps overstate the non-GEMM part a little.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from benchmarks.common import append_csv, base_row, gemm_peak_gflops, git_commit  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward", "aten::_mkldnn_convolution", "aten::mkldnn_linear",
            "aten::_convolution", "aten::mkldnn_convolution_backward")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--src-len", type=int, default=20)
    p.add_argument("--tgt-len", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--optimizer", action="store_true", help="synthetic step: include the AdamW update")
    p.add_argument("--default-run", action="store_true", help="the default recipe's model, batches and optimizer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--profile", action="store_true", help="per-module breakdown of one extra step")
    p.add_argument("--no-peak", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--tree", default=None, help="import ofa_ds from this source tree (used by --compare)")
    p.add_argument("--compare", default=None, metavar="TREE",
                   help="alternate runs of TREE's ofa_ds ('before') and this tree's ('after')")
    p.add_argument("--rounds", type=int, default=3, help="--compare: A/B rounds")
    p.add_argument("--label", default="", help="free text stored in the CSV row")
    p.add_argument("--no-csv", action="store_true")
    return p.parse_args(argv)


# ---- the step -------------------------------------------------------------------------------------------------------
class Step:
    """Builds the model and inputs once; `run()` does one timed training step and returns its FLOPs."""

    def __init__(self, a):
        from ofa_ds.config import preset
        from ofa_ds.model import OFAModel
        self.a = a
        self.dev, self.dtype = torch.device(a.device), getattr(torch, a.dtype)
        torch.manual_seed(0)
        if a.default_run:
            from ofa_ds import recipes
            from ofa_ds.data import DataStream
            run = recipes.default()
            self.run_cfg, self.cfg = run, run.model
            self.stream = iter(DataStream(run.data, "train", 0, 1))
        else:
            self.cfg = preset(a.preset, kernel_backend=a.backend, dropout=a.dropout,
                              encoder_drop_path_rate=a.drop_path, decoder_drop_path_rate=a.drop_path)
            g = torch.Generator().manual_seed(0)
            b = a.batch
            self.src = torch.randint(4, 50000, (b, a.src_len), generator=g).to(self.dev)
            self.prev = torch.randint(4, 50000, (b, a.tgt_len), generator=g).to(self.dev)
            self.target = torch.randint(4, 50000, (b, a.tgt_len), generator=g).to(self.dev)
            self.img = torch.randn(b, 3, a.image_size, a.image_size, generator=g).to(self.dev)
        self.model = OFAModel(self.cfg).to(self.dev).train()
        self.opt = None
        if a.default_run or a.optimizer:
            t = self.run_cfg.train if a.default_run else None
            kw = dict(lr=t.lr if t else 1e-4, betas=t.betas if t else (0.9, 0.999),
                      weight_decay=t.weight_decay if t else 0.01)
            try:
                self.opt = torch.optim.AdamW(self.model.parameters(), fused=True, **kw)
            except (RuntimeError, TypeError, ValueError):
                self.opt = torch.optim.AdamW(self.model.parameters(), **kw)
        self.regions = Regions()

    def run(self) -> float:
        a, r = self.a, self.regions
        if a.default_run:
            from ofa_ds.training.evaluate import to_device
            from ofa_ds.training.objective import batch_loss, micro_batch_sizes
            b = next(self.stream)
            flops = micro_batch_sizes(self.cfg, self.run_cfg.train, b).flops
            b = to_device(b, self.dev, self.dtype)
            code_masks = torch.zeros(b["src_tokens"].shape[0], dtype=torch.bool, device=self.dev)
            logits = self.model(b["src_tokens"], b["patch_images"], b["patch_masks"], b["prev_output_tokens"],
                                code_masks=code_masks, keep=b["target"].ne(1))
            with r("loss"):
                out = batch_loss(self.run_cfg.train, logits, b, 1)
                loss = out.loss / out.sample_size
            loss.backward()
            with r("optimizer"):
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run_cfg.train.clip_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            return flops
        from ofa_ds.losses import label_smoothed_ce
        from ofa_ds.model import train_flops_per_sample
        b = a.batch
        with torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(self.src, self.img, torch.ones(b, dtype=torch.bool, device=self.dev), self.prev)
            with r("loss"):
                out = label_smoothed_ce(logits, self.target, eps=a.label_smoothing)
                loss = out.loss / out.sample_size
        loss.backward()
        with r("optimizer"):
            if self.opt is not None:
                self.opt.step()
            self.model.zero_grad(set_to_none=True)
        return train_flops_per_sample(self.cfg, a.image_size, a.src_len, a.tgt_len) * b


# ---- per-module breakdown -------------------------------------------------------------------------------------------
class Regions:
    """Labelled profiler regions: `with regions("loss"):`; no-op unless `on`."""

    PREFIX = "ofa::"

    def __init__(self):
        self.on = False

    def __call__(self, name: str):
        from contextlib import nullcontext
        return torch.profiler.record_function(self.PREFIX + name) if self.on else nullcontext()


def _label_modules(model, regions: Regions) -> list:
    """Forward pre/post hooks that open/close a labelled region around the modules of each category, and wrappers
    around the position-bias functions of ofa_ds.model.ofa. Returns what `_unlabel` needs to undo it."""
    handles, stack = [], []
    cats = [("resnet", model.encoder.embed_images), ("output projection", model.decoder.output_projection)]
    cats += [("encoder layers", m) for m in model.encoder.layers]
    cats += [("decoder layers", m) for m in model.decoder.layers]
    for name, mod in cats:
        def pre(_m, _i, name=name):
            ctx = regions(name)
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _i, _o):
            stack.pop().__exit__(None, None, None)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    ofa = importlib.import_module("ofa_ds.model.ofa")
    patched = []
    funcs = {"embed_encoder": "encoder embedding", "embed_decoder": "decoder embedding",
             "_abs_bias": "position biases", "_pos_heads": "position biases",
             "encoder_layer_bias": "position biases", "decoder_layer_bias": "position biases"}
    for fn_name, label in funcs.items():
        fn = getattr(ofa, fn_name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _label=label, **kw):
            with regions(_label):
                return _fn(*args, **kw)
        setattr(ofa, fn_name, wrapped)
        patched.append((ofa, fn_name, fn))
    return [handles, patched]


def _unlabel(undo) -> None:
    handles, patched = undo
    for h in handles:
        h.remove()
    for mod, name, fn in patched:
        setattr(mod, name, fn)


def breakdown(step: Step) -> dict:
    """Run one step under torch.profiler; CPU ms per category and the GEMM/convolution share."""
    from torch.profiler import ProfilerActivity, profile
    undo = _label_modules(step.model, step.regions)
    step.regions.on = True
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step.run()
            wall = (time.perf_counter() - t0) * 1000
    finally:
        step.regions.on = False
        _unlabel(undo)
    events = list(prof.events())
    pre = Regions.PREFIX

    def region(e):
        while e is not None:
            if e.name.startswith(pre):
                return e.name[len(pre):]
            e = e.cpu_parent
        return None

    def autograd_root(e):
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function"):
                return e
            e = e.cpu_parent
        return None

    seq_label = {}
    for e in events:
        if e.sequence_nr >= 0 and autograd_root(e) is None:
            seq_label.setdefault(e.sequence_nr, region(e) or "other")
    fwd, bwd, gemm, total, ops = {}, {}, 0.0, 0.0, {}
    for e in events:
        if e.name.startswith(pre):
            continue
        t = e.self_cpu_time_total / 1000
        total += t
        ops[e.name] = ops.get(e.name, 0.0) + t
        if e.name in GEMM_OPS:
            gemm += t
        root = autograd_root(e)
        lab = region(e)
        if lab in ("optimizer",):
            fwd[lab] = fwd.get(lab, 0.0) + t
        elif root is not None:
            key = "grad accumulation" if "AccumulateGrad" in root.name else seq_label.get(root.sequence_nr, "other")
            bwd[key] = bwd.get(key, 0.0) + t
        else:
            lab = lab or "other"
            fwd[lab] = fwd.get(lab, 0.0) + t
    rows = {}
    for k in sorted(set(fwd) | set(bwd), key=lambda k: -(fwd.get(k, 0) + bwd.get(k, 0))):
        f, b = fwd.get(k, 0.0), bwd.get(k, 0.0)
        rows[k] = {"forward_ms": round(f, 1), "backward_ms": round(b, 1), "share": round((f + b) / total, 3)}
    return {"profiled_step_ms": round(wall, 1), "cpu_ms": round(total, 1), "gemm_conv_share": round(gemm / total, 3),
            "modules": rows,
            "top_ops_ms": {k: round(v, 1) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]}}


# ---- one measurement ------------------------------------------------------------------------------------------------
def measure(a) -> dict:
    if a.tree:
        sys.path.insert(0, os.path.abspath(a.tree))
    import ofa_ds
    torch.set_num_threads(a.threads)
    try:                                  # what the trainer does on CPU (absent in older trees: left untuned)
        from ofa_ds.training import cpu_malloc
        malloc_tuned = a.device == "cpu" and cpu_malloc.tune()
    except ImportError:
        malloc_tuned = False
    step = Step(a)
    times, cpu, flops = [], [], []
    peak = None
    for i in range(a.warmup + a.steps):
        if i == a.warmup and not a.no_peak:
            peak = gemm_peak_gflops()
        if step.dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        f = step.run()
        if step.dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            flops.append(f)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    # GFLOP/s of the whole timed span (batches differ in --default-run; the median step for fixed shapes)
    gflops = sum(flops) / (sum(times) / 1000) / 1e9 if a.default_run else flops[0] / (med / 1000) / 1e9
    res = {"preset": step.cfg.name, "mode": "default-run" if a.default_run else "synthetic",
           "batch": 16 if a.default_run else a.batch, "image_size": 64 if a.default_run else a.image_size,
           "src_len": "data" if a.default_run else a.src_len, "tgt_len": "data" if a.default_run else a.tgt_len,
           "threads": a.threads, "device": a.device, "dtype": a.dtype, "backend": a.backend,
           "step_ms": round(med, 2), "step_ms_p20": round(q[1], 2), "step_ms_p80": round(q[7], 2),
           "cpu_ms": round(statistics.median(cpu), 2),
           "gflop_per_step": round(statistics.mean(flops) / 1e9, 2), "gflops": round(gflops, 1),
           "gemm_peak_gflops": peak, "peak_fraction": round(gflops / peak, 3) if peak else None,
           "params": step.model.num_params(), "steps": a.steps, "malloc_tuned": malloc_tuned,
           "tree": os.path.dirname(ofa_ds.__path__[0])}
    if a.profile:
        res["breakdown"] = breakdown(step)
    return res


def _worker_cmd(a, tree: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--tree", tree, "--no-csv", "--threads", str(a.threads),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device, "--dtype", a.dtype,
           "--backend", a.backend]
    if a.default_run:
        return cmd + ["--default-run"]
    return cmd + ["--preset", a.preset, "--batch", str(a.batch), "--image-size", str(a.image_size), "--src-len",
                  str(a.src_len), "--tgt-len", str(a.tgt_len), "--dropout", str(a.dropout), "--drop-path",
                  str(a.drop_path), "--label-smoothing", str(a.label_smoothing)] + (["--optimizer"] if a.optimizer
                                                                                     else [])


def compare(a) -> list[dict]:
    """Alternate subprocess runs of the `--compare` tree ('before') and this tree ('after'), A B B A A B ...;
    each run measures its own GEMM peak right before its timed steps. Returns one summary row per tree."""
    trees = {"before": os.path.abspath(a.compare), "after": HERE}
    if not os.path.isdir(os.path.join(trees["before"], "ofa_ds", "kernels")):
        raise SystemExit(f"{trees['before']}/ofa_ds/kernels is missing: in a fresh worktree link it "
                         f"(ln -s ../kernels {trees['before']}/ofa_ds/kernels)")
    runs = {k: [] for k in trees}
    for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for k in order:
            env = dict(os.environ, PYTHONPATH=trees[k])
            out = subprocess.run(_worker_cmd(a, trees[k]), capture_output=True, text=True, env=env, cwd=trees[k])
            if out.returncode != 0:
                raise SystemExit(f"{k} run failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[k].append(res)
            print(json.dumps({"round": r, "tree": k, "step_ms": res["step_ms"], "gflops": res["gflops"],
                              "gemm_peak_gflops": res["gemm_peak_gflops"]}), file=sys.stderr, flush=True)
    rows = []
    for k, rs in runs.items():
        row = dict(rs[0])
        for key in ("step_ms", "cpu_ms", "gflops", "gemm_peak_gflops", "peak_fraction"):
            row[key] = round(statistics.median(r[key] for r in rs), 3)
        row["steps"] = a.steps * a.rounds
        row["variant"] = k
        row["commit_tested"] = git_commit(trees[k])
        rows.append(row)
    rows[1]["speedup_vs_before"] = round(rows[0]["step_ms"] / rows[1]["step_ms"], 3)
    return rows


CSV_FIELDS = ["date", "commit", "machine", "torch", "variant", "commit_tested", "preset", "mode", "batch",
              "image_size", "src_len", "tgt_len", "threads", "device", "dtype", "backend", "step_ms", "step_ms_p20",
              "step_ms_p80", "cpu_ms", "gflop_per_step", "gflops", "gemm_peak_gflops", "peak_fraction",
              "speedup_vs_before", "params", "steps", "label"]


def csv_row(res: dict, label: str) -> dict:
    row = {**base_row(), "variant": "", "commit_tested": "", "speedup_vs_before": "", **res, "label": label}
    return {k: row.get(k, "") for k in CSV_FIELDS}


def main(argv=None):
    a = _args(argv)
    if a.compare:
        torch.set_num_threads(a.threads)
        rows = compare(a)
        for r in rows:
            print(json.dumps(r))
            if not a.no_csv:
                append_csv("bench_step.csv", csv_row(r, a.label))
        return rows
    res = measure(a)
    print(json.dumps(res))
    if not a.no_csv:
        append_csv("bench_step.csv", csv_row(res, a.label))
    return res


if __name__ == "__main__":
    main()
