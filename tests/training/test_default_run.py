"""The headline: `deepspeed launch/pretrain.py` with no arguments, from an empty directory, generates the synthetic
data, trains OFA-Tiny, and its last JSON line is the report with learning visible against the trivial baselines.
Takes the full run, hence slow. Its wall time is a benchmark figure (benchmarks/bench_default_run.py), not asserted
here: a timed test fails on a loaded machine and passes on a fast one without saying anything about the code."""
import json
import os
import subprocess
import time

import pytest

from ofa_ds.training.cli import last_json_line

from .conftest import ROOT, free_port


@pytest.mark.slow
@pytest.mark.distributed
def test_default_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OFA_DS_SYNTHETIC", None)
    t0 = time.time()
    p = subprocess.run(["deepspeed", "--master_port", str(free_port()), os.path.join(ROOT, "launch", "pretrain.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = last_json_line(p.stdout)
    assert os.path.isfile(tmp_path / "data" / "synthetic" / "manifest.json")
    with open(tmp_path / "runs" / "default" / "report.json") as f:
        assert json.load(f) == report                       # the printed report is the one written
    assert report["vqa_acc"] >= 0.6 and report["vqa_majority_baseline"] <= 0.25, report
    assert report["caption_cider"] > report["caption_constant_baseline_cider"], report
    assert report["refcoco_miou"] > report["refcoco_mean_box_baseline_miou"], report
    print(f"default run: {wall:.0f} s wall", report)
