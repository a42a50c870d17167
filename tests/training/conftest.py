"""Shared helpers for the training tests: a shrunken OFA (same code path, 1 layer, width 64, 32 px images) on the
built-in synthetic data, started the way users start it (python or the deepspeed launcher on launch/*.py)."""
import json
import os
import subprocess
import sys

import pytest

from ofa_ds.cluster.ports import free_port  # noqa: F401  (re-exported for the tests here)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["model.d_model=64", "model.ffn_dim=128", "model.encoder_layers=1", "model.decoder_layers=1",
         "model.num_heads=2", "model.resnet_layers=[1,1,1]", "data.patch_image_size=32", "data.v2_image_size=32",
         "data.batch_size=2", "eval.max_samples=8", "eval.batch_size=4", "train.log_every=1",
         "train.progress=false", "train.lr=1e-3", "train.warmup_steps=1"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    from ofa_ds.data.synthetic import generate
    generate(root, size="tiny")
    return root


def launch(args: list[str], synthetic: str, ranks: int = 0, script: str = "launch/pretrain.py", sets=(),
           timeout: int = 600, small: bool = True) -> subprocess.CompletedProcess:
    """ranks=0: plain python (one process); ranks>=1: the deepspeed launcher with that many local ranks.
    small=False keeps the recipe's own sizes (the SMALL overrides are not applied)."""
    cmd = [sys.executable, script] if ranks == 0 else ["deepspeed", "--num_gpus", str(ranks), "--master_port",
                                                         str(free_port()), script]
    cmd += list(args)
    for s in (list(SMALL) if small else []) + list(sets):
        cmd += ["--set", s]
    env = dict(os.environ, OFA_DS_SYNTHETIC=synthetic, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def last_json(p: subprocess.CompletedProcess) -> dict:
    from ofa_ds.training.cli import last_json_line
    return last_json_line(p.stdout)


def step_losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def step_ids(out: str, rank: int = 0) -> dict[int, list[int]]:
    with open(os.path.join(out, f"ids_rank{rank}.jsonl")) as f:
        return {r["step"]: r["ids"] for r in map(json.loads, f)}
