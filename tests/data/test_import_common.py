"""The importers' shared parts: a failed import leaves no file that looks complete, skips are counted by reason,
images keep their bytes unless shrunk (boxes scale with them), and pickles hold plain data or are refused."""
import base64
import io
import os
import pickle

import pytest
from PIL import Image

from ofa_ds.data.importers.common import (ImportStats, Skip, TSVWriter, box_cell, embed_image, load_plain_pickle)


def test_writer_renames_on_success_and_removes_the_part_file_on_error(tmp_path):
    stats = ImportStats()
    out = str(tmp_path / "a.tsv")
    with TSVWriter(out, stats) as w:
        w.write(["1", "two\twords", "x\ny"])
        assert not os.path.exists(out) and os.path.exists(out + ".part")
    assert open(out).read() == "1\ttwo words\tx y\n"
    bad = str(tmp_path / "b.tsv")
    with pytest.raises(RuntimeError):
        with TSVWriter(bad, stats) as w:
            w.write(["1"])
            raise RuntimeError("disk full")
    assert not os.path.exists(bad) and not os.path.exists(bad + ".part")
    assert stats.written[out] == 1
    with TSVWriter(str(tmp_path / "empty.tsv"), stats):
        pass
    assert not os.path.exists(tmp_path / "empty.tsv") and stats.written[str(tmp_path / "empty.tsv")] == 0


def test_skips_are_counted_by_reason(capsys):
    stats = ImportStats(log_limit=1)
    for i in range(3):
        stats.skip(Skip("image missing", f"img{i}.jpg"))
    stats.skip(Skip("empty caption", "id 7"))
    stats.written["x/caption_train.tsv"] = 5
    err = capsys.readouterr().err
    assert err.count("image missing") == 1                    # log lines are capped per reason, counts are not
    assert stats.summary() == ("rows written: 5 (caption_train.tsv 5); skipped: 4 (empty caption 1, image missing 3)")


def test_images_keep_their_bytes_unless_shrunk(tmp_path):
    p = tmp_path / "i.png"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(p)
    kept = embed_image(str(p))
    assert base64.b64decode(kept.b64) == p.read_bytes() and (kept.width, kept.height) == (40, 20)
    small = embed_image(str(p), max_side=10)
    assert (small.width, small.height) == (10, 5)
    assert Image.open(io.BytesIO(base64.b64decode(small.b64))).size == (10, 5)
    assert box_cell((4, 2, 40, 20), small) == "1.00,0.50,10.00,5.00"
    (tmp_path / "t.jpg").write_bytes(b"not an image")
    with pytest.raises(Skip, match="image unreadable"):
        embed_image(str(tmp_path / "t.jpg"))
    with pytest.raises(Skip, match="image missing"):
        embed_image(str(tmp_path / "none.jpg"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_plain_pickles_only(tmp_path):
    ok = tmp_path / "refs.p"
    ok.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": [{"sent": "left dog"}], "box": (1.0, 2.0)}], protocol=2))
    assert load_plain_pickle(str(ok)) == [{"ref_id": 1, "sentences": [{"sent": "left dog"}], "box": (1.0, 2.0)}]
    bad = tmp_path / "evil.p"
    bad.write_bytes(pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        load_plain_pickle(str(bad))
