"""The Python inference API on OFA-Tiny with the fixture weights: every task, bad inputs, EXIF rotation, lazy
batching, batch-size independence, the checkpoint kinds, and OFA-CN's Chinese prompts."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_ds.predict import Prediction, Predictor
from ofa_ds.predict.inputs import load_image
from tests.predict.conftest import SMALL, picture

FAST = {"beam": 2, "max_len_b": 3}
"""Decoding overrides that keep the generation tasks to a few steps."""


def _ok(rec: Prediction, text=True, box=False):
    assert rec.error is None, rec.error
    assert isinstance(rec.score, float) and math.isfinite(rec.score)
    if text:
        assert isinstance(rec.text, str)
    if box:
        assert len(rec.box) == 4 and all(isinstance(v, float) for v in rec.box)


def test_every_task(predictor, image_files):
    a, b, c = image_files
    caps = predictor.caption([a, b, c], **FAST)
    assert [r.input for r in caps] == [a, b, c]
    for r in caps:
        _ok(r)
        assert r.text.strip()
    r = predictor.vqa(a, "what color is the square", **FAST)
    _ok(r)
    assert isinstance(r, Prediction)
    rs = predictor.vqa([a, b], ["what is it?", "is it red"], answers=["red", "blue", "a red car"])
    for r in rs:
        _ok(r)
        assert r.text in ("red", "blue", "a red car") and r.score <= 0
    r = predictor.vqa(a, "what is it", zero_shot=True, **FAST)
    _ok(r)
    # grounding with bins only: the box maps back into the range the bins cover (max_image_size 512 pixels of the
    # resized image, which is only SMALL wide here)
    r = predictor.ground(a, "the square on the left", restrict_bins=True, beam=2)
    _ok(r, text=False, box=True)
    x0, y0, x1, y1 = r.box
    assert 0 <= min(x0, x1) and max(x0, x1) <= 512 * 120 / SMALL + 1e-6
    assert 0 <= min(y0, y1) and max(y0, y1) <= 512 * 80 / SMALL + 1e-6
    for r in (predictor.entail(b, "a dog", premises="two dogs play"), predictor.entail(b, "a dog")):
        _ok(r)
        assert r.text in ("yes", "no", "maybe")
    rs = predictor.classify([c, np.asarray(picture(40, 30))], ["cat", "dog", "golden retriever"])
    for r in rs:
        _ok(r)
        assert r.text in ("cat", "dog", "golden retriever")
    assert rs[1].input == "<array #1>"
    r = predictor.summarize("the council voted on tuesday to raise the tax on fuel by ten percent", **FAST)
    _ok(r)
    assert r.input == "<text #0>" and r.box is None
    assert r.to_json().startswith('{"input": "<text #0>", "text": ')


def test_candidate_scores_are_the_generator_scores(predictor, image_files):
    """All-candidate VQA returns the best candidate of ofa_ds.generation.score_candidates, with its score."""
    from ofa_ds.generation import score_candidates
    answers = ["red", "blue", "a red car"]
    spec = predictor.spec("vqa", answers=answers)
    smp = spec.prepare({"image": image_files[0], "question": "what is it?"}, 0)
    batch = spec.builder.collate([smp])
    with torch.no_grad():
        enc = predictor.model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
        s = score_candidates(predictor.model, enc, [list(batch["decoder_prompt"][0])], spec.cands, trie=spec.trie)[0]
    r = predictor.vqa(image_files[0], "what is it?", answers=answers)
    assert r.text == answers[int(s.argmax())] and r.score == pytest.approx(float(s.max()), abs=1e-5)


def test_bad_inputs_are_records(predictor, image_files, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    inputs = [image_files[0], str(tmp_path / "missing.png"), str(junk), np.zeros((0, 5, 3), np.uint8),
              np.zeros((4, 4, 3), np.int64), str(tmp_path), 42, image_files[1]]
    rs = predictor.caption(inputs, **FAST)
    assert len(rs) == len(inputs)
    why = [r.error for r in rs]
    assert why[0] is None and why[-1] is None and rs[-1].text
    assert why[1] == "no such file"
    assert why[2].startswith("undecodable image")
    assert "zero size" in why[3] and "dtype int64" in why[4] and "folder" in why[5] and "not an image" in why[6]
    assert all("\n" not in w for w in why if w)
    rs = predictor.vqa([image_files[0]] * 3, ["", "?", "what?"], **FAST)
    assert rs[0].error == "empty question" and rs[1].error.startswith("no words in the question")
    assert rs[2].error is None
    assert predictor.ground(image_files[0], "", beam=2).error == "empty text"


def test_exif_rotation(predictor, tmp_path):
    """A file stored rotated with an EXIF orientation tag is read upright, and grounding's resize ratios (hence
    its boxes) refer to the upright image."""
    upright = picture(60, 30, 4)                         # wide
    stored = upright.transpose(Image.ROTATE_90)          # tall pixels; orientation 6 turns them back
    exif = Image.Exif()
    exif[0x0112] = 6
    png, path = str(tmp_path / "rotated.png"), str(tmp_path / "rotated.jpg")
    stored.save(png, exif=exif.tobytes())
    stored.save(path, quality=95, exif=exif.tobytes())
    assert np.array_equal(np.asarray(load_image(png)), np.asarray(upright))
    assert np.array_equal(np.asarray(load_image(png, exif=False)), np.asarray(stored))
    assert load_image(path).size == (60, 30) and load_image(path, exif=False).size == (30, 60)
    with Image.open(png) as pil:                         # a PIL image carrying the tag is turned upright too
        assert np.array_equal(np.asarray(load_image(pil)), np.asarray(upright))
    spec = predictor.spec("grounding")
    smp = spec.prepare({"image": path, "text": "a thing"}, 0)
    assert smp.extras["w_resize_ratios"] == pytest.approx(SMALL / 60)
    assert smp.extras["h_resize_ratios"] == pytest.approx(SMALL / 30)


@pytest.mark.parametrize("size,box", [((640, 427), (100.3, 50.7, 400.2, 300.9)),
                                      ((300, 900), (0.0, 12.5, 299.0, 899.0)),
                                      ((512, 512), (17.0, 480.0, 18.0, 511.0))])
def test_box_survives_resize_and_back(size, box):
    """Original-pixel box -> the grounding transform (resize to 512 x 512) and its 4 bins -> the predictor's box
    mapping: back within one bin (512 / 999 pixels of the resized image, divided by the resize ratio)."""
    from ofa_ds.predict.tasks import Grounding
    from ofa_ds.tokenizer import get_tokenizer
    spec = Grounding(get_tokenizer())
    img = picture(*size)
    smp = spec.builder.make(("0", img, "x", np.asarray([box], np.float64)), 0, spec.rng)
    bins = smp.target[:4]
    assert all(spec.tok.is_bin(t) for t in bins)
    batch = spec.builder.collate([smp])
    back = spec.boxes([[{"tokens": torch.tensor(smp.target)}]], batch)[0]
    rw, rh = 512 / size[0], 512 / size[1]
    one_bin = 512 / 999
    for v, b, r in zip(back, box, (rw, rh, rw, rh)):
        assert abs(v - b) <= one_bin / r / 2 + 1e-9


def test_batch_1_equals_batch_16(predictor):
    """Same texts and boxes, and scores to float tolerance, whether inputs are decoded 1 or 16 at a time (17
    images of different sizes: one full batch of 16 and a batch of 1). Caption: OFA's beam 5 with trigram
    blocking, fewer steps."""
    imgs = [picture(30 + 7 * i, 90 - 3 * i, i) for i in range(17)]
    one = list(predictor.predict("caption", ({"image": x} for x in imgs), batch_size=1, max_len_b=8))
    many = list(predictor.predict("caption", ({"image": x} for x in imgs), batch_size=16, max_len_b=8))
    assert [r.text for r in one] == [r.text for r in many]
    assert [r.score for r in one] == pytest.approx([r.score for r in many], abs=1e-4)
    one = list(predictor.predict("grounding", ({"image": x, "text": "the left square"} for x in imgs[:6]),
                                 batch_size=1, beam=2))
    many = list(predictor.predict("grounding", ({"image": x, "text": "the left square"} for x in imgs[:6]),
                                  batch_size=16, beam=2))
    assert [r.box for r in one] == [r.box for r in many]


def test_inputs_are_read_one_batch_at_a_time(predictor):
    """The first records come out after one batch of inputs was read, not after all of them."""
    read = []

    def requests():
        for i in range(40):
            read.append(i)
            yield {"image": picture(20, 20, i)}

    it = predictor.predict("caption", requests(), batch_size=4, beam=1, max_len_b=1)
    first = next(it)
    assert first.error is None and len(read) == 4
    rest = list(it)
    assert len(rest) == 39 and len(read) == 40


def test_checkpoint_kinds_give_the_same_answers(predictor, tiny_folder, tiny_model, tmp_path, image_files):
    """An exported folder and a run's .pt (state dict + config.json next to it) answer like the official .pt."""
    import json
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"module": tiny_model.state_dict()}, run / "step_10.pt")
    (run / "config.json").write_text(json.dumps({"model": tiny_model.cfg.to_dict()}))
    ref = predictor.caption(image_files[0], **FAST)
    for path in (tiny_folder, str(run / "step_10.pt")):
        r = Predictor(path, image_size=SMALL, device="cpu").caption(image_files[0], **FAST)
        assert (r.text, r.score) == (ref.text, pytest.approx(ref.score, abs=1e-6))


