"""Shared benchmark plumbing: environment capture and CSV rows (date, commit, machine) under benchmarks/results/."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit(tree: str | None = None) -> str:
    """HEAD's short hash of this checkout, or of the checkout `tree`; for this checkout OFA_DS_COMMIT overrides it (a
    copied tree without .git, e.g. on a benchmark machine)."""
    if tree is None and os.environ.get("OFA_DS_COMMIT"):
        return os.environ["OFA_DS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=tree or os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def machine() -> str:
    """'cpu:<model> x<threads>' or the CUDA device name."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{model} x{torch.get_num_threads()}threads"


def gemm_peak_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's fp32 matrix-multiply throughput now (GFLOP/s, best of repeated n x n products over about
    `seconds`), with torch's current thread count: recorded beside CPU timings, which differ between machines."""
    import time
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b                                                   # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return round(best, 1)


def base_row() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(),
            "machine": machine(), "torch": torch.__version__}


def append_csv(name: str, row: dict, folder: str | None = None) -> str:
    """Append one row to <folder or results>/<name>; the header is written when the file is new."""
    folder = folder or RESULTS
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    return path
