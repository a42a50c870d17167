"""VQA v2 importer on tiny files in the official layout: confidences from the ten human answers (0.3 / 0.6 / 0.9 /
1.0), OFA's answer list, the minival split, one training row per answer, skip reasons, determinism, --max-side,
the CLI, and outputs that validate and load."""
import io
import json
import pickle

import pytest
from PIL import Image

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import validate
from ofa_ds.data.images import decode_base64_image
from ofa_ds.data.importers.vqa import answer_confidences, iter_vqa, minival_ids, read_questions
from ofa_ds.data.tsv import TSVFile
from ofa_ds.metrics.simple import vqa_soft_score


def _ann(qid, iid, answers, mc):
    return {"question_id": qid, "image_id": iid, "question_type": "what", "answer_type": "other",
            "multiple_choice_answer": mc,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def _q(qid, iid, text):
    return {"image_id": iid, "question": text, "question_id": qid}


@pytest.fixture
def vqa(tmp_path):
    """Official-layout files: 2 train images (3 annotated questions + 1 without annotation on image 9, 2 on image
    25), 3 val images (73 named by its id only, 99 missing), 1 test image."""
    img = tmp_path / "coco"
    for sub, iid, size in [("train2014", 9, (64, 48)), ("train2014", 25, (40, 30)), ("val2014", 42, (80, 60)),
                           ("test2015", 1, (30, 30))]:
        (img / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 30, 30)).save(img / sub / f"COCO_{sub}_{iid:012d}.jpg", quality=90)
    Image.new("RGB", (50, 50), (30, 200, 30)).save(img / "val2014" / "000000000073.jpg")
    red = ["red", "red", "Red", "red.", "pink", "pink", "pink", "two", "2", "the box"]   # 4 / 3 / 2 / 1 humans
    files = {
        "v2_OpenEnded_mscoco_train2014_questions.json": {"data_subtype": "train2014", "questions": [
            _q(91, 9, "What color is the box?"), _q(93, 9, "Is it a box?"), _q(94, 9, "Unanswered?"),
            _q(251, 25, "How many boxes?"), _q(252, 25, "What animal\tis it?")]},
        "v2_mscoco_train2014_annotations.json": {"data_subtype": "train2014", "annotations": [
            _ann(91, 9, red, "red"), _ann(93, 9, ["red", "red"] + ["yes"] * 8, "yes"),
            _ann(251, 25, ["1"] * 6 + ["one"] * 2 + ["2"] * 2, "1"), _ann(252, 25, ["zebra"] * 10, "zebra")]},
        "v2_OpenEnded_mscoco_val2014_questions.json": {"data_subtype": "val2014", "questions": [
            _q(421, 42, "Is it red?"), _q(422, 42, "Which color?"), _q(731, 73, "Is it green?"),
            _q(991, 99, "Is it lost?")]},
        "v2_mscoco_val2014_annotations.json": {"data_subtype": "val2014", "annotations": [
            _ann(421, 42, ["yes"] * 7 + ["red"] * 3, "yes"), _ann(422, 42, ["red"] * 10, "red"),
            _ann(731, 73, ["yes"] * 10, "yes"), _ann(991, 99, ["yes"] * 10, "yes")]},
        "v2_OpenEnded_mscoco_test2015_questions.json": {"data_subtype": "test2015", "questions": [
            _q(12, 1, "Is it blue?"), _q(11, 1, "What is it?")]},
    }
    paths = {}
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
        paths[name.split("_")[-2] if "questions" in name else name.split("_")[2] + "_ann"] = str(tmp_path / name)
    paths["images"] = str(img)
    return paths


def _args(p, out, *extra):
    return ["import", "vqa_v2", "--out", str(out), "--images", p["images"],
            "--train-questions", p["train2014"], "--train-annotations", p["train2014_ann"],
            "--val-questions", p["val2014"], "--val-annotations", p["val2014_ann"], *extra]


def _cols(path):
    f = TSVFile(str(path))
    return [f.row(i) for i in range(len(f))]