def test_ofa_cn_uses_chinese_prompts(image_files):
    """A model with the 30325-entry BERT-Chinese table gets OFA-CN's prompts and decodes with that vocabulary."""
    from ofa_ds.config import preset
    from ofa_ds.model import OFAModel
    from ofa_ds.tokenizer import get_tokenizer
    zh = get_tokenizer("zh")
    p = Predictor(OFAModel(preset("debug", vocab_size=len(zh))).eval(), image_size=SMALL, device="cpu")
    assert p.lang == "zh" and p.tok is zh
    smp = p.spec("caption").prepare({"image": image_files[0]}, 0)
    assert smp.source == [zh.bos] + zh.encode("图片描述了什么内容?") + [zh.eos]
    smp = p.spec("grounding").prepare({"image": image_files[0], "text": "左边的狗"}, 0)
    assert smp.source == [zh.bos] + zh.encode('这段文字" 左边的狗 "描述的是哪个区域？') + [zh.eos]
    smp = p.spec("summarize").prepare({"text": "今天 天气 很好"}, 0)
    assert smp.source == [zh.bos] + zh.encode("今天 天气 很好 请用一个句子简单总结上文：") + [zh.eos]
    assert p.spec("caption").gen.beam == 8                      # OFA-CN caption decoding (caption_cn)
    r = p.caption(image_files[0], max_len_b=3)
    assert r.error is None and isinstance(r.text, str)
    with pytest.raises(ValueError, match="OFA-CN checkpoints have no entailment prompt"):
        p.spec("entailment")
