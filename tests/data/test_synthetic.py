"""The built-in synthetic dataset: deterministic, official formats, learnable ground truth, reads back through
every task builder."""
import filecmp
import json
import os

import numpy as np
import pytest

from ofa_ds.data import DataStream
from ofa_ds.data.images import decode_base64_image
from ofa_ds.data.synthetic import COLORS, draw_scene, generate, image_codes, question_of, data_config
from ofa_ds.data.tsv import TSVFile

FILES = ["caption/caption_stage1_train.tsv", "caption/caption_val.tsv", "vqa/vqa_train.tsv", "vqa/vqa_val.tsv",
         "vqa/vqa_answers.json", "refcoco/refcoco_train.tsv", "refcoco/refcoco_val.tsv",
         "snli_ve/snli_ve_train.tsv", "snli_ve/snli_ve_dev.tsv", "pretrain/vision_language_examples.tsv",
         "pretrain/text_examples.tsv", "pretrain/image_examples.tsv", "pretrain/detection_examples.tsv",
         "pretrain/negative_sample/all_captions.txt", "pretrain/negative_sample/object.txt",
         "pretrain/negative_sample/type2ans.json"]


def test_files_and_determinism(synth_dir, tmp_path):
    for f in FILES:
        assert os.path.getsize(os.path.join(synth_dir, f)) > 0, f
    again = str(tmp_path / "again")
    generate(again, seed=3, size="tiny", image_size=96)
    for f in FILES:
        assert filecmp.cmp(os.path.join(synth_dir, f), os.path.join(again, f), shallow=False), f
    other = str(tmp_path / "other")
    generate(other, seed=4, size="tiny", image_size=96)
    assert not filecmp.cmp(os.path.join(synth_dir, FILES[2]), os.path.join(other, FILES[2]), shallow=False)
    cols = {"caption/caption_val.tsv": 5, "vqa/vqa_train.tsv": 6, "refcoco/refcoco_train.tsv": 5,
            "snli_ve/snli_ve_dev.tsv": 6, "pretrain/vision_language_examples.tsv": 8,
            "pretrain/text_examples.tsv": 2, "pretrain/image_examples.tsv": 3, "pretrain/detection_examples.tsv": 3}
    for f, n in cols.items():
        with open(os.path.join(synth_dir, f)) as fh:
            assert all(len(line.rstrip("\n").split("\t")) == n for line in fh), f
    t2a = json.load(open(os.path.join(synth_dir, "pretrain/negative_sample/type2ans.json")))
    assert set(t2a) >= {"color", "shape", "how many", "other"}


@pytest.mark.parametrize("task", ["caption", "vqa", "refcoco", "snli_ve", "pretrain"])
def test_reads_back_through_builders(synth_dir, tok, task):
    for split in ("train", "valid"):
        cfg = data_config(synth_dir, task, batch_size=16, patch_image_size=48, v2_image_size=32, max_image_size=48)
        s = DataStream(cfg, split, tokenizer=tok)
        n = 0
        for b in s:
            b = b[0] if isinstance(b, tuple) else b
            n += len(set(b["id"].tolist()))
            assert b["patch_images"].shape[1:] == (3, 48, 48) and b["patch_masks"].all()
        assert s.counter.bad == 0 and n == len(s.files[0])


