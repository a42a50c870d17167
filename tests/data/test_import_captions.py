"""Caption importers on tiny hand-written files in the real public layouts: Karpathy's dataset_coco.json and
dataset_flickr30k.json, the official captions_*2014.json; rows, skip reasons, determinism, --max-side, the CLI, and
the outputs pass `validate` and feed the training loader."""
import base64
import io
import json
import os

import pytest
from PIL import Image

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import validate
from ofa_ds.data.importers.captions import iter_coco_captions, iter_karpathy
from tests.data.conftest import make_image


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _size(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def _sent(raw, sentid):
    return {"raw": raw, "tokens": raw.lower().strip(" .").split(), "sentid": sentid}


@pytest.fixture
def coco(tmp_path):
    """COCO root with train2014/ and val2014/ (three good images, one corrupt) and a Karpathy split file."""
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "val2014").mkdir()
    make_image(40, 30).save(root / "train2014" / "COCO_train2014_000000000009.jpg")
    make_image(32, 32).save(root / "val2014" / "COCO_val2014_000000000003.jpg", format="PNG")
    make_image(120, 60).save(root / "val2014" / "COCO_val2014_000000000005.jpg")
    (root / "train2014" / "COCO_train2014_000000000011.jpg").write_bytes(b"\xff\xd8not a jpeg")
    img = lambda fp, fn, split, cocoid, sents, imgid: {  # noqa: E731
        "filepath": fp, "filename": fn, "imgid": imgid, "split": split, "cocoid": cocoid,
        "sentids": [s["sentid"] for s in sents], "sentences": sents}
    images = [
        img("train2014", "COCO_train2014_000000000009.jpg", "train", 9,
            [_sent("A Dog\trunning on  the beach. ", 90), _sent(" ... ", 91), _sent("Two && dogs.", 92)], 0),
        img("val2014", "COCO_val2014_000000000003.jpg", "restval", 3, [_sent("A red square.", 30)], 1),
        img("val2014", "COCO_val2014_000000000005.jpg", "val", 5,
            [_sent("A wide picture.", 50), _sent("Something red on white", 51)], 2),
        img("val2014", "COCO_val2014_000000000005.jpg", "test", 5, [_sent("Duplicate id.", 52)], 3),
        img("val2014", "COCO_val2014_000000000007.jpg", "test", 7, [_sent("Missing file.", 70)], 4),
        img("train2014", "COCO_train2014_000000000011.jpg", "train", 11, [_sent("Corrupt file.", 110)], 5),
        img("val2014", "COCO_val2014_000000000003.jpg", "val", 13, [], 6),
        42,
        {"filepath": "val2014", "split": "val", "cocoid": 15, "sentences": []},
        img("val2014", "COCO_val2014_000000000003.jpg", "extra", 17, [_sent("Bad split.", 170)], 9),
        img("val2014", "COCO_val2014_000000000005.jpg", "test", 19, [{"sentid": 190}, _sent("Kept.", 191)], 10),
    ]
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root, ann


def _import(fmt, ann, images, out, *extra):
    return main(["import", fmt, "--out", str(out), "--annotations", str(ann), "--images", str(images), *extra])


def _loads(path, split, tok):
    cfg = DataConfig(task="caption", data=path, batch_size=8, patch_image_size=32, shuffle=False)
    return [b for b in DataStream(cfg, split=split, tokenizer=tok)]


