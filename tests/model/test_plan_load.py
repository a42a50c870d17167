"""Per-tensor weight readers and `plan_load` (the key accounting of a module-by-module load), without any process
group: the same keys are accepted and refused as by `load_state_strict`, and nothing but shapes is read."""
import dataclasses

import pytest
import torch

from ofa_ds.checkpoint import export_folder, open_weights, save_official
from ofa_ds.config import ModelConfig
from ofa_ds.model import OFAModel
from ofa_ds.model.weights import TIED, CheckpointError, DictSource, plan_load

CFG = ModelConfig(name="custom", d_model=32, ffn_dim=64, num_heads=2, encoder_layers=1, decoder_layers=1,
                  resnet_layers=(3, 4, 6), vocab_size=300)


def _shapes(model):
    from ofa_ds.training.zero3 import full_shapes
    return full_shapes(model)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OFAModel(CFG)


def test_open_weights_reads_config_and_every_tensor_of_both_formats(model, tmp_path):
    save_official(model, str(tmp_path / "m.pt"))
    export_folder(model, str(tmp_path / "f"))
    sd = model.state_dict()
    for path in (str(tmp_path / "m.pt"), str(tmp_path / "f")):
        cfg, src = open_weights(path)
        assert dataclasses.replace(cfg, name="custom") == CFG
        plan = plan_load(_shapes(model), src)
        assert set(plan) == set(sd)
        for k, v in plan.items():
            assert v is None or torch.equal(src.get(v), sd[k]), (path, k)


def test_plan_load_accepts_what_load_state_strict_accepts_and_names_what_it_refuses(model):
    sd = model.state_dict()
    shapes = _shapes(model)
    once = {k: v for k, v in sd.items() if k not in TIED[1:] and not k.endswith("image_position_idx")}
    plan = plan_load(shapes, DictSource(once, "once.pt"))   # tied table once, a derived buffer absent
    assert plan[TIED[2]] == TIED[0] and plan["decoder.image_position_idx"] is None
    bad = dict(sd)
    del bad["encoder.layers.0.fc1.weight"]
    bad["encoder.extra"] = torch.zeros(1)
    bad["decoder.layers.0.fc2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        plan_load(shapes, DictSource(bad, "bad.pt"))
    msg = str(e.value)
    assert "bad.pt" in msg and "encoder.layers.0.fc1.weight" in msg and "encoder.extra" in msg
    assert "decoder.layers.0.fc2.bias: file (5,) vs model (32,)" in msg
    untied = dict(sd)
    untied[TIED[1]] = sd[TIED[0]] + 1
    with pytest.raises(CheckpointError, match="OFA ties these three tensors"):
        plan_load(shapes, DictSource(untied, "untied.pt"))


def test_init_steps_are_reset_parameters(model):
    """The sharded build runs `init_steps()` module by module; on a whole model they are its reset_parameters."""
    torch.manual_seed(3)
    a = OFAModel(dataclasses.replace(CFG, normformer_init=0.5, resnet_zero_init_residual=True))
    torch.manual_seed(3)
    b = OFAModel(dataclasses.replace(CFG, normformer_init=0.5, resnet_zero_init_residual=True), init=False)
    with torch.no_grad():
        for m, fn in b.init_steps():
            fn(m)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k
    assert float(a.encoder.layers[0].attn_ln.weight.mean()) == 0.5
