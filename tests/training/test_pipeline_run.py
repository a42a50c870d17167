"""`launch/pretrain.py` with a pipeline ds_config (ofa_ds/training/pipeline_strategy.py) on two CPU ranks = 2 stages × 1
data-parallel replica: the same losses as the dense single-rank run on pretraining (v1, v2) pair batches, exact
resume, the exported folder, and the refusal of ZeRO-2/3 with a pipeline block."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ofa_ds.training.checkpoints import tag_for
from ofa_ds.training.metrics_log import METRIC_NAMES

from .conftest import ROOT, SMALL, last_json, launch, step_ids, step_losses

PIPE = "ds_configs/pipeline_2stage_fp32.json"            # ZeRO-1
PIPE_Z0 = "ds_configs/pipeline_2stage_zero0_fp32.json"   # ZeRO-0: clipping done by the pipeline strategy


def pair_sets(root: str) -> list[str]:
    """The default recipe plus OFA's v2 extras (text infilling, image infilling, detection): with 2 rows per batch
    every 4th batch of a rank is a (v1, v2) pair, the first one included."""
    p = os.path.join(root, "pretrain")
    return [f"data.text_data={p}/text_examples.tsv", f"data.image_data={p}/image_examples.tsv",
            f"data.detection_data={p}/detection_examples.tsv", "eval.max_samples=4"]


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory) -> str:
    """Shared initial weights (the shrunken model of conftest.SMALL), so dense and pipeline start equal."""
    from ofa_ds.checkpoint import export_folder
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    cfg = preset("tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, num_heads=2,
                 resnet_layers=(1, 1, 1))
    out = str(tmp_path_factory.mktemp("init") / "folder")
    export_folder(OFAModel(cfg), out)
    return out


def metrics(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


@pytest.mark.distributed
def test_pipeline_pair_losses_equal_dense(tmp_path, synthetic_root, init_folder):
    """Steps 1 and 5 are pairs (loss = loss_v1/n_v1 + loss_v2/n_v2 ≈ 32 nats), 2-4 single batches; global-norm
    clipping (clip 5) is active at the pair steps, so this also checks the norm over both stages."""
    sets = pair_sets(synthetic_root) + ["train.save_final=false", "train.export_final=false"]
    args = ["--steps", "5", "--init", init_folder]
    dense = str(tmp_path / "dense")
    rep_d = last_json(launch(args + ["--out", dense, "--ds-config", "ds_configs/cpu_fp32.json"], synthetic_root,
                             sets=sets))
    ref = metrics(dense)
    assert ref[1]["loss"] > 20 and ref[2]["loss"] < 15 and ref[1]["grad_norm"] > 5      # pair, single, clipped
    for ds in (PIPE, PIPE_Z0):
        out = str(tmp_path / os.path.basename(ds))
        rep = last_json(launch(args + ["--out", out, "--ds-config", ds], synthetic_root, ranks=2, sets=sets))
        assert rep["pipeline_stages"] == 2 and rep["data_parallel"] == 1 and rep["world_size"] == 2
        assert json.load(open(os.path.join(out, "ds_config.json")))["gradient_accumulation_steps"] == 2
        got = metrics(out)
        assert sorted(got) == [1, 2, 3, 4, 5]
        for s in got:
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (ds, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (ds, s)
            assert got[s]["samples_per_s"] * got[s]["step_ms"] == pytest.approx(
                ref[s]["samples_per_s"] * ref[s]["step_ms"], rel=1e-6)           # samples counted once
        # the held-out evaluation (dense model rebuilt on rank 0) sees the same weights
        assert rep["vqa_loss"] == pytest.approx(rep_d["vqa_loss"], rel=1e-4)
        assert rep["vqa_acc"] == rep_d["vqa_acc"]


@pytest.mark.distributed
def test_pipeline_two_replicas_equal_dense_two_ranks(tmp_path, synthetic_root, init_folder):
    """Four ranks = 2 stages x 2 data-parallel replicas: data sharded by replica, so the dense run on two ranks
    (sharded by rank) sees the same batches; the sample sizes and the loss are reduced over the replicas."""
    sets = pair_sets(synthetic_root) + ["train.save_final=false", "train.export_final=false", "eval.data={}"]
    args = ["--steps", "3", "--init", init_folder]
    dense, pipe = str(tmp_path / "dense"), str(tmp_path / "pipe")
    launch(args + ["--out", dense, "--ds-config", "ds_configs/cpu_fp32.json"], synthetic_root, ranks=2, sets=sets)
    rep = last_json(launch(args + ["--out", pipe, "--ds-config", PIPE], synthetic_root, ranks=4, sets=sets))
    assert rep["data_parallel"] == 2 and rep["pipeline_stages"] == 2
    ref, got = metrics(dense), metrics(pipe)
    assert sorted(got) == [1, 2, 3]
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), s
        assert got[s]["samples_per_s"] * got[s]["step_ms"] == pytest.approx(
            ref[s]["samples_per_s"] * ref[s]["step_ms"], rel=1e-6)


@pytest.mark.distributed
def test_pipeline_finetune_vqa_equals_dense(tmp_path, synthetic_root, init_folder):
    """launch/finetune.py --recipe vqa (label smoothing, frozen token table, answer constraints) with the pipeline
    config = the dense run. Dropout and drop path are switched off: they draw random numbers on different ranks.
    The recipe's EMA evaluation is off: without a final checkpoint the pipeline evaluates the live weights."""
    sets = ["data.add_object=false", "train.save_final=false", "train.export_final=false", "eval.max_samples=4",
            "train.ema_eval=false", "model.dropout=0.0", "model.encoder_drop_path_rate=0.0",
            "model.decoder_drop_path_rate=0.0"]
    args = ["--recipe", "vqa", "--steps", "3", "--init", init_folder]
    dense, pipe = str(tmp_path / "dense"), str(tmp_path / "pipe")
    rep_d = last_json(launch(args + ["--out", dense, "--ds-config", "ds_configs/cpu_fp32.json"], synthetic_root,
                             script="launch/finetune.py", sets=sets))
    rep = last_json(launch(args + ["--out", pipe, "--ds-config", PIPE], synthetic_root, ranks=2,
                           script="launch/finetune.py", sets=sets))
    assert json.load(open(os.path.join(pipe, "config.json")))["train"]["freeze_embeddings"]
    ref, got = metrics(dense), metrics(pipe)
    assert [got[s]["loss"] for s in (1, 2, 3)] == pytest.approx([ref[s]["loss"] for s in (1, 2, 3)], rel=1e-5)
    assert rep["vqa_loss"] == pytest.approx(rep_d["vqa_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def full_pipe_run(tmp_path_factory, synthetic_root, init_folder):
    out = str(tmp_path_factory.mktemp("pipe_full"))
    sets = pair_sets(synthetic_root) + ["train.save_every=2", "train.record_ids=true"]
    p = launch(["--steps", "4", "--init", init_folder, "--out", out, "--ds-config", PIPE], synthetic_root, ranks=2,
               sets=sets)
    return out, p, sets


@pytest.mark.distributed
def test_pipeline_stop_and_resume(full_pipe_run, tmp_path, synthetic_root, init_folder):
    full, _, sets = full_pipe_run
    out = str(tmp_path / "resumed")
    ck = os.path.join(out, "checkpoints")
    os.makedirs(ck)
    shutil.copytree(os.path.join(full, "checkpoints", tag_for(2)), os.path.join(ck, tag_for(2)))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write(tag_for(2) + "\n")
    launch(["--steps", "4", "--init", init_folder, "--out", out, "--ds-config", PIPE, "--resume"], synthetic_root,
           ranks=2, sets=sets + ["train.export_final=false"])
    a, b = step_losses(full), step_losses(out)
    assert set(b) == {3, 4}
    assert [b[3], b[4]] == pytest.approx([a[3], a[4]], rel=1e-6)
    for rank in (0, 1):                      # both stages read data-parallel shard 0
        assert step_ids(out, rank)[3] == step_ids(full, rank)[3] == step_ids(full, 0)[3]


@pytest.mark.distributed
def test_pipeline_run_folder_and_export(full_pipe_run):
    out, p, _ = full_pipe_run
    rep = last_json(p)
    assert rep["steps"] == 4 and rep["zero_stage"] == 1 and "vqa_acc" in rep
    recs = list(metrics(out).values())
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(set(METRIC_NAMES) <= set(r) and r["grad_norm"] > 0 for r in recs)
    from ofa_ds.checkpoint import load_any
    from ofa_ds.training.universal import pipeline_checkpoint_to_dense
    model = load_any(os.path.join(out, "final"))
    assert model.cfg.d_model == 64
    sd = torch.load(os.path.join(out, "final", "consolidated_fp32.pt"), map_location="cpu")
    ck = pipeline_checkpoint_to_dense(os.path.join(out, "checkpoints"), model.cfg, tag_for(4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
        if k in ck:
            assert torch.equal(v, ck[k].float()), k


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_or_3_with_pipeline_block_is_rejected(tmp_path, synthetic_root, stage):
    with open(os.path.join(ROOT, PIPE)) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage"] = stage
    path = str(tmp_path / f"pipe_zero{stage}.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    cmd = [sys.executable, "launch/pretrain.py", "--steps", "1", "--out", str(tmp_path / "run"), "--ds-config", path]
    for s in SMALL:
        cmd += ["--set", s]
    env = dict(os.environ, OFA_DS_SYNTHETIC=synthetic_root, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    msg = r.stderr.strip().splitlines()[-1]
    assert path in msg and f"zero_optimization.stage = {stage}" in msg and "pipeline" in msg
    assert not os.path.exists(tmp_path / "run")


def test_pipeline_block_selects_pipeline_strategy():
    import dataclasses
    from ofa_ds.recipes import get_recipe
    from ofa_ds.training.dense import DenseStrategy
    from ofa_ds.training.pipeline_strategy import PipelineStrategy, can_pair
    from ofa_ds.training.trainer import strategy_for
    run = get_recipe("default")
    assert type(strategy_for(run)) is DenseStrategy
    assert type(strategy_for(dataclasses.replace(run, ds_config=PIPE))) is PipelineStrategy
    assert not can_pair(run)                          # the default recipe has no v2 extras
    assert can_pair(get_recipe("pretrain_tiny"))
