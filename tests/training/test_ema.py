"""EMA weights (train.ema_decay) against a direct computation: the hand-computed average over the parameter
trajectory that the run's own per-step checkpoints record, through an uninterrupted run, across a resume, with fp16
overflow steps (skipped by the loss scaler) not updating it, and under ZeRO-3 on two ranks (per-rank partitions,
consolidated at export); `launch/evaluate.py --ema` evaluates the exported EMA."""
import json
import os
import shutil

import pytest
import torch

from ofa_ds.training.checkpoints import tag_for
from ofa_ds.training.ema import EMA, dense_state_from_checkpoint

from .conftest import ROOT, launch, step_losses

D = 0.5           # a decay far from 1, so that every step moves the average visibly


def test_ema_update_rule():
    """e_0 = w_0; e_k = d e_{k-1} + (1 - d) w_k in float32 for parameters and float buffers; decay 0 (a copy) before
    start_update; a bf16 parameter is averaged in float32."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    ema = EMA(m, 0.9, start_update=2)
    want = {k: v.float().clone() for k, v in m.state_dict().items() if v.is_floating_point()}
    for k in range(1, 5):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
            m[1].running_mean.add_(1.0)
        ema.update(k)
        d = 0.0 if k < 2 else 0.9
        for n, v in m.state_dict().items():
            if v.is_floating_point():
                want[n] = d * want[n] + (1 - d) * v.float()
    assert set(ema.shadow) == set(want)
    for n, s in ema.shadow.items():
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, want[n], rtol=0, atol=1e-6)
    with ema.swapped():
        assert torch.equal(m[0].weight, want["0.weight"].to(torch.bfloat16))
    assert not torch.equal(m[0].weight, want["0.weight"].to(torch.bfloat16))     # restored


def test_to_official_keeps_ema(tmp_path):
    """`to-official` on an export with `ema/` (a run's final/) stores those weights in extra_state["ema"]."""
    from ofa_ds.checkpoint import export_folder, load_official, main as checkpoint_cli, read_checkpoint_file
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    model = OFAModel(preset("debug", resnet_layers=(3, 4, 6)))   # the official format names a ResNet type
    export_folder(model, str(tmp_path / "final"))
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    export_folder(model, str(tmp_path / "final" / "ema"))
    assert checkpoint_cli(["to-official", str(tmp_path / "final"), str(tmp_path / "ofa.pt")]) == 0
    saved = read_checkpoint_file(str(tmp_path / "ofa.pt"))["model"]
    assert all(torch.equal(saved[k], live[k]) for k in ("encoder.layers.0.fc1.weight", "decoder.layer_norm.bias"))
    got = load_official(str(tmp_path / "ofa.pt"), ema=True).state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def _weights(out: str, step: int) -> dict[str, torch.Tensor]:
    """The model weights a one-rank ZeRO-0/1 run saved at `step` (fp32 copies)."""
    f = os.path.join(out, "checkpoints", tag_for(step), "mp_rank_00_model_states.pt")
    sd = torch.load(f, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items() if v.is_floating_point()}


def _hand_ema(traj: list[dict], applied: list[bool], d: float, start: int) -> dict:
    """EMA over a trajectory: traj[0] = the start weights, traj[k] = after step k; skipped steps do not update."""
    e = {k: v.clone() for k, v in traj[0].items()}
    for k in range(1, len(traj)):
        if applied[k - 1]:
            dk = 0.0 if k < start else d
            e = {n: dk * e[n] + (1 - dk) * traj[k][n] for n in e}
    return e


def _close(got: dict, want: dict, atol: float = 1e-6) -> None:
    for n, v in want.items():
        if n in got:
            torch.testing.assert_close(got[n].float(), v, rtol=0, atol=atol, msg=n)
    assert len(set(got) & set(want)) > 50


def _exported(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "ema", "model.safetensors"))


EMA_SETS = [f"train.ema_decay={D}", "train.ema_start_update=2", "train.save_every=1", "train.keep_checkpoints=10",
            "eval.max_samples=4"]


