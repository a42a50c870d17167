"""TSV index, sharding, resume, multi-file epochs and bad-row policy."""
import os
import time

import numpy as np
import pytest

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.tsv import TSVFile, build_offsets, epoch_order, rank_positions
from tests.data.conftest import b64, make_image, write_tsv


def test_offsets_and_selected_cols(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_bytes(b"a\tb\tc\nd\te\tf\r\nlast\tx\ty")  # CRLF line and no final newline
    offs = build_offsets(str(p))
    assert offs.tolist() == [0, 6, 13, 21]
    f = TSVFile(str(p), selected_cols=[2, 0])
    assert len(f) == 3 and f.row(0) == ["c", "a"] and f.row(1) == ["f", "d"] and f.row(2) == ["y", "last"]
    assert os.path.exists(str(p) + ".idx")


def test_index_cache_invalidated_on_change(tmp_path):
    p = tmp_path / "b.tsv"
    p.write_text("1\n2\n")
    assert len(TSVFile(str(p))) == 2
    time.sleep(0.01)
    p.write_text("1\n2\n3\n")
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 5_000_000))
    assert len(TSVFile(str(p))) == 3
    f = TSVFile(str(p), cache_dir=str(tmp_path / "cache"))
    assert len(f) == 3 and len(os.listdir(tmp_path / "cache")) == 1


def test_missing_and_empty_files_fail_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TSVFile(str(tmp_path / "nope.tsv"))
    (tmp_path / "e.tsv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        TSVFile(str(tmp_path / "e.tsv"))
    cfg = DataConfig(task="gigaword", data=str(tmp_path / "nope.tsv"))
    with pytest.raises(FileNotFoundError):
        DataStream(cfg, tokenizer=None)


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 4), (3, 5)])
def test_rank_positions_partition(n, world):
    got = np.concatenate([rank_positions(n, r, world, equalize=False) for r in range(world)])
    assert sorted(got.tolist()) == list(range(n))
    eq = [rank_positions(n, r, world, equalize=True) for r in range(world)]
    assert len({len(e) for e in eq}) == 1 and set(np.concatenate(eq).tolist()) == set(range(n))


def test_epoch_order_seeded():
    a, b = epoch_order(50, 1, 1, True), epoch_order(50, 1, 1, True)
    assert (a == b).all() and sorted(a.tolist()) == list(range(50))
    assert not (a == epoch_order(50, 1, 2, True)).all() and not (a == epoch_order(50, 2, 1, True)).all()


def _gigaword(tmp_path, n, name="g.tsv"):
    return write_tsv(tmp_path / name, [[f"article number {i} about things", f"summary {i}"] for i in range(n)])


def _ids(stream):
    return [int(i) for b in stream for i in b["id"]]


@pytest.mark.parametrize("world,workers", [(1, 0), pytest.param(1, 2, marks=pytest.mark.distributed),
                                           pytest.param(2, 2, marks=pytest.mark.distributed),
                                           pytest.param(3, 1, marks=pytest.mark.distributed), (4, 0)])
def test_sharding_every_sample_once(tmp_path, tok, world, workers):
    path = _gigaword(tmp_path, 23)
    seen = []
    for r in range(world):
        cfg = DataConfig(task="gigaword", data=path, batch_size=2, num_workers=workers, equalize_shards=False,
                         seed=5)
        seen += _ids(DataStream(cfg, rank=r, world=world, tokenizer=tok))
    assert sorted(seen) == list(range(23))


@pytest.mark.distributed                                  # DataLoader worker processes
def test_workers_do_not_change_batches(tmp_path, tok):
    path = _gigaword(tmp_path, 17)
    outs = []
    for w in (0, 2):
        cfg = DataConfig(task="gigaword", data=path, batch_size=3, num_workers=w, seed=9, noise_ratio=0.3)
        outs.append([(b["id"].tolist(), b["prev_output_tokens"].tolist()) for b in DataStream(cfg, tokenizer=tok)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.distributed)])
def test_resume_mid_epoch_continues_exactly(tmp_path, tok, workers):
    path = _gigaword(tmp_path, 20)
    cfg = DataConfig(task="gigaword", data=path, batch_size=3, num_workers=workers, seed=4, noise_ratio=0.5)
    full = DataStream(cfg, tokenizer=tok)
    ref = [b["prev_output_tokens"].tolist() for b in full] + [b["prev_output_tokens"].tolist() for b in full]
    s = DataStream(cfg, tokenizer=tok)
    it = iter(s)
    first = [next(it)["prev_output_tokens"].tolist() for _ in range(3)]
    state = s.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 3
    s2 = DataStream(cfg, tokenizer=tok)
    s2.load_state_dict(state)
    rest = [b["prev_output_tokens"].tolist() for b in s2] + [b["prev_output_tokens"].tolist() for b in s2]
    assert first + rest == ref


def test_multi_file_epochs(tmp_path, tok):
    a = write_tsv(tmp_path / "e1.tsv", [["first file", "one"]])
    b = write_tsv(tmp_path / "e2.tsv", [["second file", "two"]])
    v = write_tsv(tmp_path / "val.tsv", [["validation", "three"]])
    cfg = DataConfig(task="gigaword", data=f"{a},{b},{v}", batch_size=4)
    s = DataStream(cfg, tokenizer=tok)
    got = [tok.decode(list(s)[0]["target"][0].tolist()) for _ in range(3)]
    assert [g.strip() for g in got] == ["one", "two", "one"]
    assert tok.decode(next(iter(DataStream(cfg, "valid", tokenizer=tok)))["target"][0].tolist()).strip() == "three"
    cfg.task = "pretrain"  # pretraining cycles over all paths, no validation file split off
    assert len(DataStream(cfg, tokenizer=tok).files) == 3


def test_bad_rows_skipped_counted_and_threshold(tmp_path, tok, caplog):
    img = b64(make_image())
    rows = [[f"r{i}", "1", f"a caption {i}", "", img] for i in range(10)]
    rows[3] = ["r3", "1", "caption", "", "not-an-image!!"]
    rows[6] = ["r6", "1", "too few columns"]
    path = write_tsv(tmp_path / "cap.tsv", rows)
    cfg = DataConfig(task="caption", data=path, batch_size=4, patch_image_size=32, bad_row_threshold=0.5,
                     shuffle=False)
    s = DataStream(cfg, tokenizer=tok)
    with caplog.at_level("WARNING", logger="ofa_ds.data"):
        ids = _ids(s)
    assert ids == [0, 1, 2, 4, 5, 7, 8, 9]
    assert s.state_dict()["bad"] == 2 and s.state_dict()["rows"] == 10
    assert f"{path}:4: undecodable image" in caplog.text and f"{path}:7:" in caplog.text
    cfg.bad_row_threshold = 0.01
    s = DataStream(cfg, tokenizer=tok)
    s.counter.min_rows = 5
    with pytest.raises(RuntimeError, match="too many bad rows"):
        _ids(s)
