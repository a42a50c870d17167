"""Pretraining importers on tiny sources in their public formats (a COCO instances.json, a Karpathy split file, a
COCO captions file, a JSONL of pairs, VQA v2 questions + annotations, a RefCOCO refs pickle, plain text files) with
three small images. Checks the rows, each skip reason, negative_sample/, byte-identical reruns, box scaling with
--max-side, the CLI, and that the outputs pass `validate` and feed the pretraining DataStream."""
import gzip
import io
import json
import os
import pickle

import numpy as np
import pytest

from ofa_ds.data import DataConfig, DataStream
from ofa_ds.data.__main__ import main
from ofa_ds.data.convert import validate
from ofa_ds.data.images import decode_base64_image
from ofa_ds.data.tsv import TSVFile
from tests.data.conftest import make_image, red_bbox

CATS = [{"id": 1, "name": "dog", "supercategory": "animal"}, {"id": 3, "name": "traffic light",
                                                              "supercategory": "outdoor"}]


def _instances(images, anns):
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": CATS}


@pytest.fixture
def src(tmp_path):
    """The sources: images 1 (64x48, red box at 10,8-30,28), 2 (80x40), 3 (missing), one broken file."""
    d = tmp_path / "src"
    img = d / "train2014"
    img.mkdir(parents=True)
    make_image(64, 48, (10, 8, 30, 28)).save(img / "COCO_train2014_000000000001.jpg", quality=95)
    make_image(80, 40, (40, 10, 70, 30), color=(0, 0, 255)).save(img / "COCO_train2014_000000000002.png")
    (img / "COCO_train2014_000000000004.jpg").write_bytes(b"not a jpeg")
    ims = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 64, "height": 48},
           {"id": 2, "file_name": "COCO_train2014_000000000002.png", "width": 80, "height": 40},
           {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 50, "height": 50},
           {"id": 4, "file_name": "COCO_train2014_000000000004.jpg", "width": 50, "height": 50}]
    anns = [
        {"id": 11, "image_id": 1, "bbox": [10, 8, 20, 20], "category_id": 1, "iscrowd": 0, "area": 400},
        {"id": 12, "image_id": 1, "bbox": [0, 30, 64.5, 18], "category_id": 3, "iscrowd": 0, "area": 1},  # clipped
        {"id": 13, "image_id": 2, "bbox": [40, 10, 30, 20], "category_id": 3, "iscrowd": 0, "area": 600},
        {"id": 14, "image_id": 2, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 1, "area": 25},   # crowd
        {"id": 15, "image_id": 2, "bbox": [1, 1, 0, 5], "category_id": 1, "iscrowd": 0, "area": 0},    # degenerate
        {"id": 16, "image_id": 2, "bbox": [1, 1, 5, 5], "category_id": 99, "iscrowd": 0, "area": 25},  # category?
        {"id": 17, "image_id": 3, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 0, "area": 25},   # no image
        {"id": 18, "image_id": 4, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 0, "area": 25},   # broken
    ]
    (d / "instances.json").write_text(json.dumps(_instances(ims, anns)))
    # Karpathy split file (dataset_coco.json)
    sent = lambda sid, raw: {"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": sid}  # noqa: E731
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "COCO_train2014_000000000001.jpg", "imgid": 0, "split": "train",
         "cocoid": 1, "sentids": [1, 2], "sentences": [sent(1, "A dog near a traffic-light."),
                                                       sent(2, "Two dogs playing.")]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000002.png", "imgid": 1, "split": "val",
         "cocoid": 2, "sentids": [3], "sentences": [sent(3, "A blue box.")]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000003.jpg", "imgid": 2, "split": "restval",
         "cocoid": 3, "sentids": [4], "sentences": [sent(4, "Nothing here.")]},
    ]}
    (d / "dataset_coco.json").write_text(json.dumps(karpathy))
    caps = {"info": {}, "licenses": [], "images": ims[:2],
            "annotations": [{"id": 7, "image_id": 2, "caption": "A blue box on white."},
                            {"id": 8, "image_id": 2, "caption": "A dog, seen from afar"}]}
    (d / "captions_train2014.json").write_text(json.dumps(caps))
    pairs = [{"image": "train2014/COCO_train2014_000000000001.jpg", "caption": "a red square",
              "gt_objects": ["square", "circle"]},
             {"image": "train2014/COCO_train2014_000000000002.png", "caption": ["blue box", "a dog"],
              "dataset_name": "cc12m"},
             {"image": "train2014/nope.jpg", "caption": "gone"},
             {"caption": "no image"}]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n\n{broken\n")
    # VQA v2
    q = lambda qid, iid, text: {"image_id": iid, "question": text, "question_id": qid}  # noqa: E731
    (d / "questions.json").write_text(json.dumps({
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "train2014",
        "questions": [q(10, 1, "What color is the box?"), q(11, 1, "Is there a dog?"), q(20, 2, "How many boxes?"),
                      q(30, 3, "Where is it?")]}))
    human = lambda answers: [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}  # noqa: E731
                             for i, a in enumerate(answers)]
    ann = lambda qid, iid, mc, ans, at: {"question_id": qid, "image_id": iid, "multiple_choice_answer": mc,  # noqa
                                         "answers": human(ans), "answer_type": at, "question_type": "what"}
    (d / "annotations.json").write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "train2014",
                                                    "annotations": [
        ann(10, 1, "red", ["red"] * 7 + ["pink"] * 2 + ["maroon"], "other"),
        ann(11, 1, "yes", ["yes"] * 10, "yes/no"),
        ann(20, 2, "1", ["1"] * 8 + ["2"] * 2, "number"),
        ann(30, 3, "left", ["left"] * 10, "other")]}))
    # RefCOCO: refs(unc).p (plain containers) + its instances.json
    ref = lambda rid, aid, iid, split, *s: {  # noqa: E731
        "ref_id": rid, "ann_id": aid, "image_id": iid, "split": split, "category_id": 1, "sent_ids": [],
        "file_name": f"COCO_train2014_{iid:012d}_{aid}.jpg",
        "sentences": [{"sent": x, "raw": x, "tokens": x.split(), "sent_id": rid * 10 + k} for k, x in enumerate(s)]}
    rdir = d / "refcoco+"
    rdir.mkdir()
    (rdir / "refs(unc).p").write_bytes(pickle.dumps([
        ref(5, 11, 1, "train", "red dog on the left", "the square"), ref(6, 13, 2, "testA", "blue thing"),
        ref(7, 17, 3, "train", "missing image")], protocol=2))
    (rdir / "instances.json").write_text(json.dumps(_instances(ims, anns)))
    # plain text
    (d / "text").mkdir()
    (d / "text" / "a.txt").write_bytes(b"First document.\n\nSecond\tdocument, line one\nline two\n"
                                       b"bad \xff byte\n")
    (d / "text" / "b.txt").write_text("Last one.")
    return d


