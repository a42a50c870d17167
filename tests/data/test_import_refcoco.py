"""RefCOCO importer on a tiny dataset in the authors' layout: a refs(unc).p written the way Python 2's pickle
writes it (byte strings, protocol 2), a COCO instances.json and three small images. Checks the rows, each skip
reason, byte-identical reruns, box scaling with --max-side, the CLI (exit 2 naming the file for a pickle that asks
for code) and that the outputs pass `validate` and load in the training DataStream."""
import base64
import io
import json
import os
import pickle
import struct
from contextlib import redirect_stderr

import numpy as np
import pytest

from ofa_ds.data import DataConfig
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import validate
from ofa_ds.data.images import decode_base64_image
from ofa_ds.data.importers.refcoco import iter_refs
from ofa_ds.data.loader import DataStream
from ofa_ds.data.tsv import TSVFile
from tests.data.conftest import make_image, red_bbox


def py2_pickle(obj) -> bytes:
    """Protocol 2 as Python 2 writes it: str values are byte strings (SHORT_BINSTRING / BINSTRING), unicode values
    BINUNICODE, ints BININT, floats BINFLOAT."""
    out = [b"\x80\x02"]

    def emit(o):
        if isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<i", len(o)) + o)
        elif isinstance(o, str):
            b = o.encode("utf-8")
            out.append(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(o, bool) or o is None:
            out.append({True: b"\x88", False: b"\x89", None: b"N"}[o])
        elif isinstance(o, int):
            out.append(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.append(b"G" + struct.pack(">d", o))
        elif isinstance(o, list):
            out.append(b"](")
            for v in o:
                emit(v)
            out.append(b"e")
        elif isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.append(b"u")
        else:
            raise TypeError(type(o))
    emit(obj)
    out.append(b".")
    return b"".join(out)


def _ref(ref_id, ann_id, image_id, split, sents, ann_suffix=None):
    name = b"COCO_train2014_%012d_%d.jpg" % (image_id, ann_suffix or ann_id)
    return {b"ref_id": ref_id, b"ann_id": ann_id, b"image_id": image_id, b"split": split, b"category_id": 1,
            b"file_name": name, b"sent_ids": [s[0] for s in sents],
            b"sentences": [{b"sent_id": sid, b"sent": sent, b"raw": raw, b"tokens": sent.split()}
                           for sid, sent, raw in sents]}


IMG = {1: (300, 200, (150, 50, 250, 150)), 2: (60, 40, (10, 10, 30, 30)), 3: (50, 50, None), 4: (40, 40, None)}


@pytest.fixture
def refer(tmp_path):
    """(annotations folder, images folder) in the refer layout."""
    ann_dir, img_dir = tmp_path / "refcoco", tmp_path / "train2014"
    ann_dir.mkdir()
    img_dir.mkdir()
    for i in (1, 2):
        w, h, box = IMG[i]
        make_image(w, h, box).save(img_dir / ("COCO_train2014_%012d.jpg" % i), quality=95)
    (img_dir / ("COCO_train2014_%012d.jpg" % 3)).write_bytes(b"not a jpeg")           # 4: no file at all
    inst = {"images": [{"id": i, "file_name": "COCO_train2014_%012d.jpg" % i, "width": IMG[i][0],
                        "height": IMG[i][1]} for i in IMG],
            "annotations": [{"id": 101, "image_id": 1, "bbox": [150, 50, 100, 100], "category_id": 1},
                            {"id": 102, "image_id": 2, "bbox": [10, 10, 20, 20], "category_id": 1},
                            {"id": 103, "image_id": 2, "bbox": [5, 5, 0, 10], "category_id": 1},
                            {"id": 104, "image_id": 3, "bbox": [1, 1, 10, 10], "category_id": 1},
                            {"id": 105, "image_id": 4, "bbox": [1, 1, 10, 10], "category_id": 1},
                            {"id": 106, "image_id": 2, "bbox": [30, 20, 40, 30], "category_id": 1},
                            {"id": 107, "image_id": 1, "bbox": [0, 0, 300.4, 200.5], "category_id": 1}],
            "categories": [{"id": 1, "name": "thing"}]}
    (ann_dir / "instances.json").write_text(json.dumps(inst))
    refs = [
        _ref(7, 102, 2, b"val", [(20, b"small red box", b"Small red box.")]),
        _ref(3, 101, 1, b"train", [(10, b"the red square", b"The red square!"),
                                   (11, "caf\u00e9 sign".encode("utf-8"), "Caf\u00e9 sign".encode("utf-8"))]),
        _ref(4, 999, 1, b"train", [(12, b"ghost", b"ghost")]),                 # ann not in instances
        _ref(5, 103, 2, b"train", [(13, b"flat", b"flat")]),                   # zero width
        _ref(6, 104, 3, b"testA", [(14, b"broken", b"broken")]),               # unreadable image
        _ref(8, 105, 4, b"testA", [(15, b"nowhere", b"nowhere")]),             # image missing
        _ref(9, 101, 1, b"testB", [(16, b"", b""), (17, b"right box", b"Right box")]),   # empty sentence
        _ref(10, 106, 2, b"testB", [(18, b"too far", b"too far")]),            # past the 60x40 image
        _ref(11, 107, 1, b"train", [(19, b"whole picture", b"whole picture")]),  # 0.5 px overhang: clipped
    ]
    (ann_dir / "refs(unc).p").write_bytes(py2_pickle(refs))
    return str(ann_dir), str(img_dir)


def _import(out, ann, img, *extra):
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["import", "refcoco", "--out", str(out), "--annotations", ann, "--images", img,
                   "--dataset", "refcoco", *extra])
    return rc, err.getvalue()


def test_rows_skips_and_determinism(tmp_path, refer):
    ann, img = refer
    rc, err = _import(tmp_path / "a", ann, img)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "a")) == ["refcoco_testB.tsv", "refcoco_train.tsv", "refcoco_val.tsv"]
    assert ("rows written: 5 (refcoco_testA.tsv 0, refcoco_testB.tsv 1, refcoco_train.tsv 3, refcoco_val.tsv 1); "
            "skipped: 6 (annotation not in instances 1, box outside image 1, degenerate box 1, empty sentence 1, "
            "image missing 1, image unreadable 1)") in err
    assert "refs(unc).p ref_id 4: ann_id 999" in err and "COCO_train2014_000000000004.jpg" in err
    train = TSVFile(str(tmp_path / "a" / "refcoco_train.tsv"))
    rows = [train.row(i) for i in range(3)]
    assert [r[:4] for r in rows] == [
        ["3_0", "1", "the red square", "150.00,50.00,250.00,150.00"],
        ["3_1", "1", "caf\u00e9 sign", "150.00,50.00,250.00,150.00"],          # UTF-8 bytes of a py2 str
        ["11_0", "1", "whole picture", "0.00,0.00,300.00,200.00"]]
    with open(os.path.join(img, "COCO_train2014_000000000001.jpg"), "rb") as f:
        assert base64.b64decode(rows[0][4]) == f.read()                        # original bytes kept
    assert TSVFile(str(tmp_path / "a" / "refcoco_testB.tsv")).row(0)[:3] == ["9_1", "1", "right box"]
    rc, _ = _import(tmp_path / "b", ann, img)
    assert rc == 0
    for f in ("refcoco_train.tsv", "refcoco_val.tsv", "refcoco_testB.tsv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    rc, _ = _import(tmp_path / "c", ann, img, "--text", "raw", "--splits", "val")
    assert rc == 0 and os.listdir(tmp_path / "c") == ["refcoco_val.tsv"]
    assert TSVFile(str(tmp_path / "c" / "refcoco_val.tsv")).row(0)[2] == "Small red box."


def test_max_side_scales_boxes_and_outputs_load(tmp_path, refer, tok):
    ann, img = refer
    rc, err = _import(tmp_path, ann, img, "--max-side", "150")
    assert rc == 0, err
    path = str(tmp_path / "refcoco_train.tsv")
    uid, iid, text, box, b64 = TSVFile(path).row(0)
    assert box == "75.00,25.00,125.00,75.00"
    im = decode_base64_image(b64)
    assert im.size == (150, 100)
    assert np.allclose(red_bbox(np.asarray(im)), [75, 25, 125, 75], atol=2)
    for f in ("refcoco_train.tsv", "refcoco_val.tsv", "refcoco_testB.tsv"):
        assert validate("refcoco", str(tmp_path / f), stream=io.StringIO())[1] == 0, f
    cfg = DataConfig(task="refcoco", data=path, batch_size=2, patch_image_size=32, shuffle=False)
    batches = list(DataStream(cfg, split="valid", tokenizer=tok))
    assert sum(len(b["id"]) for b in batches) == 3
    assert batches[0]["region_coords"][0].tolist() == [75, 25, 125, 75]


def test_iter_refs_for_other_importers(refer, tmp_path):
    ann, _ = refer
    inst = os.path.join(ann, "instances.json")
    got = list(iter_refs(os.path.join(ann, "refs(unc).p"), inst))
    assert [(r["ref_id"], r["sent_id"], r["split"]) for r in got] == [
        (3, 10, "train"), (3, 11, "train"), (6, 14, "testA"), (7, 20, "val"), (8, 15, "testA"), (9, 17, "testB"),
        (11, 19, "train")]
    assert got[0]["file_name"] == "COCO_train2014_000000000001.jpg" and got[0]["box"] == (150, 50, 250, 150)
    assert got[0]["image_id"] == 1 and got[0]["sentence"] == "the red square"
    # a Python 3 protocol-2 pickle of the same kind of data reads too
    p3 = tmp_path / "refs(umd).p"
    p3.write_bytes(pickle.dumps([{"ref_id": 1, "ann_id": 102, "image_id": 2, "split": "val",
                                  "file_name": "COCO_train2014_000000000002_102.jpg",
                                  "sentences": [{"sent_id": 5, "sent": "a box", "raw": "A box", "tokens": []}]}],
                                protocol=2))
    (r,) = iter_refs(str(p3), inst)
    assert (r["uniq_id"], r["box"], r["file_name"]) == ("1_0", (10, 10, 30, 30), "COCO_train2014_000000000002.jpg")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_code_in_the_pickle_is_refused_naming_the_file(tmp_path, refer, capsys):
    ann, img = refer
    refs = os.path.join(ann, "refs(unc).p")
    with open(refs, "wb") as f:
        pickle.dump([{"ref_id": 1, "sentences": [_Evil()]}], f, protocol=2)
    assert main(["import", "refcoco", "--out", str(tmp_path / "o"), "--annotations", ann, "--images", img,
                 "--dataset", "refcoco"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {refs}: ") and "system" in err[0], err
    assert not os.path.exists(tmp_path / "o" / "refcoco_train.tsv") and not os.path.exists("pwned.txt")
    os.remove(refs)                                        # refcoco+ / google files missing: one line, exit 2
    assert main(["import", "refcoco", "--out", str(tmp_path / "o"), "--annotations", ann, "--images", img,
                 "--dataset", "refcoco", "--split-by", "google"]) == 2
    assert "refs(google).p" in capsys.readouterr().err
    with open(os.path.join(ann, "instances.json"), "w") as f:
        f.write("{broken")
    with open(refs, "wb") as f:
        f.write(py2_pickle([]))
    assert main(["import", "refcoco", "--out", str(tmp_path / "o"), "--annotations", ann, "--images", img,
                 "--dataset", "refcoco"]) == 2
    assert "instances.json: invalid JSON" in capsys.readouterr().err