def test_coco_karpathy_rows_skips_and_loader(coco, tmp_path, capsys, tok):
    root, ann = coco
    out = tmp_path / "out"
    assert _import("coco_karpathy", ann, root, out) == 0
    err = capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["caption_stage1_train.tsv", "caption_test.tsv", "caption_val.tsv"]
    train = _rows(out / "caption_stage1_train.tsv")
    # sorted by image id (3 < 9), captions in source order; lower-cased, whitespace collapsed, '&&' -> '&'
    assert [r[:4] for r in train] == [["30", "3", "a red square.", ""],
                                      ["90", "9", "a dog running on the beach.", ""],
                                      ["92", "9", "two & dogs.", ""]]
    orig = (root / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes()
    assert base64.b64decode(train[1][4]) == orig and train[1][4] == train[2][4]      # original bytes, read once
    val = _rows(out / "caption_val.tsv")
    assert [r[:4] for r in val] == [["5", "5", "a wide picture.&&something red on white", ""]]
    test = _rows(out / "caption_test.tsv")
    assert [r[:4] for r in test] == [["19", "19", "kept.", ""]]
    assert "skipped: 9 (duplicate image id 1, empty caption 1, image missing 1, image unreadable 1, " \
           "malformed record 4, no captions 1)" in err
    assert "rows written: 5 (caption_stage1_train.tsv 3, caption_test.tsv 1, caption_val.tsv 1)" in err
    assert "dataset_coco.json: images[7]: not an object" in err
    assert "dataset_coco.json: images[10].sentences[0]: no 'raw' text" in err
    assert "split 'extra'" in err and "COCO_val2014_000000000007.jpg" in err
    for name, n in (("caption_stage1_train.tsv", 3), ("caption_val.tsv", 1), ("caption_test.tsv", 1)):
        assert validate("caption", str(out / name), stream=io.StringIO()) == (n, 0)
    assert validate("caption", str(out / "caption_stage1_train.tsv"), "0,4,2", stream=io.StringIO()) == (3, 0)
    (batch,) = _loads(str(out / "caption_stage1_train.tsv"), "train", tok)
    assert batch["patch_images"].shape[0] == 3
    (batch,) = _loads(str(out / "caption_val.tsv"), "valid", tok)
    assert batch["captions"] == [["a wide picture", "something red on white"]]


def test_karpathy_deterministic_and_max_side(coco, tmp_path, capsys):
    root, ann = coco
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _import("coco_karpathy", ann, root, a) == 0 and _import("coco_karpathy", ann, root, b) == 0
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert _import("coco_karpathy", ann, root, c, "--max-side", "48") == 0
    assert _size(_rows(c / "caption_val.tsv")[0][4]) == (48, 24)                    # 120x60 shrunk
    small = _rows(c / "caption_stage1_train.tsv")[1][4]
    assert _size(small) == (40, 30) and small == _rows(a / "caption_stage1_train.tsv")[1][4]   # kept as is
    assert validate("caption", str(c / "caption_val.tsv"), stream=io.StringIO()) == (1, 0)


def test_readers_for_pretraining(coco):
    _, ann = coco
    got = list(iter_karpathy(str(ann)))          # images are not opened here: the caller embeds (and skips) them
    assert got == [("restval", "val2014/COCO_val2014_000000000003.jpg", "3", ["a red square."]),
                   ("val", "val2014/COCO_val2014_000000000005.jpg", "5",
                    ["a wide picture.", "something red on white"]),
                   ("test", "val2014/COCO_val2014_000000000007.jpg", "7", ["missing file."]),
                   ("train", "train2014/COCO_train2014_000000000009.jpg", "9",
                    ["a dog running on the beach.", "two & dogs."]),
                   ("train", "train2014/COCO_train2014_000000000011.jpg", "11", ["corrupt file."]),
                   ("test", "val2014/COCO_val2014_000000000005.jpg", "19", ["kept."])]


def _coco_official(tmp_path):
    d = tmp_path / "val2014"
    d.mkdir()
    make_image(40, 30).save(d / "COCO_val2014_000000000042.jpg")
    make_image(64, 16).save(d / "COCO_val2014_000000000008.jpg")
    data = {
        "info": {}, "licenses": [],
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 40, "height": 30},
                   {"id": 8, "file_name": "COCO_val2014_000000000008.jpg", "width": 64, "height": 16},
                   {"id": 99, "file_name": "/etc/passwd"},
                   {"id": 100, "file_name": "COCO_val2014_000000000100.jpg"}],
        "annotations": [{"image_id": 42, "id": 4201, "caption": "A cat on a mat.\n"},
                        {"image_id": 8, "id": 801, "caption": "A thin strip."},
                        {"image_id": 42, "id": 4202, "caption": "Red box!"},
                        {"image_id": 42, "id": 4203, "caption": "  "},
                        {"image_id": 77, "id": 7701, "caption": "orphan"},
                        {"image_id": 8, "id": 802}],
    }
    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps(data))
    return d, ann


