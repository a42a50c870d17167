"""train.activation_checkpointing: the same losses with layers recomputed in the backward pass."""
import pytest

from tests.training.conftest import launch, step_losses


@pytest.mark.distributed
def test_activation_checkpointing_switch_keeps_losses(tmp_path, synthetic_root):
    outs = {}
    for flag in ("false", "true"):
        out = str(tmp_path / flag)
        p = launch(["--out", out, "--steps", "3"], synthetic_root,
               sets=[f"train.activation_checkpointing={flag}", "eval.data={}", "train.save_final=false",
                     "train.export_final=false", "model.dropout=0.0"])
        outs[flag] = step_losses(out)
        assert ("activation checkpointing on 2 layers" in p.stderr) == (flag == "true")
    assert outs["true"].keys() == outs["false"].keys() == {1, 2, 3}
    for step, loss in outs["false"].items():
        assert abs(outs["true"][step] - loss) <= 1e-5 * max(1.0, abs(loss)), step
