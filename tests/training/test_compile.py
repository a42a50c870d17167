"""train.compile: the compiled model trains to the same losses as the eager one (1e-5 over 20 steps of the debug
recipe) under ZeRO-0 and under ZeRO-3 on two CPU ranks (ZeRO-3: the regions are DeepSpeed leaf modules with a
compiled forward); a machine without a C++ compiler gets a message and an eager model instead of an inductor error."""
from __future__ import annotations

import io
import os
import sys

import pytest
import torch

from tests.ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 20


def _worker(rank, port, root, out, stage, q):
    os.environ.update(OFA_DS_SYNTHETIC=root, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        q.put((rank, _train_all(out, stage)))
    except BaseException:                              # report it: the test would otherwise wait for a dead rank
        import traceback
        q.put((rank, traceback.format_exc()))
        raise


def _forever(stream):
    while True:
        yield from stream


def _train_all(out, stage):
    """{compiled: (losses, seconds per step)} of 20 debug steps, eager then compiled, under ZeRO `stage`."""
    import time

    from ofa_ds.recipes import get_recipe
    from ofa_ds.training.trainer import Trainer
    res = {}
    cfg = {0: "cpu_fp32", 3: "zero3_fp32"}[stage]
    for compiled in (False, True):
        run = get_recipe("debug").override([
            f"ds_config={ROOT}/ds_configs/{cfg}.json", f"out_dir={out}/{cfg}_{compiled}",
            f"train.max_steps={STEPS}", f"train.compile={str(compiled).lower()}", "train.save_final=false",
            "train.export_final=false", "eval.data={}"])
        tr = Trainer(run)
        tr.setup()
        batches = _forever(tr.stream)
        losses, secs = [], []
        for _ in range(STEPS):
            t = time.perf_counter()
            losses.append(tr.train_step([next(batches)])["loss"])
            secs.append(time.perf_counter() - t)
            tr.step += 1
        res[compiled] = losses, secs
        if tr.rank == 0:                           # progress in the captured output (compiles take minutes)
            print(f"zero {stage} compiled {compiled}: losses {losses} seconds {secs}", file=sys.stderr, flush=True)
        del tr
    return res


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
def test_compiled_and_eager_train_to_the_same_losses(tmp_path, synthetic_root, stage):
    from ofa_ds.training.compile import check_cpu_compiler
    if check_cpu_compiler() is not None:
        pytest.skip(f"inductor cannot compile on this machine: {check_cpu_compiler()}")
    res = run_ranks(_worker, synthetic_root, str(tmp_path), stage, timeout=3000)
    assert all(isinstance(r, dict) for r in res.values()), res
    (eager, _), (compiled, _) = res[0][False], res[0][True]
    assert (eager, compiled) == (res[1][False][0], res[1][True][0])   # all-reduced: both ranks report the same
    assert len(eager) == STEPS and eager[0] != eager[-1]
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-5)


def test_missing_cxx_compiler_falls_back_to_eager_with_a_message(monkeypatch, tmp_path):
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    from ofa_ds.training.compile import check_cpu_compiler, compile_model, regions
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    why = check_cpu_compiler()
    assert why is not None and "no-such-compiler" in why and "install g++" in why
    model = OFAModel(preset("debug"))
    log = io.StringIO()
    assert compile_model(model, torch.device("cpu"), log=log) is False
    assert "training continues without compiling" in log.getvalue()
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in regions(model))
    broken = tmp_path / "broken-cxx"                  # a compiler that exists but cannot build anything
    broken.write_text("#!/bin/sh\necho 'cc1plus: fatal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    assert "fails on a two-line program" in check_cpu_compiler()


def test_compile_model_compiles_the_layers_in_place():
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    from ofa_ds.training.compile import compile_model, regions
    model = OFAModel(preset("debug"))
    keys = list(model.state_dict())
    assert compile_model(model, torch.device("cpu"), backend="eager") is True
    assert len(regions(model)) == 1 + 2 + 2 and all(m._compiled_call_impl is not None for m in regions(model))
    assert list(model.state_dict()) == keys                # checkpoints keep the official names


def test_evaluation_context_runs_compiled_regions_eagerly():
    from ofa_ds.training.compile import eager_unless
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    class Twice(torch.nn.Module):
        def forward(self, x):
            return 2 * x + 1

    torch._dynamo.reset()
    lin = Twice()
    lin.compile(backend=backend)
    x = torch.randn(2, 3)
    with eager_unless(False):
        assert torch.equal(lin(x), 2 * x + 1)
    assert graphs == []
    with eager_unless(True):
        lin(x)
    assert len(graphs) == 1


def test_zero3_regions_are_leaf_modules_with_a_compiled_forward():
    from deepspeed.utils import z3_leaf_module

    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    from ofa_ds.training.compile import compile_model, regions
    torch.manual_seed(0)
    model = OFAModel(preset("debug")).train()
    images = torch.randn(2, 3, 64, 64)
    want = model.encoder.embed_images(images)
    keys = list(model.state_dict())
    assert compile_model(model, torch.device("cpu"), backend="eager", zero3=True) is True
    leaves = [m for m in model.modules() if z3_leaf_module(m)]
    assert {id(m) for m in leaves} == {id(m) for m in regions(model)} and len(leaves) == 1 + 2 + 2
    assert all("forward" in m.__dict__ and m._compiled_call_impl is None for m in leaves)   # hooks stay eager
    assert list(model.state_dict()) == keys
    got = model.encoder.embed_images(images)          # the compiled ResNet, entered with a grad-requiring input
    assert torch.allclose(got, want, atol=1e-6) and not images.requires_grad