def run(fmt, out, *args):
    return main(["import", fmt, "--out", str(out), *map(str, args)])


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def vl_args(d):
    return ["--karpathy", d / "dataset_coco.json", "--karpathy-images", d,
            "--coco-captions", d / "captions_train2014.json", "--coco-images", d / "train2014",
            "--pairs", d / "pairs.jsonl", "--pairs-images", d,
            "--vqa-questions", d / "questions.json", "--vqa-annotations", d / "annotations.json",
            "--vqa-images", d / "train2014",
            "--refs", d / "refcoco+" / "refs(unc).p", "--ref-instances", d / "refcoco+" / "instances.json",
            "--ref-images", d / "train2014"]


def test_detection_rows_skips_and_max_side(src, tmp_path, capsys):
    out = tmp_path / "det"
    assert run("pretrain_detection", out, "--instances", src / "instances.json", "--images", src / "train2014") == 0
    err = capsys.readouterr().err
    r = rows(out / "detection_examples.tsv")
    assert [x[0] for x in r] == ["1", "2"]
    assert r[0][2] == "10.00,8.00,30.00,28.00,1,dog&&0.00,30.00,64.00,48.00,3,traffic light"
    assert r[1][2] == "40.00,10.00,70.00,30.00,3,traffic light"
    assert red_bbox(np.asarray(decode_base64_image(r[0][1]))) == (10, 8, 30, 28)
    summary = err.strip().splitlines()[-1]
    assert summary == ("rows written: 2 (detection_examples.tsv 2); skipped: 5 (crowd box 1, degenerate box 1, "
                       "image missing 1, image unreadable 1, unknown category 1)")
    small = tmp_path / "small"
    assert run("pretrain_detection", small, "--instances", src / "instances.json", "--images", src / "train2014",
               "--max-side", 32) == 0
    r = rows(small / "detection_examples.tsv")
    assert decode_base64_image(r[0][1]).size == (32, 24)
    assert r[0][2].split("&&")[0] == "5.00,4.00,15.00,14.00,1,dog"