def test_confidences_are_the_vqa_accuracy_of_each_answer(vqa):
    assert answer_confidences(["cow"] * 2 + ["dog"] * 3 + ["pig"] + ["cat"] * 4) == \
        (("cat", 1.0), ("dog", 0.9), ("cow", 0.6), ("pig", 0.3))
    assert answer_confidences(["yes"] * 10) == (("yes", 1.0),)
    humans = ["Yes", "yes", "no", "no.", "No", "2", "two", "a dog", "dog", "cat"]
    assert answer_confidences(humans) == tuple(sorted(((a, round(vqa_soft_score(a, humans), 4))
                                                       for a in ("yes", "no", "2", "dog", "cat")),
                                                      key=lambda ac: (-ac[1], ac[0])))      # the metric's rule
    recs = list(iter_vqa(vqa["train2014"], vqa["train2014_ann"]))
    assert [r["question_id"] for r in recs] == [91, 93, 251, 252]          # (image, question) order; 94 skipped
    r91 = recs[0]
    assert r91["image_id"] == 9 and r91["question"] == "what color is the box?"
    # "Red" and "red." normalise to red (4 humans), "two" to 2 (2 humans), "the box" to box (1 human)
    assert list(r91["answers"].items()) == [("red", 1.0), ("pink", 0.9), ("2", 0.6), ("box", 0.3)]
    assert recs[2]["answers"] == {"1": 1.0, "2": 0.6} and recs[3]["question"] == "what animal is it?"
    assert [r["answers"] for r in iter_vqa(vqa["test2015"])] == [{}, {}]


