"""The Trainer resolves the RunConfig once, into a new object, and never writes into the one it was given: the
checkpoint's architecture, epochs -> max_steps and "auto" precision land in `trainer.run_cfg` and config.json."""
import importlib
import json
import os

import pytest


@pytest.fixture
def one_rank_process_group():
    """Tear down what Trainer.setup starts in this process (the process group and the env it sets)."""
    import torch.distributed as dist
    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def recipes_on(synthetic_root, monkeypatch):
    """ofa_ds.recipes with SYNTHETIC_ROOT (read at import) pointing at the test's synthetic data; restored after."""
    import ofa_ds.recipes
    monkeypatch.setenv("OFA_DS_SYNTHETIC", synthetic_root)
    yield importlib.reload(ofa_ds.recipes)
    monkeypatch.undo()
    importlib.reload(ofa_ds.recipes)


def test_setup_resolves_into_a_new_config(tmp_path, recipes_on, one_rank_process_group):
    from ofa_ds.training.trainer import Trainer
    recipes = recipes_on
    run = recipes.get_recipe("debug").override([f"out_dir={json.dumps(str(tmp_path / 'run'))}", "train.epochs=1",
                                                "train.precision=\"auto\"", "eval.data={}"])
    before = run.to_dict()
    tr = Trainer(run)
    tr.setup()
    assert run.to_dict() == before                   # the requested config is untouched
    steps = -(-len(tr.stream) // run.train.grad_accum)
    assert tr.run_cfg.train.max_steps == steps != run.train.max_steps
    assert tr.run_cfg.train.precision == "fp32" and run.train.precision == "auto"
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f) == json.loads(tr.run_cfg.to_json())
