"""The headline: `deepspeed launch/pretrain.py` with no arguments, from an empty directory, generates the synthetic
data, trains OFA-Tiny, and its last line is the JSON report with learning visible against the trivial baselines.
Takes the full run (the budget, asserted: 10 minutes on two cores), hence slow."""
import json
import os
import subprocess
import time

import pytest

from .conftest import ROOT, free_port


@pytest.mark.slow
def test_default_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OFA_DS_SYNTHETIC", None)
    t0 = time.time()
    p = subprocess.run(["deepspeed", "--master_port", str(free_port()), os.path.join(ROOT, "launch", "pretrain.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert os.path.isfile(tmp_path / "data" / "synthetic" / "manifest.json")
    assert report["vqa_acc"] >= 0.6 and report["vqa_majority_baseline"] <= 0.25, report
    assert report["caption_cider"] > report["caption_constant_baseline_cider"], report
    assert report["refcoco_miou"] > report["refcoco_mean_box_baseline_miou"], report
    print(f"default run: {wall:.0f} s wall", report)
    assert wall <= 600, f"the default run took {wall:.0f} s; the budget is 10 minutes on two cores"