def test_refcoco_boxes_and_answers_are_true(synth_dir):
    f = TSVFile(os.path.join(synth_dir, "refcoco/refcoco_train.tsv"))
    for i in range(len(f)):
        _, _, expr, box, image = f.row(i)
        arr = np.asarray(decode_base64_image(image)).astype(int)
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
        centre = arr[(y0 + y1) // 2, (x0 + x1) // 2]
        for name, rgb in COLORS.items():
            if f" {name} " in f" {expr} ":
                assert np.abs(centre - np.array(rgb)).max() < 40, (expr, centre)
    v = TSVFile(os.path.join(synth_dir, "vqa/vqa_train.tsv"))
    for i in range(len(v)):
        _, _, q, ans, kinds, image = v.row(i)
        a = ans.split("|!+")[1]
        if q.startswith("how many"):
            assert a == str(len(kinds.split("&&")))
        if q.startswith("what shape"):
            assert a in kinds.split("&&")


def test_vqa_answers_balanced():
    counts = {}
    for i in range(1500):
        rng = np.random.default_rng([7, i])
        _, objs = draw_scene(rng, 64)
        q, a, _ = question_of(objs, rng)
        counts[a] = counts.get(a, 0) + 1
    assert max(counts.values()) / 1500 <= 0.2 and len(counts) >= 15


def test_image_codes_quantiser():
    from PIL import Image
    codes = image_codes(Image.new("RGB", (256, 256), (255, 128, 16)))
    assert len(codes) == 256 and set(codes) == {(31 << 8) | (8 << 4) | 1}
    assert max(image_codes(Image.new("RGB", (256, 256), (255, 255, 255)))) == 8191


def test_generator_knobs(tmp_path):
    """train_scenes / vl_qa_rows change the row counts; object_size / plain change the drawing; defaults are the
    original scenes draw for draw (the files of `test_files_and_determinism` stay identical)."""
    out = str(tmp_path / "k")
    man = generate(out, seed=3, size="tiny", image_size=96, train_scenes=10, vl_qa_rows=3, object_size=(0.3, 0.44),
                   plain=True)
    assert man["train_scenes"] == 10 and man["rows"]["caption_train"] == 10
    assert man["rows"]["vision_language"] == 10 * (1 + 3 + 1)
    with open(os.path.join(out, "pretrain/vision_language_examples.tsv")) as fh:
        types = [line.rstrip("\n").split("\t")[7] for line in fh]
    assert types.count("qa") == 30 and len({line for line in types}) == 3
    rng = np.random.default_rng([5, 1])
    img, objs = draw_scene(rng, 256, object_size=(0.3, 0.44), plain=True)
    assert all(0.3 * 256 <= o.box[2] - o.box[0] - 1 <= 0.44 * 256 for o in objs)
    arr = np.asarray(img)
    assert tuple(arr[0, 0]) == tuple(arr[-1, -1]) == (225, 225, 225)       # flat grey, no tint or gradient
    with pytest.raises(ValueError, match="object_size"):
        draw_scene(rng, 256, object_size=(0.3, 0.6))
    with pytest.raises(ValueError, match="vl_qa_rows"):
        generate(str(tmp_path / "bad"), size="tiny", vl_qa_rows=-1)


def test_closeup_scenes():
    """closeup=1 draws one large shape whose box, colour and left/right cell are true; 0 < p < 1 mixes them in at
    about that rate; values outside [0, 1] are refused."""
    for i in range(40):
        rng = np.random.default_rng([11, i])
        img, objs = draw_scene(rng, 128, closeup=1.0)
        assert len(objs) == 1
        o = objs[0]
        x0, y0, x1, y1 = o.box
        assert int(0.55 * 128) <= x1 - x0 - 1 <= 0.75 * 128 and 0 <= x0 and x1 <= 128 and 0 <= y0 and y1 <= 128
        arr = np.asarray(img).astype(int)
        assert np.abs(arr[(y0 + y1) // 2, (x0 + x1) // 2] - np.array(COLORS[o.color])).max() < 40
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert o.cell == (int(cy > 64), int(cx > 64)) and abs(cx - 64) >= 0.07 * 128
    n_close = sum(len(objs) == 1 and objs[0].box[2] - objs[0].box[0] > 64
                  for objs in (draw_scene(np.random.default_rng([12, i]), 128, closeup=0.3)[1] for i in range(300)))
    assert 60 <= n_close <= 120
    with pytest.raises(ValueError, match="closeup"):
        draw_scene(np.random.default_rng(0), 128, closeup=1.5)


def test_cli_closeup(tmp_path):
    from ofa_ds.data.__main__ import main
    out = str(tmp_path / "cu")
    assert main(["synthetic", "--out", out, "--size", "tiny", "--image-size", "64", "--closeup", "1"]) == 0
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["closeup"] == 1.0
    with open(os.path.join(out, "caption/caption_stage1_train.tsv")) as fh:
        caps = [line.split("\t")[2] for line in fh]
    assert len(caps) == 24 and all(" and " not in c and "," not in c for c in caps)


def test_cell_questions_name_the_object_in_that_cell(tmp_path):
    """color_at / shape_at: the answer is the colour / kind of the object drawn in the named quadrant (checked on
    the pixels for colour), and vqa_types also decides the pretraining file's qa rows."""
    for i in range(60):
        rng = np.random.default_rng([11, i])
        img, objs = draw_scene(rng, 256)
        q, a, t = question_of(objs, rng, ("color_at", "shape_at"))
        words = q.rstrip("?").split()
        row, col = (0 if words[-2] == "top" else 1), (0 if words[-1] == "left" else 1)
        (o,) = [o for o in objs if o.cell == (row, col)]
        half = 128
        assert row * half <= (o.box[1] + o.box[3]) / 2 < (row + 1) * half
        assert col * half <= (o.box[0] + o.box[2]) / 2 < (col + 1) * half
        if t == "color":
            assert q.startswith("what color is the shape at the") and a == o.color
            cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2 + (o.box[3] - o.box[1]) // 4
            assert tuple(np.asarray(img)[cy, cx]) == COLORS[a]
        else:
            assert t == "shape" and q.startswith("what shape is at the") and a == o.kind
    out = str(tmp_path / "cells")
    generate(out, size="tiny", vqa_types=("color_at", "shape_at"))
    for f, col in (("vqa/vqa_train.tsv", 2), ("pretrain/vision_language_examples.tsv", 3)):
        with open(os.path.join(out, f)) as fh:
            qs = [c[col] for c in (line.rstrip("\n").split("\t") for line in fh) if c[col]]
        assert qs and all(" at the " in q for q in qs), f
    with pytest.raises(ValueError, match="vqa_types"):
        generate(str(tmp_path / "bad"), size="tiny", vqa_types=("colour_at",))


def test_presence_and_scene_questions_are_true():
    """has_color / has_shape (yes about half the time), bg_color (the drawn background's name), first_color /
    first_shape (the object with the leftmost centre)."""
    from ofa_ds.data.synthetic import BACKGROUND_NAMES, BACKGROUNDS
    yes = 0
    for i in range(200):
        rng = np.random.default_rng([13, i])
        img, objs = draw_scene(rng, 128, plain=i % 5 == 0)
        q, a, t = question_of(objs, rng, ("has_color", "has_shape"))
        word = q[len("is there a "):-1].replace(" shape", "")
        assert t == "yes/no" and a == ("yes" if word in {o.color for o in objs} | {o.kind for o in objs} else "no")
        yes += a == "yes"
        bg = img.info["background"]
        q, a, t = question_of(objs, rng, ("bg_color",), background=bg)
        px = np.asarray(img)[64, 0].astype(int)                      # the middle row: no gradient there
        nearest = min(range(len(BACKGROUNDS)), key=lambda k: np.abs(np.array(BACKGROUNDS[k]) - px).sum())
        assert a == bg == BACKGROUND_NAMES[nearest] and (i % 5 or bg == "gray")
        q, a, _ = question_of(objs, rng, ("first_color",))
        left = min(objs, key=lambda o: o.box[0] + o.box[2])
        assert q == "what color is the leftmost shape?" and a == left.color
        assert question_of(objs, rng, ("first_shape",))[1] == left.kind
    assert 0.4 <= yes / 200 <= 0.7


def test_default_run_world(tmp_path):
    """What `deepspeed launch/pretrain.py` generates when its data folder is missing: one big shape per scene and
    no count questions; the default recipe pairs it with the zero-init ResNet and beta2 0.98 it was measured with."""
    from ofa_ds.data.synthetic import DEFAULT_RUN_WORLD, world_differences
    from ofa_ds.recipes import get_recipe
    man = generate(str(tmp_path / "w"), size="tiny", **DEFAULT_RUN_WORLD)
    assert world_differences(man) == {}
    full = generate(str(tmp_path / "full"), size="tiny")
    assert set(world_differences(full)) == {"max_objects", "object_size", "vqa_types"}
    with open(tmp_path / "w" / "vqa" / "vqa_train.tsv") as fh:
        questions = [line.split("\t")[2] for line in fh]
    assert questions and not any(q.startswith("how many") for q in questions)
    with open(tmp_path / "w" / "caption" / "caption_stage1_train.tsv") as fh:
        assert all(" and " not in line.split("\t")[2] for line in fh)      # one object per caption
    rng = np.random.default_rng([2, 1])
    for _ in range(20):
        _, objs = draw_scene(rng, 256, max_objects=1, object_size=DEFAULT_RUN_WORLD["object_size"])
        assert len(objs) == 1 and objs[0].box[2] - objs[0].box[0] - 1 >= int(0.34 * 256)
    run = get_recipe("default")
    assert run.model.resnet_zero_init_residual and run.train.betas == (0.9, 0.98)
