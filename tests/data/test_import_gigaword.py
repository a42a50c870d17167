"""Gigaword importer: article/summary line files (named pair or harvardnlp's folder layout) -> gigaword_{split}.tsv,
streamed pairwise; empty sides skipped; files of different lengths are an error naming both files and the line."""
import pytest

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.__main__ import main
from ofa_ds.data.importers.common import ImportStats
from ofa_ds.data.importers.gigaword import find_pairs, rows

ARTICLES = ("australia 's current account deficit shrunk by a record #.## billion dollars -lrb- #.## billion us -rrb- "
            "in the june quarter due to soaring commodity prices , figures released monday showed .\n"
            "at least two people were killed in a suspected bomb attack on a passenger bus in <unk> .\r\n"
            "\n"
            "the european union called on israel to stop settlement activity .\n")
TITLES = ("australian current account deficit narrows sharply\n"
          "at least two dead in southern philippines blast\n"
          "this summary has no article\n"
          "  \n")


def _pair(d, stem="train", src=".src.txt", tgt=".tgt.txt", articles=ARTICLES, titles=TITLES):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stem}{src}").write_bytes(articles.encode())
    (d / f"{stem}{tgt}").write_bytes(titles.encode())
    return str(d / f"{stem}{src}"), str(d / f"{stem}{tgt}")


def test_pair_rows_skips_validate_and_load(tmp_path, tok, capsys):
    src, tgt = _pair(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["import", "gigaword", "--source", src, "--target", tgt, "--split", "train", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = (out / "gigaword_train.tsv").read_text().split("\n")[:-1]
    assert [line.split("\t") for line in lines] == [
        [ARTICLES.split("\n")[0], "australian current account deficit narrows sharply"],
        ["at least two people were killed in a suspected bomb attack on a passenger bus in <unk> .",
         "at least two dead in southern philippines blast"]]
    assert err.strip().splitlines()[-1] == ("rows written: 2 (gigaword_train.tsv 2); skipped: 2 "
                                            "(empty article 1, empty summary 1)")
    assert "train.src.txt:3" in err and "train.tgt.txt:4" in err
    assert main(["validate", "--task", "gigaword", str(out / "gigaword_train.tsv")]) == 0
    cfg = DataConfig(task="gigaword", data=str(out / "gigaword_train.tsv"), batch_size=4, shuffle=False)
    batch = next(iter(DataStream(cfg, tokenizer=tok)))
    summary = tok.decode([t for t in batch["target"][1].tolist() if t > 3])
    assert summary == "at least two dead in southern philippines blast"
    again = tmp_path / "again"
    assert main(["import", "gigaword", "--source", src, "--target", tgt, "--out", str(again)]) == 0
    assert (again / "gigaword_train.tsv").read_bytes() == (out / "gigaword_train.tsv").read_bytes()


def test_harvardnlp_folder(tmp_path, capsys):
    root = tmp_path / "sumdata"
    _pair(root / "train", "train", ".article.txt", ".title.txt")
    _pair(root / "train", "valid", ".article.filter.txt", ".title.filter.txt", "a b c\n", "a\n")
    (root / "Giga").mkdir()
    (root / "Giga" / "input.txt").write_text("x y z\nu v w\n")
    (root / "Giga" / "task1_ref0.txt").write_text("x\nu\n")
    assert [s for s, _, _ in find_pairs(str(root))] == ["dev", "test", "train"]
    out = tmp_path / "out"
    assert main(["import", "gigaword", "--gigaword-dir", str(root), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gigaword_dev.tsv", "gigaword_test.tsv", "gigaword_train.tsv"]
    assert (out / "gigaword_test.tsv").read_text() == "x y z\tx\nu v w\tu\n"
    assert "rows written: 5 " in capsys.readouterr().err


def test_length_mismatch_is_an_error_and_writes_nothing(tmp_path, capsys):
    src, tgt = _pair(tmp_path / "in", articles="a\nb\nc\n", titles="a\nb\n")
    stream = rows(src, tgt, ImportStats())
    assert next(stream) == ("a", "a")                               # streamed: rows come before the end is read
    with pytest.raises(ValueError, match=r"train.src.txt has line 3, .*train.tgt.txt ends at line 2"):
        list(stream)
    out = tmp_path / "out"
    assert main(["import", "gigaword", "--source", src, "--target", tgt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "train.src.txt" in err and "train.tgt.txt" in err and "line 3" in err
    assert not list(out.glob("*"))
    assert main(["import", "gigaword", "--source", src, "--target", str(tmp_path / "none.txt"), "--out",
                 str(out)]) == 2
    assert "none.txt" in capsys.readouterr().err
    assert main(["import", "gigaword", "--gigaword-dir", str(tmp_path / "in" / "nothing"), "--out", str(out)]) == 2