def test_import_rows_splits_skips_and_loading(vqa, tmp_path, capsys, tok):
    ids = tmp_path / "minival.txt"
    ids.write_text("# minival images\n42\n")
    out = tmp_path / "out"
    assert main(_args(vqa, out, "--test-questions", vqa["test2015"], "--min-answer-count", "2",
                      "--minival-ids", str(ids), "--minival-id-kind", "image")) == 0
    err = capsys.readouterr().err
    assert ("rows written: 8 (vqa_test.tsv 2, vqa_train.tsv 4, vqa_val.tsv 2); skipped: 4 (image missing 1, "
            "no annotation for the question 1, no answer in the answer list 2)") in err
    # yes: mc answer of 93, 421, 731, 991; red: 91, 422; 1 and zebra once each (< 2)
    assert json.loads((out / "trainval_ans2label.json").read_text()) == {"yes": 0, "red": 1}
    train = _cols(out / "vqa_train.tsv")
    assert [r[:5] for r in train] == [
        ["91", "9", "what color is the box?", "1.0|!+red", ""],                # pink/2/box are not candidates
        ["93", "9", "is it a box?", "1.0|!+yes", ""], ["93", "9", "is it a box?", "0.6|!+red", ""],  # a row each
        ["731", "73", "is it green?", "1.0|!+yes", ""]]                        # found by its 12-digit id
    assert decode_base64_image(train[0][5]).size == (64, 48)
    assert decode_base64_image(train[3][5]).getpixel((0, 0))[1] > 150
    val = _cols(out / "vqa_val.tsv")
    assert [r[:4] for r in val] == [["421", "42", "is it red?", "1.0|!+yes&&0.9|!+red"],
                                    ["422", "42", "which color?", "1.0|!+red"]]
    assert [r[:4] for r in _cols(out / "vqa_test.tsv")] == [["11", "1", "what is it?", "1.0|!+yes"],
                                                             ["12", "1", "is it blue?", "1.0|!+yes"]]
    for name in ("vqa_train.tsv", "vqa_val.tsv", "vqa_test.tsv"):
        assert validate("vqa", str(out / name), stream=io.StringIO())[1] == 0, name
    assert main(["validate", "--task", "vqa", str(out / "vqa_train.tsv")]) == 0
    cfg = DataConfig(task="vqa", data=f"{out / 'vqa_train.tsv'},{out / 'vqa_val.tsv'}", batch_size=2,
                     patch_image_size=32, ans2label_file=str(out / "trainval_ans2label.json"), add_object=True)
    batches = list(DataStream(cfg, tokenizer=tok))
    assert sum(len(b["id"]) for b in batches) == 4 and batches[0]["patch_images"].shape[1:] == (3, 32, 32)
    assert sorted(round(float(c), 4) for b in batches for c in b["conf"]) == [0.6, 1.0, 1.0, 1.0]
    vb = next(iter(DataStream(cfg, "valid", tokenizer=tok)))
    assert tok.decode([t for t in vb["target"][0].tolist() if t not in (tok.pad, tok.eos)]).strip() == "yes"
    # same input -> same bytes
    again = tmp_path / "again"
    assert main(_args(vqa, again, "--test-questions", vqa["test2015"], "--min-answer-count", "2",
                      "--minival-ids", str(ids), "--minival-id-kind", "image")) == 0
    for name in ("vqa_train.tsv", "vqa_val.tsv", "vqa_test.tsv", "trainval_ans2label.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_given_answer_list_joined_rows_max_side_and_hashed_minival(vqa, tmp_path, capsys):
    ans = tmp_path / "trainval_ans2label.pkl"                                 # OFA's format: a pickled dict
    ans.write_bytes(pickle.dumps({"yes": 0, "red": 1, "pink": 2, "2": 3, "1": 4}, protocol=2))
    out = tmp_path / "o"
    assert main(_args(vqa, out, "--answers", str(ans), "--train-rows", "joined", "--max-side", "20",
                      "--minival-size", "1")) == 0
    assert json.loads((out / "trainval_ans2label.json").read_text()) == {"yes": 0, "red": 1, "pink": 2, "2": 3,
                                                                          "1": 4}
    train = {r[0]: r for r in _cols(out / "vqa_train.tsv")}
    assert train["91"][3] == "1.0|!+red&&0.9|!+pink&&0.6|!+2" and train["251"][3] == "1.0|!+1&&0.6|!+2"
    assert decode_base64_image(train["91"][5]).size == (20, 15)
    val = _cols(out / "vqa_val.tsv")
    assert len({r[1] for r in val}) == 1 and not {r[0] for r in val} & set(train)   # one image, held out
    val_qs = read_questions(vqa["val2014"], vqa["val2014_ann"])
    one, two = minival_ids(val_qs, None, "question", 1), minival_ids(val_qs, None, "question", 2)
    assert one < two and {int(r[0]) for r in val} == one                     # a larger minival extends a smaller
    ids = tmp_path / "q.txt"
    ids.write_text("421\n731\n5\n")
    assert minival_ids(val_qs, str(ids), "question", 0) == {421, 731}
    assert "1 of the 3 question ids" in capsys.readouterr().err


def test_cli_errors_are_one_line(vqa, tmp_path, capsys):
    out = str(tmp_path / "e")
    assert main(["import", "vqa_v2", "--out", out, "--images", vqa["images"],
                 "--test-questions", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    bad = tmp_path / "bad_questions.json"
    bad.write_text('{"questions": [')
    assert main(["import", "vqa_v2", "--out", out, "--images", vqa["images"], "--test-questions", str(bad)]) == 2
    assert f"{bad}: not valid JSON" in capsys.readouterr().err
    bad.write_text('{"annotations": []}')
    assert main(["import", "vqa_v2", "--out", out, "--images", vqa["images"], "--test-questions", str(bad)]) == 2
    assert "expected a JSON object with a 'questions' list" in capsys.readouterr().err
    swapped = ["import", "vqa_v2", "--out", out, "--images", vqa["images"],
               "--train-questions", vqa["train2014"], "--train-annotations", vqa["val2014_ann"]]
    assert main(swapped) == 2
    assert "no annotation matches a question" in capsys.readouterr().err.splitlines()[-1]
    assert main(["import", "vqa_v2", "--out", out, "--images", str(tmp_path / "noimg"),
                 "--test-questions", vqa["test2015"]]) == 2
    assert "images folder not found" in capsys.readouterr().err
    assert not (tmp_path / "e" / "vqa_test.tsv").exists()
