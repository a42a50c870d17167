"""One row of benchmarks/results/scst.csv: held-out caption CIDEr-D of a stage-1 run and of the SCST (caption stage 2)
run started from it, read from their report.json / config.json (docs/training.md#caption-stage-2-scst).

    python benchmarks/record_scst.py --stage1 runs/caption --scst runs/caption_scst

The two runs' final evaluations are the same code on the same held-out rows (the recipe's eval settings), so the
pair is a before/after of stage 2. The machine's fp32 GEMM peak is measured in the same call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import append_csv, base_row, gemm_peak_gflops  # noqa: E402


def _read(run: str, name: str) -> dict:
    with open(os.path.join(run, name)) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage1", required=True, help="the stage-1 run folder (--init of the SCST run)")
    p.add_argument("--scst", required=True, help="the SCST run folder")
    a = p.parse_args(argv)
    before, after = _read(a.stage1, "report.json"), _read(a.scst, "report.json")
    cfg = _read(a.scst, "config.json")
    t, d = cfg["train"], cfg["data"]
    row = {**base_row(), "gemm_peak_gflops": round(gemm_peak_gflops(), 1), "preset": cfg["model"]["name"],
           "image_size": d["patch_image_size"], "steps": after["steps"],
           "images_per_step": d["batch_size"] * t["grad_accum"] * after["world_size"],
           "samples_per_image": t["scst_samples"], "lr": t["lr"], "frozen_bn": cfg["model"]["frozen_bn"],
           "world_size": after["world_size"], "zero_stage": after["zero_stage"], "wall_s": after["wall_s"],
           "heldout_n": after.get("caption_n"), "cider_stage1": round(before["caption_cider"], 4),
           "cider_scst": round(after["caption_cider"], 4), "exact_stage1": before.get("caption_exact"),
           "exact_scst": after.get("caption_exact")}
    print(json.dumps(row))
    append_csv("scst.csv", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
