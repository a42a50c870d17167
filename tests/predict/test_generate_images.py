"""Text-to-image through the Predictor and the CLI: a debug-sized OFA with an 8 x 8 code grid (64 codes, 64-pixel
images) and random VQGAN weights (ofa_ds.model.vqgan.random_vqgan)."""
import json
import os

import pytest
import torch
from PIL import Image

from ofa_ds.config import preset
from ofa_ds.model import OFAModel
from ofa_ds.model.vqgan import VQGANConfig, random_vqgan
from ofa_ds.predict import Predictor
from ofa_ds.predict.__main__ import main


@pytest.fixture(scope="module")
def t2i_folder(tmp_path_factory):
    from ofa_ds.checkpoint import export_folder
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("t2i") / "ofa_debug_t2i")
    export_folder(OFAModel(preset("debug", code_image_size=64)).eval(), path)
    return path


def test_api(t2i_folder):
    vq = random_vqgan(VQGANConfig(ch=32, embed_dim=32, z_channels=32, resolution=64, attn_resolutions=(8,)))
    p = Predictor(t2i_folder, device="cpu")
    rs = p.text_to_image(["a red bus", "", "two dogs on grass"], vqgan=vq, num_samples=3, num_return=2, seed=1)
    assert [r.input for r in rs] == ["<text #0>", "<text #1>", "<text #2>"]
    assert rs[1].error == "empty text" and rs[1].images == []
    for r in (rs[0], rs[2]):
        assert r.error is None and len(r.images) == 2
        assert all(g.image.size == (64, 64) and len(g.codes) == 64 and 0 <= min(g.codes) and max(g.codes) < 8192
                   for g in r.images)
        assert r.score is None and r.to_dict()["scores"] == [None, None]
    one, again = (p.text_to_image("a red bus", vqgan=vq, num_samples=2, seed=5) for _ in range(2))   # one record
    assert one.text == "a red bus" and len(one.images) == 1 and one.images[0].codes == again.images[0].codes


def test_cli(t2i_folder, tmp_path):
    """The official VQGAN layout (the default config, random weights) from a file; PNGs in --out-dir."""
    vq_file = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": random_vqgan().state_dict()}, vq_file)
    caps = tmp_path / "captions.jsonl"
    caps.write_text(json.dumps({"id": "bus", "text": "a red bus"}) + "\n" + json.dumps({"text": " "}) + "\n")
    out, imgs = tmp_path / "out.jsonl", tmp_path / "images"
    status = main(["text_to_image", "--checkpoint", t2i_folder, "--vqgan", str(vq_file), str(caps),
                   "--num-samples", "2", "--out-dir", str(imgs), "--out", str(out), "--no-progress", "--seed", "3"])
    assert status == 1
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0]["id"] == "bus" and recs[0]["error"] is None and recs[0]["files"] == [str(imgs / "00000.png")]
    assert recs[1]["error"] == "empty text" and recs[1]["files"] == []
    with Image.open(recs[0]["files"][0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert os.listdir(imgs) == ["00000.png"]
    assert main(["text_to_image", "--checkpoint", t2i_folder, "--text", "a cat", "--no-progress"]) == 2   # no --vqgan
