"""Wall time of the default run as a user meets it: `deepspeed launch/pretrain.py` with no arguments, started in an
empty folder (so the synthetic data is generated first, as on a fresh install), until its report is printed. One CSV
row per run in benchmarks/results/default_run.csv with the wall time, the run's held-out metrics and this machine's
fp32 GEMM peak measured under the same settings just before and after the run.

    python benchmarks/bench_default_run.py                    # this machine as it is
    python benchmarks/bench_default_run.py --isa sse          # emulate the slow class of 2-core machine (below)
    python benchmarks/bench_default_run.py --set train.max_steps=600 --label "shorter recipe trial"

What is unusual:
  * `--isa sse` caps the instruction set that the math libraries use: MKL to SSE4.2 (`MKL_ENABLE_INSTRUCTIONS=AVX`,
    which MKL maps to SSE4.2 on current versions), oneDNN to AVX (`ONEDNN_MAX_CPU_ISA`) and PyTorch's own
    vectorised kernels to their scalar build (`ATEN_CPU_CAPABILITY=default`). On a 2-core AVX-512 Xeon whose normal
    2-thread fp32 GEMM peak is ~340 GFLOP/s this measures ~68 GFLOP/s, the peak of the slowest 2-core machines this
    project runs on (an AMD EPYC at ~67). It is an emulation, not that machine: element-wise kernels run scalar
    (slower than an AVX2 machine would run them) while memory bandwidth and caches stay the Xeon's. The row records
    the setting and the measured peak; read it as "a machine with this GEMM peak", nothing finer (its calibration
    against the real slow machine: docs/benchmarks.md#the-default-runs-wall-time).
  * `--data DIR` reuses an existing synthetic data folder (a symlink into the empty run folder): the figure is then
    the run without the first-use generation, and the row says so (`fresh_data` = 0).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import append_csv, base_row  # noqa: E402
from ofa_ds.cluster.ports import free_port  # noqa: E402

ISA_ENV = {
    "native": {},
    "sse": {"MKL_ENABLE_INSTRUCTIONS": "AVX", "ONEDNN_MAX_CPU_ISA": "AVX", "ATEN_CPU_CAPABILITY": "default"},
}
METRICS = ["vqa_acc", "vqa_majority_baseline", "caption_cider", "caption_constant_baseline_cider", "refcoco_acc50",
           "refcoco_miou", "refcoco_mean_box_baseline_miou", "steps", "wall_s"]


def peak(env: dict, threads: int) -> float:
    """The fp32 GEMM peak in a fresh process with `env` (the ISA settings only take effect at library load)."""
    code = (f"import torch, sys; sys.path.insert(0, {ROOT!r}); torch.set_num_threads({threads}); "
            "from benchmarks.common import gemm_peak_gflops; print(gemm_peak_gflops(seconds=2.0))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", choices=sorted(ISA_ENV), default="native", help="instruction-set cap (see above)")
    ap.add_argument("--data", default=None, help="reuse this synthetic data folder (no first-use generation)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to launch/pretrain.py")
    ap.add_argument("--threads", type=int, default=2, help="threads for the GEMM peak (the run uses its default)")
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (printed)")
    ap.add_argument("--no-csv", action="store_true")
    a = ap.parse_args()
    if a.data and not os.path.isfile(os.path.join(a.data, "manifest.json")):
        sys.exit(f"--data {a.data}: not a synthetic data folder (no manifest.json); give the data/synthetic folder "
                 "a default run generated, or leave --data out")

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **ISA_ENV[a.isa])
    env.pop("OFA_DS_SYNTHETIC", None)
    peak_before = peak(env, a.threads)
    work = tempfile.mkdtemp(prefix="ofa_ds_default_run_")
    if a.data:
        os.makedirs(os.path.join(work, "data"))
        os.symlink(os.path.abspath(a.data), os.path.join(work, "data", "synthetic"))
    cmd = ["deepspeed", "--master_port", str(free_port()), os.path.join(ROOT, "launch", "pretrain.py")]
    for s in a.set:
        cmd += ["--set", s]
    print(f"[bench_default_run] isa={a.isa} peak={peak_before} GFLOP/s; running {' '.join(cmd)} in {work}",
          flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    peak_after = peak(env, a.threads)
    if p.returncode != 0:
        sys.exit(f"the run failed (exit {p.returncode}); its output's tail:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    from ofa_ds.training.cli import last_json_line
    report = last_json_line(p.stdout)
    row = dict(base_row(), isa=a.isa, gemm_peak_before=peak_before, gemm_peak_after=peak_after,
               fresh_data=int(a.data is None), overrides=" ".join(a.set), wall_total_s=round(wall, 1),
               **{k: report.get(k) for k in METRICS}, label=a.label)
    print(json.dumps(row), flush=True)
    if not a.no_csv:
        print("wrote", append_csv("default_run.csv", row))
    if a.keep:
        print("run folder:", work)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