def test_coco_captions_official(tmp_path, capsys, tok):
    images, ann = _coco_official(tmp_path)
    assert [g[1:] for g in iter_coco_captions(str(ann))] == [("8", ["a thin strip."]),
                                                             ("42", ["a cat on a mat.", "red box!"])]
    assert _import("coco_captions", ann, images, tmp_path / "v", "--split", "val") == 0
    err = capsys.readouterr().err
    assert "skipped: 5 (empty caption 1, malformed record 3, no captions 1)" in err
    assert "annotations[4]: image_id 77 is not in 'images'" in err and "images[2]: bad file_name" in err
    val = _rows(tmp_path / "v" / "caption_val.tsv")
    assert [r[:4] for r in val] == [["8", "8", "a thin strip.", ""], ["42", "42", "a cat on a mat.&&red box!", ""]]
    assert _import("coco_captions", ann, images, tmp_path / "t", "--split", "train", "--max-side", "32") == 0
    train = _rows(tmp_path / "t" / "caption_stage1_train.tsv")
    assert [r[:3] for r in train] == [["801", "8", "a thin strip."], ["4201", "42", "a cat on a mat."],
                                      ["4202", "42", "red box!"]]
    assert _size(train[0][4]) == (32, 8) and _size(train[1][4]) == (32, 24)
    assert os.listdir(tmp_path / "t") == ["caption_stage1_train.tsv"]
    assert validate("caption", str(tmp_path / "t" / "caption_stage1_train.tsv"), stream=io.StringIO()) == (3, 0)
    assert validate("caption", str(tmp_path / "v" / "caption_val.tsv"), stream=io.StringIO()) == (2, 0)
    assert len(_loads(str(tmp_path / "v" / "caption_val.tsv"), "valid", tok)[0]["captions"]) == 2


def test_flickr30k(tmp_path, capsys, tok):
    d = tmp_path / "flickr30k-images"
    d.mkdir()
    make_image(50, 40).save(d / "1000092795.jpg")
    make_image(30, 50).save(d / "10002456.jpg")
    images = [{"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
               "sentences": [_sent("Two young guys with shaggy hair.", 0), _sent("Two friends enjoy time.", 1)]},
              {"filename": "10002456.jpg", "imgid": 1, "split": "test", "sentids": [5, 6],
               "sentences": [_sent("Several men in hard hats.", 5), _sent("Workers look down.", 6)]}]
    ann = tmp_path / "dataset_flickr30k.json"
    ann.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    out = tmp_path / "out"
    assert _import("flickr30k", ann, d, out) == 0
    assert sorted(os.listdir(out)) == ["flickr30k_caption_stage1_train.tsv", "flickr30k_caption_test.tsv"]
    assert [r[:3] for r in _rows(out / "flickr30k_caption_stage1_train.tsv")] == [
        ["0", "1000092795", "two young guys with shaggy hair."], ["1", "1000092795", "two friends enjoy time."]]
    assert [r[:3] for r in _rows(out / "flickr30k_caption_test.tsv")] == [
        ["10002456", "10002456", "several men in hard hats.&&workers look down."]]
    assert "flickr30k_caption_val.tsv 0" in capsys.readouterr().err      # no rows: listed, but no (empty) file
    assert validate("caption", str(out / "flickr30k_caption_test.tsv"), stream=io.StringIO()) == (1, 0)
    assert main(["validate", "--task", "caption", str(out / "flickr30k_caption_stage1_train.tsv")]) == 0
    assert len(_loads(str(out / "flickr30k_caption_stage1_train.tsv"), "train", tok)) == 1


def test_errors_are_one_line(coco, tmp_path, capsys):
    root, ann = coco
    bad = tmp_path / "dataset_coco_bad.json"
    bad.write_text('{"images": [ {"filename": ')
    assert _import("coco_karpathy", bad, root, tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "not valid JSON" in err and err.count("\n") == 1
    wrong = tmp_path / "captions_train2014.json"
    wrong.write_text(json.dumps({"images": []}))
    assert _import("coco_captions", wrong, root, tmp_path / "o2", "--split", "train") == 2
    assert "captions_train2014.json: expected an object with 'images' and 'annotations'" in capsys.readouterr().err
    assert _import("coco_karpathy", tmp_path / "nope.json", root, tmp_path / "o3") == 2
    assert "nope.json" in capsys.readouterr().err
    assert _import("coco_karpathy", ann, tmp_path / "no_images", tmp_path / "o4") == 2
    assert "no_images: images folder not found" in capsys.readouterr().err
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()
    with pytest.raises(ValueError, match="dataset_coco_bad.json"):
        list(iter_karpathy(str(bad)))
