"""ds_configs/*.json: every file fills from a RunConfig and passes DeepSpeed's own parser; disagreements raise."""
import copy
import glob
import json
import os

import pytest

from ofa_ds.config import RunConfig, TrainConfig
from ofa_ds.training.ds_config import ConfigMismatch, build_ds_config, validate_ds_config
from ofa_ds.training.engine import polynomial_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def run_cfg(**train) -> RunConfig:
    r = RunConfig(train=TrainConfig(**train))
    r.data.batch_size = 4
    return r


def test_configs_exist():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    for stage in (1, 2, 3):
        for prec in ("bf16", "fp16"):
            assert f"zero{stage}_{prec}" in names
    for prec in ("bf16", "fp16"):
        assert f"zero3_offload_{prec}" in names and f"zero3_nvme_{prec}" in names
    assert "cpu_fp32" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
@pytest.mark.parametrize("world", [1, 8])
def test_fills_and_validates(path, world):
    run = run_cfg(grad_accum=2, lr=3e-5, clip_norm=1.0)
    cfg = build_ds_config(path, run, world)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 4 * 2 * world
    assert cfg["optimizer"]["params"]["lr"] == 3e-5
    assert cfg["gradient_clipping"] == 1.0
    with open(path) as f:
        raw = json.load(f)
    if raw.get("bf16", {}).get("enabled") is True:
        assert cfg["bf16"]["enabled"] is True
    validate_ds_config(cfg)


def test_disagreement_names_both_values():
    run = run_cfg(lr=1e-4)
    ds = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}}
    with pytest.raises(ConfigMismatch) as e:
        build_ds_config(ds, run, 1)
    msg = str(e.value)
    assert "16" in msg and "4" in msg and "train_micro_batch_size_per_gpu" in msg
    assert "5e-05" in msg and "0.0001" in msg


def test_batch_arithmetic_checked():
    run = run_cfg(grad_accum=1)
    with pytest.raises(ConfigMismatch, match="train_batch_size"):
        build_ds_config({"train_batch_size": 12}, run, 2)
    assert build_ds_config({"train_batch_size": 8}, run, 2)["train_batch_size"] == 8


def test_precision_conflict_and_auto():
    ds = {"bf16": {"enabled": True}}
    assert build_ds_config(ds, run_cfg(), 1)["bf16"]["enabled"] is True          # precision "auto" follows JSON
    with pytest.raises(ConfigMismatch, match="bf16.*fp16|fp16.*bf16"):
        build_ds_config(ds, run_cfg(precision="fp16"), 1)
    cfg = build_ds_config({"fp16": {"enabled": "auto"}}, run_cfg(precision="fp16"), 1)
    assert cfg["fp16"]["enabled"] is True


def test_unfillable_auto_is_an_error():
    with pytest.raises(ConfigMismatch, match="nothing to fill"):
        build_ds_config({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, run_cfg(), 1)


def test_scheduler_block_only_when_it_matches():
    ds = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                             "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}}
    cfg = build_ds_config(ds, run_cfg(max_steps=100, warmup_steps=10), 1)
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100
    with pytest.raises(ConfigMismatch, match="schedule"):
        build_ds_config(ds, run_cfg(end_lr=1e-6), 1)


def test_polynomial_schedule():
    f = polynomial_lambda(max_steps=110, warmup=10, lr=1e-3, end_lr=1e-4, power=1.0)
    assert f(0) == 0 and f(5) == 0.5 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx((0.9e-3 * 0.5 + 1e-4) / 1e-3)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_cpu_engine_uses_fused_adamw():
    """Without a GPU and without offload the engine's optimizer is torch's AdamW in its fused CPU form (DeepSpeed's
    torch_adam path alone gives the per-tensor loop, 4-5x slower: benchmarks/bench_optimizer.py)."""
    import torch
    from ofa_ds.training import engine
    if torch.cuda.is_available():
        pytest.skip("CPU path only")
    import torch.distributed as dist
    started = not dist.is_initialized()
    saved = dict(os.environ)                     # init_distributed sets RANK/MASTER_PORT/...: later subprocesses
    try:                                         # of this session must not inherit them
        engine.init_distributed()
        _fused_engine_step(engine, torch)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def _fused_engine_step(engine, torch):
    run = RunConfig(train=TrainConfig(lr=1e-3, max_steps=10, warmup_steps=0))
    run.data.batch_size = 2
    ds = build_ds_config(os.path.join(ROOT, "ds_configs", "cpu_fp32.json"), run, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ref = copy.deepcopy(model)
    eng = engine.initialize(model, run, ds)
    opt = eng.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    # one rank, no ZeRO: the identity all-reduce is skipped (it only flattened and copied every gradient)
    assert eng.enable_backward_allreduce is False
    before = model.weight.detach().clone()
    x = torch.randn(2, 4)
    eng.backward(eng(x).pow(2).sum())
    eng.step()
    assert not torch.equal(before, model.weight.detach())
    # ... and the step is exactly plain PyTorch's: same loss, clipping and AdamW update
    t = run.train
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=t.lr, betas=t.betas, eps=t.adam_eps,
                                weight_decay=t.weight_decay, fused=True)
    ref(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), t.clip_norm)
    ref_opt.step()
    torch.testing.assert_close(model.weight.detach(), ref.weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), ref.bias.detach(), rtol=1e-6, atol=1e-7)
