"""SNLI-VE importer on tiny snli_ve_{train,dev}.jsonl files in the authors' format and three small Flickr30k-named
images: rows, each skip reason (bad lines named file:line), byte-identical reruns, --max-side, the CLI, and that the
outputs pass `validate` and load in the training DataStream."""
import base64
import io
import json
import os
from contextlib import redirect_stderr

import pytest

from ofa_ds.data import DataConfig
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import validate
from ofa_ds.data.images import decode_base64_image
from ofa_ds.data.loader import DataStream
from ofa_ds.data.tsv import TSVFile
from tests.data.conftest import make_image


def rec(fid, label, premise, hyp, k):
    """One line as the SNLI-VE files hold it (SNLI's fields plus Flickr30K_ID)."""
    return {"annotator_labels": [label], "captionID": f"{fid}.jpg#{k}", "gold_label": label,
            "pairID": f"{fid}.jpg#{k}r1{label[:1] if label != '-' else 'x'}", "sentence1": premise,
            "sentence1_binary_parse": "( x )", "sentence1_parse": "(ROOT x)", "sentence2": hyp,
            "sentence2_binary_parse": "( x )", "sentence2_parse": "(ROOT x)", "Flickr30K_ID": str(fid)}


@pytest.fixture
def snli(tmp_path):
    ann, img = tmp_path / "ann", tmp_path / "flickr30k-images"
    ann.mkdir()
    img.mkdir()
    make_image(200, 100, (20, 20, 80, 80)).save(img / "1001.jpg", quality=95)
    make_image(64, 48).save(img / "1002.jpg", quality=95)
    (img / "1003.jpg").write_bytes(b"broken")
    train = [rec(1001, "entailment", "A red box on white.", "There is a box.", 0),
             rec(1001, "contradiction", "A red box on white.", "There is no box.", 0),
             rec(1002, "neutral", "A small red\tbox.", "The box is new.", 1),
             rec(1002, "-", "A small red box.", "No consensus here.", 1),          # no gold label
             rec(1002, "maybe", "A small red box.", "Odd label.", 1),              # unknown label
             rec(1002, "entailment", "A small red box.", "   ", 1),                # empty hypothesis
             rec(1003, "entailment", "Broken.", "Broken image.", 2),               # image unreadable
             rec(1009, "entailment", "Nowhere.", "Missing image.", 3)]             # image missing
    lines = [json.dumps(r) for r in train]
    lines.insert(3, '{"Flickr30K_ID": "1002", "gold_label": ')                     # line 4: cut short
    lines.insert(5, "")                                                            # blank: not a record
    (ann / "snli_ve_train.jsonl").write_text("\n".join(lines) + "\n")
    (ann / "snli_ve_dev.jsonl").write_text(json.dumps(rec(1002, "entailment", "A red box.", "A box.", 4)) + "\n")
    return str(ann), str(img)


def _import(out, *args):
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["import", "snli_ve", "--out", str(out), *args])
    return rc, err.getvalue()


def test_rows_skips_and_determinism(tmp_path, snli):
    ann, img = snli
    rc, err = _import(tmp_path / "a", "--annotations", ann, "--images", img)
    assert rc == 0, err
    assert ("rows written: 4 (snli_ve_dev.tsv 1, snli_ve_train.tsv 3); skipped: 6 (bad JSON line 1, "
            "empty hypothesis 1, image missing 1, image unreadable 1, no gold label 1, unknown label 1)") in err
    assert "(bad JSON line: snli_ve_train.jsonl:4 (" in err                       # file:line of the bad ones
    assert "(no gold label: snli_ve_train.jsonl:5)" in err and "(unknown label: snli_ve_train.jsonl:7: 'maybe')" in err
    path = str(tmp_path / "a" / "snli_ve_train.tsv")
    rows = [TSVFile(path).row(i) for i in range(3)]
    assert [r[:2] + r[3:] for r in rows] == [
        ["1001.jpg#0r1e", "1001", "There is a box.", "A red box on white.", "entailment"],
        ["1001.jpg#0r1c", "1001", "There is no box.", "A red box on white.", "contradiction"],
        ["1002.jpg#1r1n", "1002", "The box is new.", "A small red box.", "neutral"]]
    assert base64.b64decode(rows[0][2]) == open(os.path.join(img, "1001.jpg"), "rb").read()
    rc, _ = _import(tmp_path / "b", "--annotations", os.path.join(ann, "snli_ve_train.jsonl"),
                    os.path.join(ann, "snli_ve_dev.jsonl"), "--images", img)
    assert rc == 0
    for f in ("snli_ve_train.tsv", "snli_ve_dev.tsv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_max_side_and_outputs_load(tmp_path, snli, tok):
    ann, img = snli
    rc, err = _import(tmp_path, "--annotations", ann, "--images", img, "--max-side", "100")
    assert rc == 0, err
    path = str(tmp_path / "snli_ve_train.tsv")
    assert decode_base64_image(TSVFile(path).row(0)[2]).size == (100, 50)
    assert decode_base64_image(TSVFile(path).row(2)[2]).size == (64, 48)        # small images keep their bytes
    for f in ("snli_ve_train.tsv", "snli_ve_dev.tsv"):
        assert validate("snli_ve", str(tmp_path / f), stream=io.StringIO()) == ((3 if "train" in f else 1), 0)
    cfg = DataConfig(task="snli_ve", data=path, batch_size=2, patch_image_size=32, shuffle=False, add_caption=True)
    batches = list(DataStream(cfg, split="valid", tokenizer=tok))
    assert sum(len(b["id"]) for b in batches) == 3


def test_missing_inputs_are_one_line_errors(tmp_path, snli, capsys):
    ann, img = snli
    assert main(["import", "snli_ve", "--out", str(tmp_path / "o"), "--annotations", str(tmp_path / "none.jsonl"),
                 "--images", img]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["import", "snli_ve", "--out", str(tmp_path / "o"), "--annotations", str(tmp_path),
                 "--images", img]) == 2
    assert "snli_ve_{train,dev,test}.jsonl" in capsys.readouterr().err
    only_bad = tmp_path / "snli_ve_test.jsonl"
    only_bad.write_text(json.dumps(rec(1001, "-", "p", "h", 0)) + "\n")
    assert main(["import", "snli_ve", "--out", str(tmp_path / "o"), "--annotations", str(only_bad),
                 "--images", img]) == 1                                    # nothing written: exit 1, no file
    assert not os.path.exists(tmp_path / "o" / "snli_ve_test.tsv")
    assert "rows written: 0 (snli_ve_test.tsv 0); skipped: 1 (no gold label 1)" in capsys.readouterr().err
