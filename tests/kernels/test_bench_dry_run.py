"""benchmarks/bench_kernels.py works end to end (CPU dry run: interpreter, tiny shapes): every provider runs, agrees
with the fp32 reference (the script checks each output before timing), and its rows carry no GPU figures."""
import csv
import os

import pytest

from benchmarks import bench_kernels


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the dry run needs the Triton interpreter "
                    "(set when no GPU is present); GPUs run the real benchmark")
def test_bench_kernels_dry_run(tmp_path):
    rc = bench_kernels.main(["--dry-run", "--out-dir", str(tmp_path), "--cases", "dry_dec_self", "--widths", "37",
                             "--ln-providers", "ours,torch"])
    assert rc == 0
    with open(os.path.join(tmp_path, "kernels.csv")) as f:
        rows = list(csv.DictReader(f))
    providers = {(r["op"], r["provider"]) for r in rows}
    assert {("attention", "ours"), ("attention", "sdpa"), ("attention", "eager"), ("layernorm", "ours"),
            ("layernorm", "torch")} <= providers
    assert all(r["device"] == "cpu-interpreter" and r["throughput"] == "" for r in rows)
    assert all("WRONG" not in r["note"] and not r["note"].startswith("error") for r in rows)
    assert {r["mode"] for r in rows if r["provider"] == "ours"} == {"fwd", "bwd", "fwd_bwd"}
