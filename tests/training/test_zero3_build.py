"""ZeRO-3 built sharded (ofa_ds/training/zero3.py) on two gloo ranks: under zero.Init each rank holds half of the
parameters; the module-by-module init gives every tensor the dense model's distribution; an official .pt and an
exported folder load module by module to exactly their values, read on rank 0 only; a file of another shape fails
with the same CheckpointError on both ranks."""
import os

import pytest
import torch

from tests.ranks import run_ranks

DS = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def small_cfg(**kw):
    from ofa_ds.config import ModelConfig
    base = dict(name="custom", d_model=64, ffn_dim=128, num_heads=2, encoder_layers=1, decoder_layers=1,
                resnet_layers=(3, 4, 6))                  # official files name a resnet50/101/152 stem
    return ModelConfig(**{**base, **kw})


def _gathered(model) -> dict[str, torch.Tensor]:
    import deepspeed
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _worker(rank, port, folder, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    import deepspeed
    from ofa_ds.model.weights import CheckpointError
    from ofa_ds.training.zero3 import build_sharded, open_sharded_init
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    expected = torch.load(os.path.join(folder, "expected.pt"))   # the source model's state dict
    res = {}
    torch.manual_seed(rank)                          # rank 0's values must win whatever the others draw
    cfg = small_cfg(normformer_init=0.5, resnet_zero_init_residual=True)
    model = build_sharded(cfg, DS)
    res["local"] = sum(p.ds_tensor.numel() for p in model.parameters())
    res["total"] = sum(p.ds_numel for p in model.parameters())
    res["fresh"] = {k: (float(v.float().mean()), float(v.float().std()) if v.numel() > 1 else 0.0)
                    for k, v in _gathered(model).items()}
    for what in ("official.pt", "folder"):
        init = open_sharded_init(os.path.join(folder, what), rank)
        if rank != 0:
            assert init.source is None                # only rank 0 reads the checkpoint
        loaded = build_sharded(init.cfg, DS, init)
        got = {**_gathered(loaded), **dict(loaded.named_buffers())}
        res[what] = sorted(k for k, v in expected.items() if k in got and not torch.equal(got[k], v))
        res[what + "_n"] = len(got)
    try:
        init = open_sharded_init(os.path.join(folder, "official.pt"), rank)
        build_sharded(small_cfg(ffn_dim=96), DS, init)
        res["mismatch"] = None
    except CheckpointError as e:
        res["mismatch"] = str(e)
    q.put((rank, res))
    q.close()
    q.join_thread()                                 # the result is sent before the process leaves
    from ofa_ds.training.shutdown import exit_process
    exit_process(0)


@pytest.mark.distributed
def test_zero3_builds_sharded_initialises_and_loads_module_by_module(tmp_path):
    from ofa_ds.checkpoint import export_folder, save_official
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    cfg = small_cfg(normformer_init=0.5, resnet_zero_init_residual=True)
    dense = OFAModel(cfg)
    src = OFAModel(small_cfg())
    with torch.no_grad():                                   # BatchNorm statistics travel too (rank-0 broadcast)
        src.encoder.embed_images.bn1.running_mean.uniform_()
    save_official(src, str(tmp_path / "official.pt"))
    export_folder(src, str(tmp_path / "folder"))
    torch.save(src.state_dict(), str(tmp_path / "expected.pt"))
    res = run_ranks(_worker, str(tmp_path))
    r0, r1 = res[0], res[1]
    # every rank holds its half of the parameters, none holds them all
    assert r0["total"] == sum(p.numel() for p in dense.parameters())
    assert max(r0["local"], r1["local"]) <= r0["total"] // 2 + 64
    # the module-by-module init: the dense model's distribution, tensor by tensor
    for name, p in dense.named_parameters():
        mean, std = r0["fresh"][name]
        assert r1["fresh"][name] == (mean, std), name                 # one set of values on both ranks
        d_mean, d_std = float(p.mean()), float(p.std()) if p.numel() > 1 else 0.0
        if p.numel() >= 4096:
            assert std == pytest.approx(d_std, rel=0.1), name
            assert abs(mean - d_mean) < 0.2 * d_std + 1e-6, name
        elif d_std == 0:
            assert (mean, std) == pytest.approx((d_mean, 0.0)), name  # constants: LayerNorm 1/0, gain 0.5, bn3 0
    # exact values from both formats, on both ranks (every parameter and buffer compared)
    n = len(dict(src.named_parameters())) + len(dict(src.named_buffers()))
    for what in ("official.pt", "folder"):
        for r in (r0, r1):
            assert r[what] == [] and r[what + "_n"] == n, (what, r[what])
    assert r0["mismatch"] and r0["mismatch"] == r1["mismatch"] and "shape mismatch" in r0["mismatch"]
