"""The DeepSpeed-internals adapter refuses a DeepSpeed outside the versions it was written for, naming both, and
on the installed one finds the PipelineEngine's OptimizerStep dispatch it wraps."""
import pytest

from ofa_ds.training import ds_compat


def test_unknown_deepspeed_version_is_refused(monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.99\.0 is outside the range 0\.14-0\.19"):
        ds_compat.check_version()
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    ds_compat.check_version()


def test_installed_pipeline_engine_has_the_hooked_dispatch():
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    assert schedule.OptimizerStep in PipelineEngine._INSTRUCTION_MAP


def test_one_rank_backend_skips_the_shm_op_build_only_for_one_rank():
    import importlib
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch_comm.build_shm_op
    with ds_compat.one_rank_backend(1):
        assert ds_torch_comm.build_shm_op() is None          # no compiler runs: returns at once
    assert ds_torch_comm.build_shm_op is build
    for world in (0, 2):                                     # 0 = unknown: never skipped
        with ds_compat.one_rank_backend(world):
            assert ds_torch_comm.build_shm_op is build
