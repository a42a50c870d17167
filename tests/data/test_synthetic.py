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


def test_generator_options(tmp_path):
    """object_size bounds the drawn shapes; vqa_types decides the VQA files' and the pretraining file's questions;
    unknown question types, no types and more than 4 objects are refused."""
    rng = np.random.default_rng([5, 1])
    for _ in range(20):
        _, objs = draw_scene(rng, 256, object_size=(0.3, 0.44))
        assert all(int(0.3 * 256) <= o.box[2] - o.box[0] - 1 < 0.44 * 256 for o in objs)
    with pytest.raises(ValueError, match="object_size"):
        draw_scene(rng, 256, object_size=(0.3, 0.6))
    out = str(tmp_path / "colour")
    generate(out, size="tiny", image_size=64, vqa_types=("color",))
    for f, col in (("vqa/vqa_train.tsv", 2), ("pretrain/vision_language_examples.tsv", 3)):
        with open(os.path.join(out, f)) as fh:
            qs = [c[col] for c in (line.rstrip("\n").split("\t") for line in fh) if c[col]]
        assert qs and all(q.startswith("what color is the ") for q in qs), f
    for bad in (dict(vqa_types=("color_at",)), dict(vqa_types=()), dict(max_objects=5)):
        with pytest.raises(ValueError, match="vqa_types"):
            generate(str(tmp_path / "bad"), size="tiny", **bad)


def test_cli_writes_the_default_run_world(tmp_path):
    from ofa_ds.data.__main__ import main
    from ofa_ds.data.synthetic import world_differences
    out = str(tmp_path / "cli")
    assert main(["synthetic", "--out", out, "--size", "tiny", "--image-size", "64", "--max-objects", "1",
                 "--object-size", "0.34,0.44", "--vqa-types", "color,shape,position"]) == 0
    assert world_differences(json.load(open(os.path.join(out, "manifest.json")))) == {}


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
