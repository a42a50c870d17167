"""Peak memory and parameters per rank for OFA presets × parallel strategies, plus DeepSpeed's memory estimators.

Three modes:

  python benchmarks/bench_memory.py sweep [--presets tiny,medium] [--strategies zero0,zero3,pipe2] [--ac both]
      launches one 2-rank DeepSpeed job (CPU, gloo, fp32, AdamW) per preset × strategy × activation checkpointing
      and appends one CSV row per job to benchmarks/results/memory.csv (date, commit, machine, per-rank peak RSS,
      parameters per rank, wall time of the training steps).
  deepspeed --num_gpus 2 benchmarks/bench_memory.py run --preset huge --strategy zero3 --steps 2 --image 64
      one such job (what the sweep starts; launch/huge_*.sh call it for OFA-Huge).
  python benchmarks/bench_memory.py estimate [--preset huge]
      DeepSpeed's own estimators (estimate_zero2/zero3_model_states_mem_needs, mixed precision on GPUs) for cluster
      shapes not runnable here, ZeRO-0 and pipeline model-state sizes from the per-parameter byte counts, and the
      fp32/CPU case of this machine; rows to benchmarks/results/memory_estimates.csv, a table on stdout.

Strategies: zero0/zero1/zero2/zero3 (dense OFAModel; ZeRO-3 is built under deepspeed.zero.Init so no rank ever holds
the whole model), zero3_offload (optimizer + parameters offloaded to CPU, i.e. DeepSpeedCPUAdam), pipe2 (the 2-stage
PipelineModule of ofa_ds.training.pipeline with ZeRO-0: with 2 ranks there is no data parallelism to shard over).
`--ac` switches per-layer activation checkpointing on. Memory is the process's peak resident set (ru_maxrss), which
on CPU holds parameters, gradients, optimizer states, activations and the ~0.4 GiB of the Python/torch runtime
(reported separately as base_rss_gib, measured before the model is built).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ofa_ds.cluster.ports import free_port, remove_shm_buffers  # noqa: E402

STRATEGIES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload", "pipe2")
GIB = 1024 ** 3


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class PhaseSampler:
    """Background thread: the largest current RSS seen in each phase ("build", "initialize", "step1", ...)."""

    def __init__(self, period: float = 0.25, verbose: bool = False):
        import threading
        self.verbose = verbose
        self.phase, self.peaks, self.period = "start", {}, period
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        n = 0
        while not self._stop.is_set():
            r = current_rss_gib()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), r)
            n += 1
            if self.verbose and n % int(5 / self.period) == 0:
                print(f"RSS rank{os.environ.get('RANK', '?')} {self.phase} {r:.2f} GiB", flush=True)
            self._stop.wait(self.period)

    def set(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), current_rss_gib())
        self.phase = phase

    def stop(self) -> dict:
        self.set("end")
        self._stop.set()
        return {k: round(v, 2) for k, v in self.peaks.items()}


# ---- one job (runs under the deepspeed launcher) ---------------------------------------------------------------------
def make_batch(cfg, batch: int, image: int, src_len: int, tgt_len: int, seed: int) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    prev = torch.randint(4, cfg.vocab_size, (batch, tgt_len), generator=g)
    prev[:, 0] = 0
    return {"src_tokens": torch.randint(4, cfg.vocab_size, (batch, src_len), generator=g),
            "patch_images": torch.randn(batch, 3, image, image, generator=g),
            "patch_masks": torch.ones(batch, dtype=torch.bool), "prev_output_tokens": prev,
            "target": torch.cat([prev[:, 1:], torch.full((batch, 1), 2)], 1), "code_masks": None}


def ds_config(strategy: str, batch: int) -> dict:
    stage = 0 if strategy == "pipe2" else int(strategy[4])
    z: dict = {"stage": stage}
    if stage == 3:
        # release every gathered parameter right after use (reuse distance 0): with DeepSpeed's default (1e9) a
        # rank keeps the whole gathered model alive between forward and backward, i.e. no ZeRO-3 saving on CPU
        z.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(5e7),
                 stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=int(2e7), reduce_bucket_size=int(2e7),
                 sub_group_size=int(5e7))     # the optimizer step makes fp32 copies per sub-group: keep them small
    if stage in (1, 2):
        z.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if strategy == "zero3_offload":
        z.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "gradient_clipping": 1.0, "zero_optimization": z, "zero_allow_untested_optimizer": True}
    if strategy == "zero3_offload":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.01}}
    return cfg


def run_job(a) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    from ofa_ds.training.activation_checkpoint import set_activation_checkpointing
    from ofa_ds.training.pipeline import PipeLoss, batch_to_pipe, build_pipeline

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    base = current_rss_gib()
    sampler = PhaseSampler(verbose=a.verbose)
    sampler.set("build")
    cfg = preset(a.preset)
    dcfg = ds_config(a.strategy, a.batch)
    loss_fn = PipeLoss(eps=0.1)
    t0 = time.time()
    if a.strategy == "pipe2":
        model = build_pipeline(cfg, num_stages=world, loss_fn=loss_fn, activation_checkpointing=a.ac,
                               partition_method=a.partition)
        local = sum(p.numel() for p in model.parameters())
    else:
        if a.strategy.startswith("zero3"):
            # built under zero.Init and initialised module by module, as the trainer does (training/zero3.py)
            from ofa_ds.training.zero3 import build_sharded
            model = build_sharded(cfg, dcfg)
        else:
            model = OFAModel(cfg)
        model.train()
        if a.ac:
            set_activation_checkpointing(model, True)
        local = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
    built_rss = current_rss_gib()
    sampler.set("initialize")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None
    if a.strategy != "zero3_offload":
        if a.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=False)
        else:   # 12 (momentum) or 8 bytes per parameter instead of 16, for when the machine is shared
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9 if a.optimizer == "sgd" else 0.0, foreach=False)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params if opt is None else None,
                                           optimizer=opt, config=dcfg)
    init_s = time.time() - t0
    step_s, losses = [], []
    for step in range(a.steps):
        b = make_batch(cfg, a.batch, a.image, a.src_len, a.tgt_len, seed=100 * step + rank)
        t = time.time()
        sampler.set(f"step{step + 1}")
        if a.strategy == "pipe2":
            loss = engine.train_batch(iter([batch_to_pipe(b)]))
        else:
            logits = engine(b["src_tokens"], b["patch_images"], b["patch_masks"], b["prev_output_tokens"])
            loss = loss_fn(logits, b["target"])
            engine.backward(loss)
            engine.step()
        step_s.append(time.time() - t)
        losses.append(float(loss))
    rec = {"rank": rank, "peak_rss_gib": round(rss_gib(), 3), "base_rss_gib": round(base, 3),
           "built_rss_gib": round(built_rss, 3), "params_local": int(local), "init_s": round(init_s, 1),
           "step_s": [round(s, 2) for s in step_s], "losses": [round(x, 4) for x in losses],
           "phase_peak_rss_gib": sampler.stop()}
    recs = [None] * world
    dist.all_gather_object(recs, rec)
    row = None
    if rank == 0:
        from benchmarks.common import append_csv, base_row
        row = dict(base_row(), preset=a.preset, strategy=a.strategy, act_ckpt=int(a.ac), ranks=world,
                   batch=a.batch, image=a.image, src_len=a.src_len, tgt_len=a.tgt_len,
                   params_total=_count_params(cfg),
                   params_rank0=recs[0]["params_local"], params_rank1=recs[-1]["params_local"],
                   peak_rss_gib_rank0=recs[0]["peak_rss_gib"], peak_rss_gib_rank1=recs[-1]["peak_rss_gib"],
                   base_rss_gib=recs[0]["base_rss_gib"], init_s=recs[0]["init_s"], steps=a.steps,
                   step_s_mean=round(sum(recs[0]["step_s"]) / len(recs[0]["step_s"]), 2),
                   wall_s=round(recs[0]["init_s"] + sum(recs[0]["step_s"]), 1),
                   loss_first=recs[0]["losses"][0] if a.strategy != "pipe2" else recs[-1]["losses"][0],
                   loss_last=recs[0]["losses"][-1] if a.strategy != "pipe2" else recs[-1]["losses"][-1],
                   optimizer=a.optimizer if a.strategy != "zero3_offload" else "ds_cpu_adamw")
        if a.csv:
            append_csv(a.csv, row, folder=a.results)
        print("MEMROW " + json.dumps(row), flush=True)
        print("RANKS " + json.dumps(recs), flush=True)
    dist.barrier()
    return row


def _count_params(cfg) -> int:
    import torch
    from ofa_ds.model import OFAModel
    with torch.device("meta"):
        return OFAModel(cfg).num_params()


# ---- sweep ----------------------------------------------------------------------------------------------------------
def sweep(a) -> int:
    acs = {"off": [False], "on": [True], "both": [False, True]}[a.ac_mode]
    failed = 0
    for p in a.presets.split(","):
        for s in a.strategies.split(","):
            for ac in acs:
                port = free_port()
                cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.abspath(__file__),
                       "run", "--preset", p, "--strategy", s, "--steps", str(a.steps), "--image", str(a.image),
                       "--batch", str(a.batch), "--src-len", str(a.src_len), "--tgt-len", str(a.tgt_len),
                       "--csv", a.csv] + (["--ac"] if ac else [])
                env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                           MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"),
                           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                remove_shm_buffers(port)
                line = [x for x in r.stdout.splitlines() if x.startswith("MEMROW ")]
                if r.returncode or not line:
                    failed += 1
                    print(f"{p} {s} ac={ac}: FAILED rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
                    continue
                row = json.loads(line[0][7:])
                print(f"{p:7s} {s:14s} ac={int(ac)} peak GiB r0={row['peak_rss_gib_rank0']:.2f} "
                      f"r1={row['peak_rss_gib_rank1']:.2f} params r0={row['params_rank0']:,} "
                      f"step={row['step_s_mean']}s", flush=True)
    return 1 if failed else 0


# ---- estimates ------------------------------------------------------------------------------------------------------
CLUSTERS = [("8xA100-40GB", 8, 1, 40), ("8xA100-80GB", 8, 1, 80), ("8xV100-32GB", 8, 1, 32),
            ("2x8 A100-40GB", 8, 2, 40), ("2x8 V100-32GB", 8, 2, 32),
            ("this machine: 2 CPU ranks sharing 24 GiB", 2, 1, 12)]


def pipeline_stage_params(cfg, stages: int = 2) -> list[int]:
    """Parameters per stage of build_pipeline(partition_method='parameters') (tied table on first and last)."""
    from deepspeed.runtime.utils import partition_balanced
    from ofa_ds.training.pipeline import build_layer_modules, layer_roles
    mods = build_layer_modules(cfg)
    counts = [0 if m is None else sum(p.numel() for p in m.parameters()) for m in mods]
    counts[-1] = counts[0]                    # as OFAPipelineModule._count_layer_params: first and last use
    parts = partition_balanced(weights=counts, num_parts=stages)
    counts[-1] = 0
    if parts[1] < 2:
        parts[1] = 2
    tied = counts[0]
    out = []
    for s in range(stages):
        n = sum(counts[parts[s]:parts[s + 1]])
        roles = [layer_roles(cfg)[i][0] for i in range(parts[s], parts[s + 1])]
        if any(r.startswith("tied") for r in roles) and counts[0] and 0 not in range(parts[s], parts[s + 1]):
            n += tied
        out.append(n)
    return out


def largest_layer(cfg) -> int:
    import torch
    from ofa_ds.model import OFAModel
    with torch.device("meta"):
        m = OFAModel(cfg)
    return max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())


def estimate(a) -> int:
    import io
    from contextlib import redirect_stdout

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from benchmarks.common import append_csv, base_row
    from ofa_ds.config import preset
    cfg = preset(a.preset)
    total, big = _count_params(cfg), largest_layer(cfg)
    stage = pipeline_stage_params(cfg, 2)
    print(f"OFA-{a.preset}: {total:,} parameters, largest layer {big:,}; 2-stage pipeline stages {stage}")
    print("model states only (no activations). GPUs: DeepSpeed's estimators, mixed precision (2 param + 2 grad + "
          "12 fp32 master/Adam bytes per parameter); PP2+Z1 = 2 stages, ZeRO-1 over the remaining data parallelism. "
          "This machine: fp32, 4 + 4 + 8 bytes, + a 4-byte fp32 master copy of the partition under ZeRO-1/2")
    hdr = f"{'cluster':36s} {'ZeRO-0':>9s} {'ZeRO-2':>9s} {'ZeRO-3':>9s} {'Z3+offl':>9s} {'PP2+Z1':>9s}  GiB/device"
    print(hdr)
    for name, per_node, nodes, cap in CLUSTERS:
        n = per_node * nodes
        with redirect_stdout(io.StringIO()):
            _, z2 = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
            _, z3, _ = estimate_zero3_model_states_mem_needs(total, big, per_node, nodes, cpu_offload=False,
                                                             cpu_offload_params=False, zero_init=True)
            cpu_z3, z3o, _ = estimate_zero3_model_states_mem_needs(total, big, per_node, nodes, cpu_offload=True,
                                                                   cpu_offload_params=True, zero_init=True)
        z0 = 16 * total
        dp = max(n // 2, 1)
        pp = 4 * max(stage) + 12 * max(stage) / dp      # bf16 param+grad, fp32 states sharded over dp (ZeRO-1)
        if name.startswith("this machine"):
            # fp32 on CPU: param 4 + grad 4 + Adam 8. ZeRO-1/2 keep a flat fp32 master copy of their partition
            # (4/n more); ZeRO-3 reuses fp32 partitions as master weights (no copy); offload changes nothing on CPU
            z0, z2 = 16 * total, 4 * total + 16 * total / n
            z3 = z3o = 16 * total / n
            pp = 16 * max(stage)
        vals = [z0, z2, z3, z3o, pp]
        fits = ["fits" if v / GIB < 0.8 * cap else "no" for v in vals]
        print(f"{name:36s} " + " ".join(f"{v / GIB:8.1f}{'*' if f == 'no' else ' '}" for v, f in zip(vals, fits))
              + f"  (capacity {cap} GiB per device/rank; * = over 80%)")
        append_csv("memory_estimates.csv", dict(base_row(), preset=a.preset, cluster=name, devices=n,
                                                capacity_gib=cap, params=total,
                                                zero0_gib=round(z0 / GIB, 2), zero2_gib=round(z2 / GIB, 2),
                                                zero3_gib=round(z3 / GIB, 2), zero3_offload_gib=round(z3o / GIB, 2),
                                                zero3_offload_cpu_gib_per_node=round(cpu_z3 / GIB, 1),
                                                pipe2_zero1_gib=round(pp / GIB, 2)), folder=a.results)
    return 0


def table(a) -> int:
    """Markdown table of benchmarks/results/memory.csv (latest row per preset/strategy/ac/batch/image/optimizer)."""
    import csv
    with open(os.path.join(a.results, "memory.csv")) as f:
        rows = list(csv.reader(f))
    head, latest = rows[0], {}
    for r in rows[1:]:
        d = dict(zip(head + ["optimizer"], r))
        d.setdefault("optimizer", "adamw")
        if d["strategy"] == "zero3_offload":
            d["optimizer"] = "ds_cpu_adamw"
        key = (d["preset"], d["strategy"], d["act_ckpt"], d["batch"], d["image"], d["optimizer"])
        latest[key] = d
    print("| preset | strategy | act. ckpt | batch × image | optimizer | params rank0 / rank1 "
          "| peak RSS GiB rank0 / rank1 | step s | date, commit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in latest.values():
        print(f"| {d['preset']} | {d['strategy']} | {'on' if d['act_ckpt'] == '1' else 'off'} | {d['batch']} × "
              f"{d['image']} px | {d['optimizer']} | {int(d['params_rank0']) / 1e6:.1f}M / "
              f"{int(d['params_rank1']) / 1e6:.1f}M | {float(d['peak_rss_gib_rank0']):.2f} / "
              f"{float(d['peak_rss_gib_rank1']):.2f} | {d['step_s_mean']} | {d['date'][:10]}, {d['commit']} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local_rank", type=int, default=-1)      # the deepspeed launcher puts it first
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "sweep"):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--image", type=int, default=64)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--src-len", type=int, default=16)
        p.add_argument("--tgt-len", type=int, default=16)
        p.add_argument("--csv", default="memory.csv", help="file name under --results ('' = no CSV)")
        p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    r = sub.choices["run"]
    r.add_argument("--preset", default="tiny")
    r.add_argument("--strategy", choices=STRATEGIES, default="zero3")
    r.add_argument("--ac", action="store_true", help="per-layer activation checkpointing")
    r.add_argument("--partition", default="parameters", help="pipeline partition_method")
    r.add_argument("--verbose", action="store_true", help="print each rank's RSS every 5 s")
    r.add_argument("--optimizer", choices=("adamw", "sgd", "sgd_plain"), default="adamw",
                   help="sgd = SGD with momentum 0.9 (12 instead of 16 bytes of model state per parameter), "
                        "sgd_plain = no momentum (8 bytes)")
    s = sub.choices["sweep"]
    s.add_argument("--presets", default="tiny,medium")
    s.add_argument("--strategies", default=",".join(STRATEGIES))
    s.add_argument("--ac-mode", choices=("off", "on", "both"), default="both")
    e = sub.add_parser("estimate")
    e.add_argument("--preset", default="huge")
    e.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    t = sub.add_parser("table")
    t.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args(argv)
    if a.cmd == "table":
        return table(a)
    if a.cmd == "run":
        run_job(a)
        return 0
    if a.cmd == "sweep":
        return sweep(a)
    return estimate(a)


if __name__ == "__main__":
    from ofa_ds.training.shutdown import exit_process
    exit_process(main())   # not sys.exit: see ofa_ds.training.shutdown
