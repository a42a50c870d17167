"""benchmarks/bench_generate.py runs end to end on the debug preset (worker process, encoder/decoding split, rows
with every generate.csv column), and its --compare-ref mode alternates a git revision's tree with this one."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _git_ok() -> bool:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.parametrize("ref", [None, pytest.param("HEAD", marks=pytest.mark.slow)])
def test_bench_generate_rows(ref, capsys):
    if ref and not _git_ok():
        pytest.skip("no git checkout")
    from benchmarks.bench_generate import FIELDS, main
    argv = ["--presets", "debug", "--batches", "2", "--image-size", "32", "--max-len-b", "2", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--device", "cpu", "--no-csv"]
    rows = main(argv + (["--compare-ref", ref] if ref else []))
    assert [r["tree"] for r in rows] == (["ref:" + rows[0]["tree"][4:], "HEAD"] if ref else ["HEAD"])
    for r in rows:
        assert tuple(r) == FIELDS and r["decode_steps"] == 3 and r["batch"] == 2
        assert r["encoder_s_per_caption"] > 0 and r["decoding_s_per_caption"] > 0
        assert abs(r["captions_per_s"] * r["caption_batch_s"] - 2) < 0.01
    if ref:
        assert "decoding s/cap" in capsys.readouterr().out
