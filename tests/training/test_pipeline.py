"""OFA as a 2-stage DeepSpeed pipeline on 2 CPU ranks (gloo): equivalence with the dense model and checkpoint
conversion across layouts. One launch of tests/training/pipe_worker.py (≈1.5 min) feeds all tests in this file."""
import json
import os
import subprocess

import pytest

from ofa_ds.config import preset
from ofa_ds.cluster.ports import free_port, remove_shm_buffers
from ofa_ds.training.pipeline import dense_key_to_pipe, layer_roles, pipe_key_to_dense, pipe_to_dense_names

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def launch(script: str, out: str, *extra: str, ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script --out OUT`, on a free port so concurrent jobs do not collide."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), script, "--out", out, *extra]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipe"))
    launch(os.path.join(REPO, "tests", "training", "pipe_worker.py"), out)
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def test_names_cover_every_official_key():
    """Every parameter/buffer of the dense model except the recomputable index buffers has a pipeline home, and the
    per-layer names map back to the same official names."""
    from ofa_ds.model import OFAModel
    import torch
    cfg = preset("tiny", encoder_layers=2, decoder_layers=3)
    with torch.device("meta"):
        dense = set(OFAModel(cfg).state_dict())
    derived = {"encoder.version", "decoder.version", "encoder.token_rp_bucket", "encoder.image_rp_bucket",
               "decoder.token_rp_bucket", "decoder.image_rp_bucket", "decoder.image_position_idx"}
    m = dense_key_to_pipe(cfg)
    assert set(m) == dense - derived
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"}
    for name, (idx, local) in m.items():
        back = pipe_key_to_dense(cfg, idx, local)
        assert back == ("encoder.embed_tokens.weight" if name in tied else name)
        assert (idx, local) == (0, "weight") or name not in tied
    assert len(layer_roles(cfg)) == 2 + 2 + 1 + 2 + 3 + 2
    assert pipe_to_dense_names(cfg)["tied_modules.embed.weight"] == "encoder.embed_tokens.weight"


@pytest.mark.distributed
def test_pipeline_loss_and_grads_equal_dense(result):
    s0 = result["steps"][0]
    assert abs(s0["pipe"] - s0["dense"]) < 1e-5
    assert result["grads_compared"] > 100          # stage 0's parameters, incl. the tied table
    assert result["grad_max_abs_err"] < 1e-5, result.get("bad_grads")


@pytest.mark.distributed
def test_pipeline_training_losses_follow_dense(result):
    for s in result["steps"]:
        assert abs(s["pipe"] - s["dense"]) < 1e-5, result["steps"]
    assert result["steps"][-1]["pipe"] < result["steps"][0]["pipe"]


@pytest.mark.distributed
def test_pipeline_activation_checkpointing_same_grads(result):
    ac = result["ac_pipe"]
    assert ac["checkpointed_blocks"] == 2           # the two transformer layers of stage 0, nothing else
    assert abs(ac["loss"] - ac["dense_loss"]) < 1e-5
    assert ac["grad_max_abs_err"] < 1e-5


@pytest.mark.distributed
def test_pipeline_checkpoint_exports_to_dense_layouts(result):
    assert result["ckpt_keys_missing"] == []
    assert result["ckpt_keys_equal_gather"]
    assert result["ckpt_vs_gather_max_abs_err"] == 0.0
    assert result["export_max_abs_err"] == 0.0
    # the exported weights are the trained ones (Adam moved them from the init), not a stale copy
    assert result["trained_vs_init_max_abs_diff"] > 1e-4


@pytest.mark.distributed
def test_dense_weights_load_into_pipeline(result):
    d = result["d2p_eval"]
    assert d["parts"][1] == 2                       # a different stage boundary than the training run
    assert abs(d["pipe"] - d["dense"]) < 1e-5
