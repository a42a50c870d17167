"""ZeRO-3 on 2 CPU ranks → DeepSpeed universal checkpoint → resume on 1 rank (ZeRO-3, and ZeRO-1 in the slow
test): the resumed losses must continue the uninterrupted run's. Also: the ZeRO-3 checkpoint consolidates into the
official/HF layouts (zero_checkpoint_to_dense)."""
import json
import os
import shutil

import pytest
import torch

from ofa_ds.training.universal import to_universal, zero_checkpoint_to_dense
from tests.training.test_pipeline import REPO, launch

WORKER = os.path.join(REPO, "tests", "training", "zero_worker.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero3"))
    launch(WORKER, out, "--phase", "train")
    with open(os.path.join(out, "train.json")) as f:
        return out, json.load(f)


def _resume(out: str, stage: int, tag: str) -> dict:
    path = os.path.join(out, "resume.json")
    if os.path.exists(path):
        os.remove(path)
    launch(WORKER, out, "--phase", "resume", "--stage", str(stage), "--tag", tag, ranks=1)
    with open(path) as f:
        return json.load(f)


@pytest.mark.distributed
def test_zero3_two_ranks_resume_one_rank_via_universal(trained):
    out, ref = trained
    assert ref["world"] == 2 and ref["global_steps"] == 4
    tag = to_universal(os.path.join(out, "ckpt"), "step2")
    assert os.path.isdir(os.path.join(out, "ckpt", tag, "zero", "encoder.embed_tokens.weight"))
    got = _resume(out, 3, tag)
    assert got["world"] == 1 and got["global_steps"] == 4
    for step in ("3", "4"):
        assert abs(got["losses"][step] - ref["losses"][step]) < 1e-5, (got, ref)
    assert ref["losses"]["4"] != ref["losses"]["2"]


@pytest.mark.distributed
def test_zero3_checkpoint_consolidates_to_official_names(trained):
    out, _ = trained
    from ofa_ds.checkpoint import load_state_strict
    from ofa_ds.model import OFAModel
    from tests.training.pipe_worker import small_cfg
    sd = zero_checkpoint_to_dense(os.path.join(out, "ckpt"), "step2")
    model = OFAModel(small_cfg())
    load_state_strict(model, sd, "zero3 step2")          # every official key accounted for
    assert torch.equal(model.decoder.output_projection.weight, sd["encoder.embed_tokens.weight"])


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_resume_under_zero1_via_universal(trained):
    out, ref = trained
    tag = to_universal(os.path.join(out, "ckpt"), "step2", target_stage=1)
    got = _resume(out, 1, tag)
    assert got["stage"] == 1 and got["world"] == 1
    for step in ("3", "4"):
        assert abs(got["losses"][step] - ref["losses"][step]) < 1e-5, (got, ref)
    shutil.rmtree(os.path.join(out, "ckpt", tag))
