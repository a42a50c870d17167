"""benchmarks/bench_step.py on the debug preset: one timed step, GFLOP/s from OFA's FLOP count, and a profile whose
categories cover the model's parts and add up to the whole step."""
import pytest

from benchmarks import bench_step


def test_bench_step_reports_flops_and_breakdown():
    res = bench_step.main(["--preset", "debug", "--batch", "1", "--image-size", "32", "--src-len", "5", "--tgt-len",
                           "4", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-peak", "--no-csv",
                           "--optimizer", "--profile"])
    assert res["step_ms"] > 0 and res["gflop_per_step"] > 0 and res["gflops"] > 0
    rows = res["breakdown"]["modules"]
    for part in ("resnet", "encoder layers", "decoder layers", "position biases", "loss", "optimizer"):
        assert rows[part]["forward_ms"] + rows[part]["backward_ms"] > 0, part
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0, abs=0.02)
    assert 0 < res["breakdown"]["gemm_conv_share"] < 1