@pytest.mark.slow
@pytest.mark.distributed
def test_ema_run_and_resume(tmp_path, synthetic_root):
    """One rank, 4 steps: the EMA in every checkpoint and in final/ema equals the hand computation over the saved
    trajectory; a run stopped after step 2 and resumed gives the same EMA (and its own trajectory's hand value)."""
    full = str(tmp_path / "full")
    launch(["--steps", "4", "--out", full], synthetic_root, sets=EMA_SETS)
    traj = [_weights(full, k) for k in range(1, 5)]
    # start_update 2: the first update copies the weights (decay 0), so the start weights do not enter
    for k in range(1, 5):
        want = _hand_ema([traj[0]] + traj[:k], [True] * k, D, 2)
        _close(dense_state_from_checkpoint(os.path.join(full, "checkpoints", tag_for(k)), None), want)
    want = _hand_ema([traj[0]] + traj, [True] * 4, D, 2)
    _close(_exported(full), want)
    assert any((want[n] - traj[-1][n]).abs().max() > 1e-4 for n in want)       # the EMA is not the last weights
    # stop after step 2, resume to 4
    res = str(tmp_path / "resumed")
    os.makedirs(os.path.join(res, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", tag_for(2)), os.path.join(res, "checkpoints", tag_for(2)))
    with open(os.path.join(res, "checkpoints", "latest"), "w") as f:
        f.write(tag_for(2) + "\n")
    launch(["--steps", "4", "--out", res, "--resume"], synthetic_root, sets=EMA_SETS)
    traj_r = traj[:2] + [_weights(res, k) for k in (3, 4)]
    _close(_exported(res), _hand_ema([traj_r[0]] + traj_r, [True] * 4, D, 2))
    _close(_exported(res), want, atol=1e-5)                                    # = the uninterrupted run's
    # evaluate the exported EMA with launch/evaluate.py --ema (the run folder's final/ema)
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "launch/evaluate.py", "--task", "caption", "--checkpoint",
                        os.path.join(res, "final"), "--ema", "--data",
                        os.path.join(synthetic_root, "caption", "caption_val.tsv"), "--max-samples", "4",
                        "--patch-image-size", "32", "--out", str(tmp_path / "ev")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "EMA weights" in p.stderr and "CIDEr" in json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.distributed
def test_ema_skips_overflow_steps(tmp_path, synthetic_root):
    """fp16 with a loss scale that doubles after every good step (loss_scale_window 1): good and overflow steps
    alternate. The EMA equals the hand computation that updates only after the applied steps."""
    with open(os.path.join(ROOT, "ds_configs", "zero1_fp16.json")) as f:
        ds = json.load(f)
    ds["fp16"].update(initial_scale_power=16, loss_scale_window=1, hysteresis=1)
    cfg = tmp_path / "fp16.json"
    cfg.write_text(json.dumps(ds))
    out = str(tmp_path / "run")
    launch(["--steps", "6", "--out", out, "--ds-config", str(cfg)], synthetic_root,
           sets=[f"train.ema_decay={D}", "train.save_every=1", "train.keep_checkpoints=10", "eval.max_samples=4",
                 "train.export_final=false"])
    traj = [_weights(out, k) for k in range(1, 7)]
    params = [n for n in traj[0] if "running_" not in n]          # BatchNorm statistics move in every forward
    changed = [any(not torch.equal(a[n], b[n]) for n in params) for a, b in zip(traj, traj[1:])]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        skipped = [r["skipped_steps"] for r in map(json.loads, f) if "skipped_steps" in r]
    applied = [b == a for a, b in zip([skipped[0]] + skipped, skipped)][1:]       # steps 2..6
    assert applied == changed, (applied, changed, skipped)
    assert True in applied and False in applied[applied.index(True):], skipped   # a skip after a good step
    got = dense_state_from_checkpoint(os.path.join(out, "checkpoints", tag_for(6)), None)
    # step 1 of the trajectory is the reference start (its EMA is checked through the checkpoint at step 1)
    e1 = dense_state_from_checkpoint(os.path.join(out, "checkpoints", tag_for(1)), None)
    want = _hand_ema([{n: e1[n] for n in traj[0] if n in e1}] + traj[1:], applied, D, 0)
    _close(got, want, atol=1e-5)
    assert step_losses(out)


def _zero_weights(out: str, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "checkpoints"), tag=tag_for(step))
    return {k: v.float() for k, v in sd.items() if "num_batches_tracked" not in k}


def _pipe_weights(out: str, step: int) -> dict[str, torch.Tensor]:
    from ofa_ds.config import RunConfig
    from ofa_ds.training.universal import pipeline_checkpoint_to_dense
    with open(os.path.join(out, "config.json")) as f:
        cfg = RunConfig.from_json(f.read()).model
    sd = pipeline_checkpoint_to_dense(os.path.join(out, "checkpoints"), cfg, tag_for(step))
    return {k: v.float() for k, v in sd.items() if v.is_floating_point()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ds", ["zero3_fp32", "pipeline_2stage_fp32"])
def test_ema_two_ranks(tmp_path, synthetic_root, ds):
    """Two ranks, ZeRO-3 (each rank averages its own partitions; ema_rank0/1.pt) or a 2-stage pipeline (each stage
    its layers; ema_stage0/1.pt): the exported EMA equals the hand computation over the consolidated per-step
    weights, and the final held-out evaluation runs with the EMA weights (train.ema_eval)."""
    out = str(tmp_path / ds)
    launch(["--steps", "3", "--out", out, "--ds-config", f"ds_configs/{ds}.json"], synthetic_root, ranks=2,
           sets=EMA_SETS + ["train.ema_eval=true"])
    files = sorted(f for f in os.listdir(os.path.join(out, "checkpoints", tag_for(3))) if f.startswith("ema"))
    assert files == (["ema_rank0.pt", "ema_rank1.pt"] if ds.startswith("zero3") else ["ema_stage0.pt",
                                                                                       "ema_stage1.pt"])
    weights = _zero_weights if ds.startswith("zero3") else _pipe_weights
    traj = [weights(out, k) for k in range(1, 4)]
    _close(_exported(out), _hand_ema([traj[0]] + traj, [True] * 3, D, 2), atol=1e-5)
    with open(os.path.join(out, "report.json")) as f:
        assert "caption_cider" in json.load(f)
