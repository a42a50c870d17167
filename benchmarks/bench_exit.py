"""Clean-exit check: N consecutive two-rank ZeRO-3 runs of a short job, counting every rank's exit status.

    python benchmarks/bench_exit.py --runs 50 --log runs/exit_check.log [--csv exit.csv]

Each run starts the ranks the way the deepspeed launcher does (one `python -u launch/pretrain.py --local_rank=i`
per rank with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set), so that the status of each rank process is
seen directly (the launcher folds them into one code: -6, SIGABRT, shows up as 250). The job is the `debug` recipe
with ds_configs/zero3_fp32.json, a few steps, a checkpoint save and a held-out evaluation, no export. Every rank runs
with PYTHONFAULTHANDLER=1: a rank that aborts prints the Python stack of every thread, kept in the log. The summary
line (runs, rank exits by status, aborts) is printed and, with --csv, appended as a row to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

JOB = ["--recipe", "debug", "--ds-config", "ds_configs/zero3_fp32.json", "--steps", "2",
       "--set", "train.save_every=2", "--set", "train.save_final=false", "--set", "train.export_final=false",
       "--set", "eval.max_samples=4"]


def one_run(out: str, world: int, timeout: float, synthetic: str | None) -> list[tuple[int, str]]:
    """[(exit status, output tail)] per rank of one job (status -N: killed by signal N)."""
    from ofa_ds.cluster.ports import free_port, remove_shm_buffers
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
                   PYTHONPATH=ROOT)
        if synthetic:
            env["OFA_DS_SYNTHETIC"] = synthetic
        err = open(os.path.join(out, f"rank{r}.log"), "w+")
        cmd = [sys.executable, "-u", "launch/pretrain.py", f"--local_rank={r}", *JOB, "--out", out]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT), err))
    res = []
    deadline = time.time() + timeout
    for p, err in procs:
        try:
            code = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
            code = 124 if code == -9 else code
        err.seek(0)
        res.append((code, err.read()[-4000:]))
        err.close()
    remove_shm_buffers(int(port))          # DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm file per rank
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before its ranks are killed")
    ap.add_argument("--log", default="-", help="progress and the output of every rank that did not exit 0")
    ap.add_argument("--csv", help="append the summary row to benchmarks/results/<csv>")
    ap.add_argument("--synthetic", help="synthetic data root (OFA_DS_SYNTHETIC) for the job")
    ap.add_argument("--until", help="UTC time HH:MM after which no further run starts (the summary counts the runs "
                                    "done)")
    a = ap.parse_args(argv)
    log = sys.stdout if a.log == "-" else open(a.log, "a", buffering=1)
    counts: collections.Counter = collections.Counter()
    bad_runs = 0
    t0 = time.time()
    done = 0
    for i in range(a.runs):
        if a.until and time.strftime("%H:%M", time.gmtime()) >= a.until:
            print(f"--until {a.until} reached after {done} runs", file=log, flush=True)
            break
        out = tempfile.mkdtemp(prefix="exitcheck_")
        try:
            res = one_run(out, a.world, a.timeout, a.synthetic)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        codes = [c for c, _ in res]
        counts.update(codes)
        done += 1
        bad_runs += any(codes)
        print(f"run {i + 1}/{a.runs}: rank exit codes {codes} ({time.time() - t0:.0f} s)", file=log, flush=True)
        for r, (c, tail) in enumerate(res):
            if c:
                print(f"--- run {i + 1} rank {r} exit {c}, output tail:\n{tail}\n---", file=log, flush=True)
    summary = {"runs": done, "world": a.world, "rank_exits": {str(k): v for k, v in sorted(counts.items())},
               "aborts": counts.get(-6, 0), "failed_runs": bad_runs, "wall_s": round(time.time() - t0, 1)}
    print("SUMMARY " + json.dumps(summary), file=log, flush=True)
    if log is not sys.stdout:
        print("SUMMARY " + json.dumps(summary), flush=True)
    if a.csv:
        from benchmarks.common import append_csv, base_row
        append_csv(a.csv, dict(base_row(), job="debug zero3_fp32 2 steps save+eval", runs=done, world=a.world,
                               rank_exit_0=counts.get(0, 0), aborts=counts.get(-6, 0), failed_runs=bad_runs,
                               wall_s=summary["wall_s"]))
    return 1 if bad_runs else 0


if __name__ == "__main__":
    sys.exit(main())
