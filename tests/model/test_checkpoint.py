"""Official checkpoints: parity with the original OFA implementation, strict loading, safe unpickling, EMA,
and exact export/import round trips (official layout and Hugging Face-style folder)."""
import argparse
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ofa_ds.checkpoint import (CheckpointError, export_folder, load_folder, load_official, read_checkpoint_file,
                               save_official)
from ofa_ds.config import preset
from ofa_ds.model import OFAModel
from tests.model.fixture_weights import rule_state_dict


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory, assets_dir="tests/assets"):
    """The parity weights written as an official-layout .pt through the original skeleton (cfg, extra_state)."""
    model = OFAModel(preset("tiny"))
    model.load_state_dict(rule_state_dict(model.state_dict()))
    path = str(tmp_path_factory.mktemp("ckpt") / "ofa_tiny_rule.pt")
    save_official(model, path, template=os.path.join(os.path.dirname(__file__), "..", "assets",
                                                     "ofa_tiny_skeleton.pt"))
    return path


@pytest.mark.parametrize("case", ["plain", "padded"])
def test_parity_with_original_ofa(official_tiny, assets_dir, case):
    model = load_official(official_tiny)
    assert not model.training and model.cfg.name == "tiny"
    z = np.load(os.path.join(assets_dir, f"ofa_tiny_{case}.npz"))
    with open(os.path.join(assets_dir, f"ofa_tiny_{case}.json")) as f:
        size = json.load(f)["image_size"]
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32))
    src = torch.from_numpy(z["src_tokens"]).long()
    prev = torch.from_numpy(z["prev_output_tokens"]).long()
    with torch.no_grad():
        enc = model.encode(src, images, torch.from_numpy(z["patch_masks"]).bool())
        logits = model.decode(prev, enc)
    ref_pad = torch.from_numpy(z["encoder_padding_mask"])
    ours_pad = enc.padding_mask if enc.padding_mask is not None else torch.zeros_like(ref_pad)
    assert torch.equal(ours_pad, ref_pad)
    keep, real = ~ref_pad, prev != 1
    enc_err = (enc.hidden[..., :32] - torch.from_numpy(z["encoder_out_first_channels"])).abs()[keep].max()
    logit_err = (logits[..., :4096] - torch.from_numpy(z["logits_first_vocab"])).abs()[real].max()
    lse_err = (torch.logsumexp(logits.double(), -1) - torch.from_numpy(z["logits_logsumexp"])).abs()[real].max()
    print(f"{case}: encoder max err {enc_err:.2e}, logits max err {logit_err:.2e}, logsumexp err {lse_err:.2e}")
    assert enc_err < 1e-4 and logit_err < 1e-4 and lse_err < 1e-4
    assert torch.equal(logits.argmax(-1)[real], torch.from_numpy(z["logits_argmax"]).long()[real])


def test_official_round_trip_is_exact(official_tiny, tmp_path):
    model = load_official(official_tiny)
    out = str(tmp_path / "again.pt")
    save_official(model, out)
    again = read_checkpoint_file(out)
    orig = read_checkpoint_file(official_tiny)
    assert set(again["model"]) == set(orig["model"])
    assert all(torch.equal(again["model"][k], orig["model"][k]) for k in orig["model"])
    assert isinstance(again["cfg"]["model"], argparse.Namespace)


def test_folder_round_trip_is_exact(official_tiny, tmp_path):
    model = load_official(official_tiny)
    export_folder(model, str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "encoder.json", "vocab.bpe", "dict.txt"} <= set(
        os.listdir(tmp_path / "hf"))
    back = OFAModel.from_pretrained(str(tmp_path / "hf"))
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert back.decoder.output_projection.weight is back.encoder.embed_tokens.weight


@pytest.mark.distributed
def test_cli_converts_both_ways(official_tiny, tmp_path):
    folder, pt = str(tmp_path / "f"), str(tmp_path / "back.pt")
    for args in (["to-folder", official_tiny, folder], ["to-official", folder, pt]):
        r = subprocess.run([sys.executable, "-m", "ofa_ds.checkpoint", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["preset"] == "tiny"
    a, b = read_checkpoint_file(official_tiny)["model"], read_checkpoint_file(pt)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_weights_are_offered(official_tiny, tmp_path):
    model = load_official(official_tiny)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = str(tmp_path / "vqa.pt")
    save_official(model, path, ema_state=ema)
    with_ema = load_official(path, ema=True)
    assert torch.equal(with_ema.encoder.layer_norm.weight, model.encoder.layer_norm.weight + 1.0)
    with pytest.raises(CheckpointError, match="no extra_state"):
        load_official(official_tiny, ema=True)


def _tamper(src, dst, fn):
    ckpt = read_checkpoint_file(src)
    fn(ckpt["model"])
    torch.save(ckpt, dst)


def test_strict_loading_names_the_problem(official_tiny, tmp_path):
    p = str(tmp_path / "bad.pt")
    _tamper(official_tiny, p, lambda sd: sd.pop("encoder.layers.0.fc1.bias"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): \['encoder.layers.0.fc1.bias'\]"):
        load_official(p)
    _tamper(official_tiny, p, lambda sd: sd.__setitem__("encoder.extra_thing", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected key.*encoder.extra_thing"):
        load_official(p)
    _tamper(official_tiny, p, lambda sd: sd.__setitem__("decoder.layers.1.fc2.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"decoder.layers.1.fc2.bias: file \(7,\)"):
        load_official(p)
    _tamper(official_tiny, p, lambda sd: sd.__setitem__("decoder.output_projection.weight",
                                                        sd["decoder.output_projection.weight"] * 2))
    with pytest.raises(CheckpointError, match="ties these three"):
        load_official(p)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ofa_ds_pwned",))


def test_untrusted_pickle_is_refused(tmp_path):
    p = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "cfg": {"x": _Evil()}}, p, pickle_module=pickle)
    if os.path.exists("/tmp/ofa_ds_pwned"):
        os.remove("/tmp/ofa_ds_pwned")
    with pytest.raises(CheckpointError, match="refused to unpickle posix.system"):
        read_checkpoint_file(p)
    assert not os.path.exists("/tmp/ofa_ds_pwned")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint_file(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_checkpoint_file(str(tmp_path / "junk.pt"))


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_folder(str(tmp_path))


def test_frozen_bn_loads_a_trained_batchnorm_folder(tmp_path):
    """model.frozen_bn (OFA's --freeze-resnet) is a run's own setting: weights saved with BatchNorm2d (which keeps
    num_batches_tracked) load into FrozenBatchNorm2d with the same statistics."""
    import torch

    from ofa_ds.checkpoint import export_folder, load_folder
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    torch.manual_seed(0)
    model = OFAModel(preset("debug"))
    with torch.no_grad():
        model.encoder.embed_images.bn1.running_mean.add_(0.5)
    export_folder(model, str(tmp_path / "m"))
    frozen = load_folder(str(tmp_path / "m"), frozen_bn=True)
    assert torch.equal(frozen.encoder.embed_images.bn1.running_mean, model.encoder.embed_images.bn1.running_mean)
    assert not any(k.endswith("num_batches_tracked") for k in frozen.state_dict())
