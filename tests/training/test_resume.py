"""Checkpoint/resume: stop at step k and resume == uninterrupted (losses and sample ids); an interrupted save
leaves the previous checkpoint loadable; the run folder holds what it promises (TensorBoard scalars included)."""
import json
import os
import shutil

import pytest

from ofa_ds.training.checkpoints import find_resume_tag, tag_for
from ofa_ds.training.metrics_log import METRIC_NAMES

from .conftest import last_json, launch, step_ids, step_losses

pytestmark = pytest.mark.distributed                      # every test reads runs of launch/pretrain.py subprocesses
COMMON = ["train.record_ids=true", "train.save_every=2", "train.export_final=false", "eval.max_samples=4"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synthetic_root):
    out = str(tmp_path_factory.mktemp("full"))
    p = launch(["--steps", "4", "--out", out], synthetic_root, sets=COMMON)
    return out, p


def test_stop_and_resume(full_run, tmp_path, synthetic_root):
    full, _ = full_run
    out = str(tmp_path / "stop")
    os.makedirs(out)
    # leg 1: copy the uninterrupted run's step-2 checkpoint only, as if the job had died after step 2
    ck = os.path.join(out, "checkpoints")
    os.makedirs(ck)
    shutil.copytree(os.path.join(full, "checkpoints", tag_for(2)), os.path.join(ck, tag_for(2)))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write(tag_for(2) + "\n")
    launch(["--steps", "4", "--out", out, "--resume"], synthetic_root, sets=COMMON)
    a, b = step_losses(full), step_losses(out)
    assert set(b) == {3, 4}
    assert [a[3], a[4]] == pytest.approx([b[3], b[4]], rel=1e-5)
    ids_a, ids_b = step_ids(full), step_ids(out)
    assert ids_a[3] == ids_b[3] and ids_a[4] == ids_b[4]


def test_interrupted_save_keeps_previous_checkpoint(full_run, tmp_path, synthetic_root):
    """The job died while writing step 4: its folder is partial (no COMPLETE, a truncated file) and, worst case,
    `latest` already names it. Resume must fall back to step 2 and continue exactly."""
    full, _ = full_run
    out = str(tmp_path / "crash")
    ck = os.path.join(out, "checkpoints")
    shutil.copytree(os.path.join(full, "checkpoints"), ck)
    partial = os.path.join(ck, tag_for(4))
    os.remove(os.path.join(partial, "COMPLETE"))
    victim = sorted(f for f in os.listdir(partial) if f.endswith(".pt"))[0]
    with open(os.path.join(partial, victim), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write(tag_for(4) + "\n")
    assert find_resume_tag(ck) == tag_for(2)
    launch(["--steps", "4", "--out", out, "--resume"], synthetic_root, sets=COMMON)
    a, b = step_losses(full), step_losses(out)
    assert [a[3], a[4]] == pytest.approx([b[3], b[4]], rel=1e-5)
    assert find_resume_tag(ck) == tag_for(4)              # the re-done step-4 checkpoint is complete now


def test_run_folder_and_tensorboard(full_run):
    out, p = full_run
    report = last_json(p)
    assert report["steps"] == 4 and "vqa_acc" in report and "vqa_majority_baseline" in report
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train"]["max_steps"] == 4 and cfg["model"]["d_model"] == 64
    ds = json.load(open(os.path.join(out, "ds_config.json")))
    assert "auto" not in json.dumps(ds)
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert set(METRIC_NAMES) <= set(r)
        assert r["loss"] > 0 and r["samples_per_s"] > 0 and r["grad_norm"] > 0 and r["mfu"] is None  # CPU
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = set(METRIC_NAMES) - {"step", "mfu"}       # mfu has no value on CPU
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert any(t.startswith("eval/vqa_acc") for t in tags)
    # the console shows one line per log step with the fixed names
    lines = [x for x in p.stdout.splitlines() if x.startswith("step ")]
    assert len(lines) == 4 and all("tokens_per_s" in x and "step_ms" in x for x in lines)
