"""The Trainer resolves the RunConfig once, into a new object, and never writes into the one it was given: the
checkpoint's architecture, epochs -> max_steps and "auto" precision land in `trainer.run_cfg` and config.json.
Runs in a fresh process: DeepSpeed keeps module-level process groups that a second engine in the same process would
find stale."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPT = r"""
import json, sys
from ofa_ds.recipes import get_recipe
from ofa_ds.training.trainer import Trainer
run = get_recipe("debug").override([f"out_dir={json.dumps(sys.argv[1])}", "train.epochs=1",
                                    'train.precision="auto"', "eval.data={}"])
before = run.to_dict()
tr = Trainer(run)
tr.setup()
print(json.dumps({"unchanged": run.to_dict() == before, "requested": run.to_dict(), "resolved": tr.run_cfg.to_dict(),
                  "batches": len(tr.stream)}))
"""


@pytest.mark.distributed
def test_setup_resolves_into_a_new_config(tmp_path, synthetic_root):
    out = str(tmp_path / "run")
    env = dict(os.environ, OFA_DS_SYNTHETIC=synthetic_root, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", SCRIPT, out], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["unchanged"]                                   # the requested config is untouched
    req, res = r["requested"]["train"], r["resolved"]["train"]
    steps = -(-r["batches"] // req["grad_accum"])
    assert res["max_steps"] == steps != req["max_steps"]
    assert res["precision"] == "fp32" and req["precision"] == "auto"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == r["resolved"]
