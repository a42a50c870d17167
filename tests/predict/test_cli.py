"""`python -m ofa_ds.predict`: every task through `main(argv)` in-process (the exported-folder fixture), records in
input order with errors as records, --draw, and one real subprocess run."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ofa_ds.predict.__main__ import main
from tests.predict.conftest import SMALL

FAST = ["--image-size", str(SMALL), "--device", "cpu", "--gen", '{"beam": 2, "max_len_b": 3}', "--no-progress"]


def _run(task, ckpt, args, tmp_path, name="out.jsonl"):
    out = tmp_path / name
    status = main([task, "--checkpoint", ckpt, "--out", str(out), *FAST, *args])
    return status, [json.loads(line) for line in out.read_text().splitlines()]


def test_every_task(tiny_folder, image_files, tmp_path):
    a, b, c = image_files
    folder = os.path.dirname(a)
    status, recs = _run("caption", tiny_folder, [folder, str(tmp_path / "nope.jpg"), b], tmp_path)
    assert status == 1                                      # one input not answered
    assert [r["input"] for r in recs] == [a, b, c, str(tmp_path / "nope.jpg"), b]
    assert [r["error"] for r in recs] == [None, None, None, "no such file", None]
    assert all(isinstance(r["text"], str) and isinstance(r["score"], float) for r in recs if not r["error"])
    assert set(recs[0]) == {"input", "text", "score", "box", "error", "id"}

    req = tmp_path / "req.jsonl"
    req.write_text("\n".join([json.dumps({"id": 7, "image": os.path.basename(a), "question": "what is it?"}),
                              "{not json", json.dumps({"id": "q2", "image": b, "question": ""}),
                              json.dumps(["a list"]), json.dumps({"image": c})]) + "\n")
    (tmp_path / os.path.basename(a)).write_bytes(open(a, "rb").read())   # relative paths: next to the JSONL
    status, recs = _run("vqa", tiny_folder, [str(req), "--question", "is it red", "--answers", "red,blue,green"],
                        tmp_path)
    assert status == 1 and len(recs) == 5
    assert recs[0]["id"] == 7 and recs[0]["error"] is None and recs[0]["text"] in ("red", "blue", "green")
    assert recs[1]["input"] == f"{req}:2" and recs[1]["error"].startswith("not JSON")
    assert recs[2]["id"] == "q2" and recs[2]["error"] == "empty question"
    assert recs[3]["error"].startswith("a request must be a JSON object")
    assert recs[4]["error"] is None                          # --question fills in a request without one

    draw = tmp_path / "drawn"
    status, recs = _run("refcoco", tiny_folder, [a, b, "--text", "the left square", "--restrict-bins", "--draw",
                                                 str(draw)], tmp_path)
    assert status == 0 and all(len(r["box"]) == 4 for r in recs)
    with Image.open(recs[0]["drawn"]) as im:
        assert im.size == (120, 80)
    assert sorted(os.listdir(draw)) == ["a.png", "b.png"]

    status, recs = _run("entailment", tiny_folder, [a, "--hypothesis", "a square", "--premise", "two squares"],
                        tmp_path)
    assert status == 0 and recs[0]["text"] in ("yes", "no", "maybe")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nrugby ball\n")
    status, recs = _run("classify", tiny_folder, [a, c, "--classes", str(classes)], tmp_path)
    assert status == 0 and [r["text"] in ("cat", "dog", "rugby ball") for r in recs] == [True, True]
    texts = tmp_path / "articles.txt"
    texts.write_text("the council voted to raise the fuel tax\n\n   \nstocks fell sharply in early trading\n")
    status, recs = _run("summarize", tiny_folder, [str(texts)], tmp_path)
    assert status == 0 and [r["input"] for r in recs] == [f"{texts}:1", f"{texts}:4"]    # blank lines skipped
    assert recs[0]["text"] and recs[1]["text"]


def test_refusals_are_one_line(tiny_folder, image_files, tmp_path, capsys):
    assert main(["classify", "--checkpoint", tiny_folder, image_files[0], *FAST]) == 2
    assert main(["caption", "--checkpoint", str(tmp_path / "missing.pt"), image_files[0], *FAST]) == 2
    assert main(["vqa", "--checkpoint", tiny_folder, image_files[0], "--answers", " , ", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: classify needs --classes (a file or a,b,c)",
                   f"error: {tmp_path / 'missing.pt'}: no such checkpoint file or folder",
                   "error: the answer list is empty or has an empty answer"]


def test_subprocess(tiny_folder, image_files, tmp_path):
    """The module runs as a program: JSONL on stdout, a progress bar on stderr, no traceback for a bad input."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ofa_ds.predict", "caption", "--checkpoint", tiny_folder, *FAST[:-1],
           image_files[0], str(tmp_path / "missing.png"), image_files[2]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["error"] for r in recs] == [None, "no such file", None]
    assert "Traceback" not in p.stderr and "3/3" in p.stderr and "1 of 3 inputs not answered" in p.stderr


@pytest.mark.parametrize("value,expect", [("a, b ,c", ["a", "b", "c"])])
def test_read_list(value, expect, tmp_path):
    from ofa_ds.predict.__main__ import read_list
    assert read_list(value) == expect
    f = tmp_path / "a2l.json"
    f.write_text(json.dumps({"no": 1, "yes": 0}))
    assert read_list(str(f)) == ["yes", "no"]
