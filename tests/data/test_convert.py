"""Converter round trip and validator reports."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ofa_ds.data import DataConfig, make_task
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import convert, validate
from ofa_ds.data.images import decode_base64_image
from ofa_ds.data.tsv import TSVFile
from tests.data.conftest import make_image, red_bbox, write_tsv


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    make_image(300, 200, (150, 50, 250, 150)).save(d / "big.png")
    make_image(60, 40, (10, 10, 30, 30)).save(d / "small.jpg", quality=95)
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return str(d)


def jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_refcoco_roundtrip_with_resize(tmp_path, images, tok):
    ann = jsonl(tmp_path / "a.jsonl", [
        {"image": "big.png", "text": "the red box", "box": [150, 50, 250, 150], "id": "r1"},
        {"image": "small.jpg", "text": "a red box", "box": "10,10,30,30"},
        {"image": "missing.png", "text": "x", "box": [0, 0, 1, 1]},
        {"image": "broken.jpg", "text": "x", "box": [0, 0, 1, 1]},
        {"image": "small.jpg", "text": "x", "box": [0, 0, 100, 100]},
        "{not json",
    ])
    out = str(tmp_path / "ref.tsv")
    buf = io.StringIO()
    assert convert("refcoco", images, ann, out, max_side=150, stream=buf) == (2, 4)
    msg = buf.getvalue()
    assert f"{ann}:3: image not found" in msg and f"{ann}:4: unreadable image" in msg
    assert f"{ann}:5: box" in msg and f"{ann}:6: invalid JSON" in msg and "wrote 2 rows" in msg
    f = TSVFile(out)
    uid, iid, text, box, img = f.row(0)
    assert (uid, text, box) == ("r1", "the red box", "75.00,25.00,125.00,75.00")
    im = decode_base64_image(img)
    assert im.size == (150, 100)
    assert np.allclose(red_bbox(np.asarray(im)), [75, 25, 125, 75], atol=2)
    assert f.row(1)[3] == "10.00,10.00,30.00,30.00" and decode_base64_image(f.row(1)[4]).size == (60, 40)
    t = make_task(DataConfig(task="refcoco", patch_image_size=32), "valid", tok)
    s = t.build([f.row(0)[c] for c in t.cols], 0, np.random.default_rng(0))
    assert s.extras["region_coords"].tolist() == [75, 25, 125, 75]
    assert validate("refcoco", out, stream=io.StringIO()) == (2, 0)


def test_caption_vqa_snli_imagenet_pretrain_roundtrip(tmp_path, images, tok):
    cases = {
        "caption": [{"image": "small.jpg", "caption": ["A red box.", "a box"]}],
        "vqa": [{"image": "small.jpg", "question": "what color?", "answers": {"red": 0.9, "pink": 0.1}},
                {"image": "small.jpg", "question": "what?", "answer": "red"}],
        "imagenet": [{"image": "small.jpg", "label": 3, "name": "red box"}],
        "pretrain_vl": [{"image": "small.jpg", "type": "qa", "question": "what?", "answer": "red"},
                        {"image": "small.jpg", "type": "visual_grounding", "caption": "box", "box": [1, 2, 3, 4]},
                        {"image": "small.jpg", "type": "caption", "caption": "a box", "gt_objects": ["box"]}],
    }
    for task, recs in cases.items():
        out = str(tmp_path / f"{task}.tsv")
        assert convert(task, images, jsonl(tmp_path / f"{task}.jsonl", recs), out, stream=io.StringIO()) == \
            (len(recs), 0)
        assert validate(task, out, stream=io.StringIO()) == (len(recs), 0), task
    f = TSVFile(str(tmp_path / "vqa.tsv"))
    assert f.row(0)[3] == "0.9|!+red&&0.1|!+pink" and f.row(1)[3] == "1|!+red"
    assert TSVFile(str(tmp_path / "caption.tsv")).row(0)[2] == "A red box.&&a box"
    csv_path = tmp_path / "snli.csv"
    csv_path.write_text("image,hypothesis,premise,label\nsmall.jpg,a red box,an image,entailment\n"
                        "small.jpg,a red box,an image,unsure\n")
    buf = io.StringIO()
    assert convert("snli_ve", images, str(csv_path), str(tmp_path / "s.tsv"), stream=buf) == (1, 1)
    assert f"{csv_path}:3: unknown label" in buf.getvalue()
    t = make_task(DataConfig(task="snli_ve", patch_image_size=32), "valid", tok)
    row = TSVFile(str(tmp_path / "s.tsv"), selected_cols=t.cols).row(0)
    assert t.build(row, 0, np.random.default_rng(0)).target[-2:] == [4420, 2]


@pytest.mark.distributed                                  # runs `python -m ofa_ds.data validate` as a subprocess
def test_validate_reports_bad_lines(tmp_path, capsys, img64):
    path = write_tsv(tmp_path / "v.tsv", [
        ["1", "1", "ok?", "1.0|!+yes", "", img64],
        ["2", "2", "bad image?", "1.0|!+yes", "", "xx!!"],
        ["3", "3", "too short"],
        ["4", "4", "bad conf?", "high|!+yes", "", img64],
    ])
    assert main(["validate", "--task", "vqa", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:2: undecodable image")
    assert out[1].startswith(f"{path}:3: has 3 columns") and out[2].startswith(f"{path}:4: bad answer confidence")
    assert out[3] == f"{path}: 4 rows, 3 bad"
    good = write_tsv(tmp_path / "g.tsv", [["1", "1", "ok?", "1.0|!+yes", "", img64]])
    r = subprocess.run([sys.executable, "-m", "ofa_ds.data", "validate", "--task", "vqa", good],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 0 and "1 rows, 0 bad" in r.stdout
    assert main(["validate", "--task", "nope", good]) == 2
    assert main(["validate", "--task", "vqa", str(tmp_path / "missing.tsv")]) == 2