def test_text_documents_by_line_and_paragraph(src, tmp_path, capsys):
    out = tmp_path / "t"
    assert run("pretrain_text", out, "--text", src / "text") == 0
    assert "skipped (not UTF-8: a.txt:5)" in capsys.readouterr().err
    assert rows(out / "text_examples.tsv") == [["0", "First document."], ["1", "Second document, line one"],
                                               ["2", "line two"], ["3", "Last one."]]
    para = tmp_path / "p"
    assert run("pretrain_text", para, "--text", src / "text" / "a.txt", src / "text" / "b.txt",
               "--unit", "paragraph") == 0
    assert "skipped (not UTF-8: a.txt:3)" in capsys.readouterr().err
    assert rows(para / "text_examples.tsv") == [["0", "First document."], ["1", "Last one."]]
    assert run("pretrain_text", tmp_path / "x", "--text", src / "none.txt") == 2
    assert "none.txt" in capsys.readouterr().err and not (tmp_path / "x" / "text_examples.tsv").exists()
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("\ufeffzipped one\r\nzipped\u2028two\n".encode()))
    assert run("pretrain_text", tmp_path / "z", "--text", tmp_path / "c.txt.gz") == 0
    assert rows(tmp_path / "z" / "text_examples.tsv") == [["0", "zipped one"], ["1", "zipped two"]]
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"x\n" * 100)[:-12])
    assert run("pretrain_text", tmp_path / "y", "--text", tmp_path / "d.txt.gz") == 2
    assert "d.txt.gz: not a readable gzip file" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "y")


def test_vision_language_rows_and_negative_sample(src, tmp_path, capsys):
    out = tmp_path / "vl"
    assert run("pretrain_vl", out, *vl_args(src)) == 0
    err = capsys.readouterr().err
    r = rows(out / "vision_language_examples.tsv")
    assert all(len(x) == 8 for x in r)
    got = [(x[0], x[2], x[3], x[4], x[5], x[6], x[7]) for x in r]
    assert got == [
        # Karpathy train image 1 (the val image 2 stays out; restval image 3 has no file)
        ("cap1_0", "a dog near a traffic-light.", "", "", "dog&&traffic light", "coco", "caption"),
        ("cap1_1", "two dogs playing.", "", "", "dog", "coco", "caption"),
        ("cap2_0", "a blue box on white.", "", "", "", "coco", "caption"),
        ("cap2_1", "a dog, seen from afar", "", "", "dog", "coco", "caption"),
        ("pair1_0", "a red square", "", "", "square", "custom", "caption"),
        ("pair2_0", "blue box", "", "", "", "cc12m", "caption"),
        ("pair2_1", "a dog", "", "", "dog", "cc12m", "caption"),       # vocabulary match
        ("qa10", "", "what color is the box?", "1.0|!+red&&0.6|!+pink&&0.3|!+maroon", "", "vqa", "qa"),
        ("qa11", "", "is there a dog?", "1.0|!+yes", "dog", "vqa", "qa"),
        ("qa20", "", "how many boxes?", "1.0|!+1&&0.6|!+2", "", "vqa", "qa"),
        ("ref5_0", "red dog on the left", "", "10.00,8.00,30.00,28.00", "dog", "refcoco+", "visual_grounding"),
        ("ref5_1", "the square", "", "10.00,8.00,30.00,28.00", "", "refcoco+", "visual_grounding"),
    ]
    assert r[0][1] == r[-1][1] and r[0][1] != r[3][1]
    neg = out / "negative_sample"
    assert (neg / "all_captions.txt").read_text().splitlines() == sorted(
        {"a dog near a traffic-light.", "two dogs playing.", "a blue box on white.", "a dog, seen from afar",
         "a red square", "blue box", "a dog"})
    assert (neg / "object.txt").read_text().splitlines() == ["dog", "square", "traffic light"]
    assert json.loads((neg / "type2ans.json").read_text()) == {"how many": ["1"], "yes/no": ["yes"],
                                                                "other": ["1", "red", "yes"]}
    skips = err.strip().splitlines()[-1]
    assert skips.startswith("rows written: 12 (vision_language_examples.tsv 12); skipped: ")
    for reason in ("image missing 4", "malformed record 2"):
        assert reason in skips, skips


