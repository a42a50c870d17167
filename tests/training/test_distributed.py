"""Two CPU ranks through the deepspeed launcher: ZeRO-0 and ZeRO-3 (built sharded) from the same --init give the
same losses (fp32, 1e-5 relative), and a finetune recipe runs from an official-layout checkpoint."""
import os

import pytest
import torch

from .conftest import last_json, launch, step_losses

STEPS = ["--steps", "3"]
QUICK = ["train.export_final=false", "train.save_final=false", "eval.max_samples=4"]


@pytest.mark.distributed
def test_zero3_from_official_init_gives_the_dense_losses(tmp_path, synthetic_root):
    """--init of an official-layout .pt: ZeRO-0 loads it whole on every rank, ZeRO-3 builds the model under
    zero.Init and loads it module by module on rank 0; both then train alike (fp32, 1e-5 relative)."""
    from ofa_ds.checkpoint import save_official
    from ofa_ds.config import ModelConfig
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    pt = str(tmp_path / "ofa_small.pt")
    save_official(OFAModel(ModelConfig(name="custom", d_model=64, ffn_dim=128, num_heads=2, encoder_layers=1,
                                       decoder_layers=1, resnet_layers=(3, 4, 6))), pt)
    outs = {}
    for name in ("cpu_fp32", "zero3_fp32"):
        out = str(tmp_path / name)
        p = launch(STEPS + ["--out", out, "--init", pt, "--ds-config", f"ds_configs/{name}.json"], synthetic_root,
                   ranks=2, sets=QUICK)
        outs[name] = step_losses(out)
        rep = last_json(p)
        assert rep["world_size"] == 2 and rep["zero_stage"] == (3 if "zero3" in name else 0)
    a, b = outs["cpu_fp32"], outs["zero3_fp32"]
    assert sorted(a) == [1, 2, 3]
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-5)


@pytest.mark.distributed
def test_zero3_consolidates_to_fp32_and_folder(tmp_path, synthetic_root):
    out = str(tmp_path / "z3")
    launch(["--steps", "2", "--out", out, "--ds-config", "ds_configs/zero3_fp32.json"], synthetic_root, ranks=2,
           sets=["eval.max_samples=4"])
    from ofa_ds.model import OFAModel
    sd = torch.load(os.path.join(out, "final", "consolidated_fp32.pt"), map_location="cpu")
    model = OFAModel.from_pretrained(os.path.join(out, "final"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert sd["encoder.embed_tokens.weight"].shape == (59457, 64)


@pytest.mark.distributed
def test_finetune_from_official_checkpoint(tmp_path, synthetic_root):
    """save_official of a small random model, then `launch/finetune.py --recipe vqa --init file.pt`."""
    from ofa_ds.checkpoint import save_official
    from ofa_ds.config import ModelConfig
    from ofa_ds.model import OFAModel
    cfg = ModelConfig(name="custom", d_model=64, ffn_dim=128, num_heads=2, encoder_layers=1, decoder_layers=1,
                      resnet_layers=(3, 4, 6))   # official files name a resnet50/101/152 stem
    torch.manual_seed(0)
    src = OFAModel(cfg)
    pt = str(tmp_path / "ofa_small.pt")
    save_official(src, pt)
    out = str(tmp_path / "ft")
    p = launch(["--recipe", "vqa", "--init", pt, "--steps", "2", "--out", out, "--ds-config",
                "ds_configs/cpu_fp32.json"], synthetic_root, script="launch/finetune.py",
               sets=["eval.max_samples=4", "data.add_object=false", "model.resnet_layers=[3,4,6]"])
    rep = last_json(p)
    assert rep["steps"] == 2 and "vqa_acc" in rep and rep["vqa_n"] >= 4
    tuned = OFAModel.from_pretrained(os.path.join(out, "final"))
    assert tuned.cfg.d_model == 64
    # training moved the weights away from the imported ones (frozen token table excepted: the recipe freezes it)
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, src.state_dict()[k])]
    assert moved and "encoder.embed_tokens.weight" not in moved


@pytest.mark.parametrize("cfg", ["zero1_bf16", "zero3_bf16"])
def test_bf16_configs_train_through_the_resnet(tmp_path, synthetic_root, cfg):
    """The A100/H100 configs: DeepSpeed casts parameters to bf16 but leaves BatchNorm's running statistics in fp32;
    the ResNet must accept that (it failed at its first BatchNorm before ofa_ds.model.resnet.BatchNorm2d)."""
    out = str(tmp_path / cfg)
    rep = last_json(launch(["--steps", "2", "--out", out, "--ds-config", f"ds_configs/{cfg}.json"], synthetic_root,
                           sets=QUICK))
    assert rep["precision"] == "bf16" and rep["zero_stage"] == int(cfg[4])
    losses = step_losses(out)
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
