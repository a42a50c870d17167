"""Prompt tuning through the launch scripts: a `vqa_prompt` finetune from --init on two ZeRO-3 CPU ranks trains the
prompts only (every other weight of the export equals the init's), prints and reports the parameter counts, keeps
optimizer state for the prompts only (counted in the checkpoint files), and writes the prompts on their own."""
import dataclasses
import glob
import os

import pytest
import torch

from .conftest import last_json, launch

PROMPTS = ["train.prompt_tuning.encoder_length=4", "train.prompt_tuning.decoder_length=3"]


def _tensor_elements(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_tensor_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_elements(v) for v in obj)
    return 0


@pytest.mark.distributed
def test_vqa_prompt_zero3_two_ranks_trains_and_keeps_only_the_prompts(tmp_path, synthetic_root):
    """`launch/finetune.py --recipe vqa_prompt --init <export>` on two ZeRO-3 CPU ranks."""
    from safetensors.torch import load_file

    from ofa_ds.checkpoint import export_folder
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    cfg = preset("debug", d_model=64, ffn_dim=128, num_heads=2, encoder_layers=1, decoder_layers=1)
    init = str(tmp_path / "init")
    export_folder(OFAModel(cfg), init)
    out = str(tmp_path / "run")
    p = launch(["--recipe", "vqa_prompt", "--init", init, "--steps", "2", "--out", out, "--ds-config",
                "ds_configs/zero3_fp32.json"], synthetic_root, ranks=2, script="launch/finetune.py",
               sets=PROMPTS + ["train.lr=1e-2", "train.grad_accum=1", "data.patch_image_size=32",
                               "eval.max_samples=4"])
    rep = last_json(p)
    assert rep["zero_stage"] == 3 and rep["world_size"] == 2
    trainable, total = rep["params_trainable"], rep["params_total"]
    with torch.device("meta"):
        base_total = OFAModel(cfg).num_params()
    assert trainable == (4 + 3) * 1 * 2 * 64 and total == base_total + trainable   # P · layers · (k + v) · C
    assert f"trainable parameters {trainable:,} / total {total:,}" in p.stderr
    # the optimizer state: fp32 master copy + Adam's two moments of the prompts only, partitioned over the two
    # ranks (+ alignment padding and step counters), counted in the checkpoint's per-rank files
    files = glob.glob(os.path.join(out, "checkpoints", "*", "*optim_states.pt"))
    assert len(files) == 2
    elements = sum(_tensor_elements(torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"])
                   for f in files)
    assert 3 * trainable <= elements <= 3 * trainable + 1024, (elements, trainable, total)
    print(f"ZeRO-3, 2 ranks: optimizer state {elements:,} elements for {trainable:,} trainable of {total:,}")
    # every weight but the prompts is the init's (BatchNorm statistics included); prompts also on their own
    before = load_file(os.path.join(init, "model.safetensors"))
    after = load_file(os.path.join(out, "final", "model.safetensors"))
    prompts = load_file(os.path.join(out, "prompts.safetensors"))
    assert set(prompts) == {"encoder.encoder_prompt_encoder.embedding.weight",
                            "decoder.decoder_prompt_encoder.embedding.weight"}
    assert set(after) == set(before) | set(prompts)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for k, v in load_file(os.path.join(out, "final", "prompts.safetensors")).items():
        assert torch.equal(after[k], v) and torch.equal(prompts[k], v)
    assert OFAModel.from_pretrained(os.path.join(out, "final")).cfg.encoder_prompt_length == 4


def test_training_prepare_loads_a_prompts_file_freezes_and_refuses_misfits(tmp_path):
    """ofa_ds/training/prompt_tuning.prepare on a built model (no engine): train.prompt_tuning.prompts is loaded,
    everything else frozen, counts kept; a file of other lengths is a one-line RunFault naming the difference."""
    from types import SimpleNamespace

    from ofa_ds.config import RunConfig, preset
    from ofa_ds.model import OFAModel
    from ofa_ds.model.prompt import save_prompts
    from ofa_ds.training import prompt_tuning
    from ofa_ds.training.faults import RunFault
    small = lambda **kw: preset("debug", d_model=32, ffn_dim=64, num_heads=2, **kw)  # noqa: E731
    cfg = small(encoder_prompt_length=3, decoder_prompt_length=2)
    torch.manual_seed(0)
    saved = OFAModel(cfg)
    path = str(tmp_path / "p.safetensors")
    save_prompts(saved.state_dict(), cfg, path)
    run = RunConfig(model=small()).override(["train.prompt_tuning.encoder_length=3",
                                             "train.prompt_tuning.decoder_length=2",
                                             f"train.prompt_tuning.prompts={path}"])
    mcfg = prompt_tuning.model_config(run, run.model)
    assert mcfg == cfg
    model = OFAModel(mcfg)
    tr = SimpleNamespace(run_cfg=run, model_cfg=mcfg, rank=1)
    prompt_tuning.prepare(tr, model)
    for k, v in saved.state_dict().items():
        if "_prompt_encoder." in k:
            assert torch.equal(model.state_dict()[k], v)
    assert tr.param_counts == (3 * 2 * 2 * 32 + 2 * 2 * 2 * 32, model.num_params())
    model.train()
    assert not model.encoder.embed_images.bn1.training and model.encoder.layers[0].training
    other = dataclasses.replace(run, train=dataclasses.replace(
        run.train, prompt_tuning=dataclasses.replace(run.train.prompt_tuning, encoder_length=5)))
    ocfg = prompt_tuning.model_config(other, other.model)
    with pytest.raises(RunFault, match="encoder_prompt_length 3 in the file, 5 in the model"):
        prompt_tuning.prepare(SimpleNamespace(run_cfg=other, model_cfg=ocfg, rank=1), OFAModel(ocfg))
