"""Golden losses: the `debug` recipe (model preset `debug`; synthetic pretraining mixture with the v2 extras, so
steps 1, 5 and 9 are (v1, v2) pairs) trained for 10 steps on one CPU rank through `launch/pretrain.py`, seeds fixed,
one intra-op thread, must reproduce the 10 losses below. Any change to the model, data pipeline, loss, optimizer,
schedule or trainer that alters the numbers fails here.

The values were produced on the development machine by this code and by the code before the training-package
restructuring (the same run given as `--recipe default` with explicit `--set` overrides, since that code had no
debug preset); both gave these numbers bit for bit. The tolerance is rel 1e-6, not equality: fp32 CPU kernels
(oneDNN/MKL matmul, reductions) may pick another summation order on another CPU type or thread count. Running
this run with two intra-op threads instead of one moved one loss by 7e-8 relative, so 1e-6 absorbs that while any
real change (a different normalisation, an extra dropout, a reordered batch) shows up orders of magnitude above it."""
import pytest

from .conftest import launch, step_losses

GOLDEN = [32.67776870727539, 11.061293990523726, 10.865243209035773, 10.575634956359863, 32.03160095214844,
          10.465696062360491, 10.651956346299913, 10.634019639756945, 31.857215881347656, 10.547398493840145]


@pytest.mark.distributed
def test_debug_recipe_reproduces_golden_losses(tmp_path, synthetic_root):
    out = str(tmp_path / "debug")
    launch(["--recipe", "debug", "--out", out], synthetic_root, small=False,
           sets=["eval.data={}", "train.save_final=false", "train.export_final=false"])
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 11))
    assert [losses[s] for s in range(1, 11)] == pytest.approx(GOLDEN, rel=1e-6, abs=0)