def test_reruns_are_byte_identical_and_max_side_scales_boxes(src, tmp_path):
    a, b, small = tmp_path / "a", tmp_path / "b", tmp_path / "s"
    for out in (a, b):
        assert run("pretrain_vl", out, *vl_args(src)) == 0
        assert run("pretrain_detection", out, "--instances", src / "instances.json", "--images",
                   src / "train2014") == 0
        assert run("pretrain_text", out, "--text", src / "text") == 0
    for name in ("vision_language_examples.tsv", "detection_examples.tsv", "text_examples.tsv",
                 "negative_sample/all_captions.txt", "negative_sample/object.txt", "negative_sample/type2ans.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not [p for p in os.listdir(a) if p.endswith(".part")]
    assert run("pretrain_vl", small, *vl_args(src), "--max-side", 32) == 0
    g = [x for x in rows(small / "vision_language_examples.tsv") if x[7] == "visual_grounding"]
    assert g[0][4] == "5.00,4.00,15.00,14.00" and decode_base64_image(g[0][1]).size == (32, 24)


def test_vl_options_and_cli_errors(src, tmp_path, capsys):
    assert run("pretrain_vl", tmp_path / "o") == 2
    assert "needs at least one source" in capsys.readouterr().err
    assert run("pretrain_vl", tmp_path / "o", "--vqa-questions", src / "questions.json") == 2
    assert "--vqa-questions needs --vqa-annotations" in capsys.readouterr().err
    (src / "bad.json").write_text("{not json")
    assert run("pretrain_vl", tmp_path / "o", "--coco-captions", src / "bad.json", "--coco-images", src) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "vision_language_examples.tsv").exists()
    out = tmp_path / "pairs"
    assert run("pretrain_vl", out, "--pairs", src / "pairs.jsonl", "--pairs-images", src, "--pairs-name", "sbu",
               "--instances", src / "instances.json") == 0
    r = rows(out / "vision_language_examples.tsv")
    assert [(x[5], x[6]) for x in r] == [("square", "sbu"), ("", "cc12m"), ("dog", "cc12m")]
    assert (out / "negative_sample" / "object.txt").read_text().splitlines() == ["dog", "square", "traffic light"]
    assert json.loads((out / "negative_sample" / "type2ans.json").read_text()) == {"other": []}


def test_outputs_validate_and_feed_the_pretraining_loader(src, tmp_path, tok):
    out = tmp_path / "pre"
    assert run("pretrain_vl", out, *vl_args(src)) == 0
    assert run("pretrain_detection", out, "--instances", src / "instances.json", "--images", src / "train2014") == 0
    assert run("pretrain_text", out, "--text", src / "text") == 0
    for task, name, n in (("pretrain_vl", "vision_language_examples.tsv", 12),
                          ("pretrain_detection", "detection_examples.tsv", 2),
                          ("pretrain_text", "text_examples.tsv", 4)):
        assert validate(task, str(out / name), stream=io.StringIO()) == (n, 0), name
        assert main(["validate", "--task", task, str(out / name)]) == 0
    cfg = DataConfig(task="pretrain", data=str(out / "vision_language_examples.tsv"),
                     text_data=str(out / "text_examples.tsv"), detection_data=str(out / "detection_examples.tsv"),
                     neg_sample_dir=str(out / "negative_sample"), patch_image_size=48, v2_image_size=32,
                     batch_size=4, shuffle=False)
    stream = DataStream(cfg, tokenizer=tok)
    batches = list(stream)
    assert len(batches) == 3 and stream.counter.bad == 0
    v1, v2 = batches[0]
    assert v1["nsentences"] == 8 and v2["nsentences"] == 3      # 2 text-infilling + 1 detection sample
    task = stream.task
    assert "traffic light" in task.objects and task.type2ans["how many"] == ["1"]
    f = TSVFile(str(out / "vision_language_examples.tsv"))
    for i in range(len(f)):                                        # every row builds, with negatives, many seeds
        for s in range(5):
            task.build(f.row(i), i, np.random.default_rng(s))
