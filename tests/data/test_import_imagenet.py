"""ImageNet importer: class folders + synset_words.txt (and a flat val folder with a labels file) -> OFA's ImageNet
TSV: base64 of the original bytes, the 1-based synset-list label, the first synset word; rows sorted by class then
file; skips counted by reason; --max-side shrinks; the files validate and load; the CLI."""
import base64
import io
import json

import pytest
from PIL import Image

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.__main__ import main
from ofa_ds.data.importers.imagenet import read_synset_words, read_val_labels

SYNSETS = "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn04118538 rugby ball\n"


def _jpeg(path, size=(40, 30), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path.read_bytes()


@pytest.fixture
def imagenet(tmp_path):
    root = tmp_path / "ILSVRC2012"
    root.mkdir()
    (root / "synset_words.txt").write_text(SYNSETS)
    train = root / "train"
    raw = {"a": _jpeg(train / "n04118538" / "n04118538_2.JPEG", (40, 30)),
           "b": _jpeg(train / "n01440764" / "n01440764_9.JPEG", (30, 60), (10, 200, 10)),
           "c": _jpeg(train / "n01440764" / "n01440764_10.JPEG", (16, 16))}
    (train / "n01443537").mkdir()
    (train / "n01443537" / "n01443537_1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    _jpeg(train / "n09999999" / "n09999999_1.JPEG")                # not in the synset list
    (train / "README.txt").write_text("class folders below")         # not in a class folder
    val = root / "val"
    raw["v1"] = _jpeg(val / "ILSVRC2012_val_00000001.JPEG", (24, 24), (0, 0, 250))
    _jpeg(val / "ILSVRC2012_val_00000002.JPEG")                      # no label
    _jpeg(val / "ILSVRC2012_val_00000003.JPEG")                      # label not in the synset list
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01443537 10 20 30 40 n01443537 1 2 3 4\n"
        "ILSVRC2012_val_00000003,n02000000 1 1 5 5\n")
    return root, raw


def _args(root, out, *extra):
    return ["import", "imagenet", "--out", str(out), "--synset-words", str(root / "synset_words.txt"),
            "--split-dir", f"train={root / 'train'}", "--split-dir", f"val={root / 'val'}",
            "--val-labels", str(root / "LOC_val_solution.csv"), *extra]


def _rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_rows_skips_and_determinism(imagenet, tmp_path, capsys):
    root, raw = imagenet
    out = tmp_path / "out"
    assert main(_args(root, out)) == 0
    err = capsys.readouterr().err
    train = _rows(out / "imagenet_1k_train.tsv")
    # sorted by class folder, then file name: n01440764 (_10 before _9), then n04118538
    assert [(r[1], r[2]) for r in train] == [("1", "tench"), ("1", "tench"), ("3", "rugby ball")]
    assert [base64.b64decode(r[0]) for r in train] == [raw["c"], raw["b"], raw["a"]]
    val = _rows(out / "imagenet_1k_val.tsv")
    assert [(base64.b64decode(r[0]), r[1], r[2]) for r in val] == [(raw["v1"], "2", "goldfish")]
    assert json.loads((out / "class2label.json").read_text()) == {"tench": 1, "goldfish": 2, "rugby ball": 3}
    summary = err.strip().splitlines()[-1]
    assert summary == ("rows written: 4 (imagenet_1k_train.tsv 3, imagenet_1k_val.tsv 1); skipped: 5 (file outside "
                       "class folders 1, folder not in synset list 1, image unreadable 1, label not in synset list 1, "
                       "no label for file 1)")
    assert "n01443537_1.JPEG" in err and "n09999999_1.JPEG" in err
    again = tmp_path / "again"
    assert main(_args(root, again)) == 0
    for name in ("imagenet_1k_train.tsv", "imagenet_1k_val.tsv", "class2label.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert not list(out.glob("*.part"))


def test_outputs_validate_and_load(imagenet, tmp_path, tok):
    root, _ = imagenet
    out = tmp_path / "out"
    assert main(_args(root, out)) == 0
    for name in ("imagenet_1k_train.tsv", "imagenet_1k_val.tsv"):
        assert main(["validate", "--task", "imagenet", str(out / name)]) == 0
    cfg = DataConfig(task="imagenet", data=f"{out / 'imagenet_1k_train.tsv'},{out / 'imagenet_1k_val.tsv'}",
                     batch_size=4, patch_image_size=32, augment=False, shuffle=False,
                     ans2label_file=str(out / "class2label.json"))
    batch = next(iter(DataStream(cfg, tokenizer=tok)))
    assert tuple(batch["patch_images"].shape) == (3, 3, 32, 32) and batch["constraint_masks"] is not None
    names = [tok.decode([t for t in row.tolist() if t > 3]).strip() for row in batch["target"]]
    assert names == ["tench", "tench", "rugby ball"]


def test_max_side_shrinks(imagenet, tmp_path):
    root, _ = imagenet
    out = tmp_path / "out"
    assert main(_args(root, out, "--max-side", "20")) == 0
    sizes = [Image.open(io.BytesIO(base64.b64decode(r[0]))).size for r in _rows(out / "imagenet_1k_train.tsv")]
    assert sizes == [(16, 16), (10, 20), (20, 15)]                  # 16x16 kept, 30x60 and 40x30 shrunk


def test_label_lists(tmp_path):
    words = tmp_path / "synset_words.txt"
    words.write_text(SYNSETS)
    syn = read_synset_words(str(words))
    assert syn["n04118538"] == (3, "rugby ball") and syn["n01440764"] == (1, "tench")
    assert read_synset_words(str(words), "all")["n01440764"] == (1, "tench, Tinca tinca")
    plain = tmp_path / "val_labels.txt"
    plain.write_text("ILSVRC2012_val_00000001.JPEG n01443537\nILSVRC2012_val_00000002.JPEG,n04118538\n")
    assert read_val_labels(str(plain), syn)["ILSVRC2012_val_00000002.JPEG"] == "n04118538"
    caffe = tmp_path / "val.txt"                                      # caffe: 0-based index into the list
    caffe.write_text("ILSVRC2012_val_00000001.JPEG 2\n")
    assert read_val_labels(str(caffe), syn)["ILSVRC2012_val_00000001"] == "n04118538"
    bad = tmp_path / "bad_words.txt"
    bad.write_text("n01440764 tench\ntench\n")
    with pytest.raises(ValueError, match=r"bad_words.txt:2"):
        read_synset_words(str(bad))


def test_cli_errors_are_one_line(imagenet, tmp_path, capsys):
    root, _ = imagenet
    assert main(["import", "imagenet", "--out", str(tmp_path / "o"), "--synset-words", str(root / "nope.txt"),
                 "--split-dir", f"train={root / 'train'}"]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["import", "imagenet", "--out", str(tmp_path / "o"), "--synset-words",
                 str(root / "synset_words.txt"), "--split-dir", str(root / "val")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--val-labels" in err and len(err.splitlines()) == 1
