"""Pretraining builder: the three vision-language row types, ITM negatives, v2 extras every 8th row, pairing."""
import json

import numpy as np
import pytest

from ofa_ds.data import DataConfig, DataStream, make_task
from tests.data.conftest import b64, make_image, write_tsv

YES, NO = 4420, 117


@pytest.fixture
def pre_files(tmp_path):
    img = b64(make_image(64, 64, (8, 8, 40, 40)))
    vl = write_tsv(tmp_path / "vl.tsv", [
        ["c1", img, "a red square on white", "", "", "square", "coco", "caption"],
        ["q1", img, "", "what color is it?", "0.9|!+red&&0.1|!+pink", "", "vqa", "qa"],
        ["g1", img, "the red square", "", "8,8,40,40", "square", "refcoco", "visual_grounding"],
        ["c2", img, "a red square", "", "", "square", "cc12m", "caption"],
    ] * 4)
    txt = write_tsv(tmp_path / "text.tsv", [["t1", "The quick brown fox jumps over the lazy dog again and again"]])
    codes = " ".join(str(i) for i in range(256))
    im = write_tsv(tmp_path / "image.tsv", [["i1", img, codes]])
    det = write_tsv(tmp_path / "det.tsv", [["d1", img, "8,8,40,40,1,red square&&50,50,60,60,2,dot"]])
    neg = tmp_path / "neg"
    neg.mkdir()
    (neg / "all_captions.txt").write_text("a green circle\na blue triangle\n")
    (neg / "object.txt").write_text("circle\ntriangle\nsquare\n")
    (neg / "type2ans.json").write_text(json.dumps({"color": ["red", "green", "blue"], "other": ["red", "x"]}))
    return dict(data=vl, text_data=txt, image_data=im, detection_data=det, neg_sample_dir=str(neg))


def cfg(files, **kw):
    args = dict(task="pretrain", patch_image_size=48, v2_image_size=32, batch_size=8, shuffle=False, **files)
    args.update(kw)
    return DataConfig(**args)


def test_vision_language_rows(tok, pre_files):
    t = make_task(cfg(pre_files), "train", tok)
    from ofa_ds.data.tsv import TSVFile
    f = TSVFile(pre_files["data"])
    cap = t.build(f.row(0), 0, np.random.default_rng(0))
    assert len(cap) == 2 and cap[0].source == [0, 99, 473, 5, 2274, 6190, 116, 2]
    assert cap[0].target == tok.encode(" a red square on white") + [2] and cap[0].image.shape == (3, 48, 48)
    assert cap[1].target[0] in (YES, NO) and cap[1].source[:6] == [0] + tok.encode(' does the image describe "')
    itm = [t.build(f.row(0), 0, np.random.default_rng(s))[1] for s in range(30)]
    assert {s.target[0] for s in itm} == {YES, NO}
    for s in itm:
        text = tok.decode(s.source[1:-1])
        assert (s.target[0] == YES) == ("a red square on white" in text)
    qa = t.build(f.row(1), 1, np.random.default_rng(0))
    assert qa[0].source == [0] + tok.encode(" what color is it?") + [2] and qa[0].target == tok.encode(" red") + [2]
    assert qa[0].conf == qa[1].conf == 0.9
    assert tok.decode(qa[1].source[1:-1]).startswith(' what is the answer to question " what color is it? ". is "')
    g = t.build(f.row(2), 2, np.random.default_rng(0))
    bins = g[0].target[:4]
    assert all(58457 <= b < 59457 for b in bins) and g[0].target[4] == 2
    assert g[1].source == [0, 1437, 99, 473, 5, 976, 6190, 116, 976, 35] + bins + [2]
    assert g[1].target == tok.encode(" the red square") + [2]
    box = np.array(tok.ids_to_box(bins, 512))
    arr = ((g[0].image.transpose(1, 2, 0) + 1) * 127.5)
    x0, y0, x1, y1 = box.round().astype(int)
    assert arr[(y0 + y1) // 2, (x0 + x1) // 2, 0] > 180 and (x1 - x0) > 5  # box still on the red square
    cc = t.build(f.row(3), 3, np.random.default_rng(0))
    assert cc[0].target[:2] == [1, 1]
    valid = make_task(cfg(pre_files), "valid", tok)
    assert len(valid.build(f.row(0), 0, np.random.default_rng(0))) == 1


def test_v2_extras_and_pairing(tok, pre_files):
    s = DataStream(cfg(pre_files), tokenizer=tok)
    batches = list(s)
    assert len(batches) == 2 and all(isinstance(b, tuple) for b in batches)
    v1, v2 = batches[0]
    assert v1["patch_images"].shape[1:] == (3, 48, 48) and v2["patch_images"].shape[1:] == (3, 32, 32)
    assert v2["nsentences"] == 4 and v2["conf"].tolist() == [2.0] * 4
    assert v2["code_masks"].tolist() == [False, False, True, False]
    assert v2["patch_masks"].tolist() == [False, False, True, True]
    text = v2["src_tokens"][0].tolist()
    assert text[:8] == [0, 99, 16, 5, 1498, 2788, 9, 22] and tok.mask in text
    assert tok.decode([t for t in v2["target"][0].tolist() if t != 1]).strip() == \
        "the quick brown fox jumps over the lazy dog again and again"
    img = v2["patch_images"][2]
    assert (img[:, 8:24, 8:24] == 0).all() and (img[:, :8] != 0).any()
    assert v2["target"][2, :256].tolist() == [50265 + i for i in range(256)]
    det = [t for t in v2["target"][3].tolist() if t not in (1, 2)]
    assert all(58457 <= t for t in det[:4]) and tok.decode(det[4:]).strip().startswith("red square")
    assert v1["nsentences"] == 16  # 8 rows, each an example + its ITM/grounded-captioning companion
    one = DataStream(cfg(pre_files, batch_size=4, text_data=""), tokenizer=tok)
    kinds = [isinstance(b, tuple) for b in one]
    assert kinds == [True, False, True, False]  # extras on rows 0 and 8 only


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.distributed)])   # 2 loader processes
def test_pretrain_resume_identical(tok, pre_files, workers):
    c = cfg(pre_files, batch_size=3, shuffle=True, num_workers=workers)
    ref = [b[0]["src_tokens"].tolist() if isinstance(b, tuple) else b["src_tokens"].tolist()
           for b in DataStream(c, tokenizer=tok)]
    s = DataStream(c, tokenizer=tok)
    s.load_state_dict({"epoch": 1, "batch": 2})
    rest = [b[0]["src_tokens"].tolist() if isinstance(b, tuple) else b["src_tokens"].tolist() for b in s]
    assert rest == ref[2:]


def test_extras_same_steps_on_every_rank_distinct_rows(tok, pre_files, tmp_path):
    texts = write_tsv(tmp_path / "texts.tsv", [[f"t{i}", f"sentence number {i}"] for i in range(40)])
    files = dict(pre_files, text_data=texts, image_data="", detection_data="")
    seen, pattern = [], []
    for rank in range(2):
        s = DataStream(cfg(files, batch_size=4), rank=rank, world=2, tokenizer=tok)
        bs = list(s)
        pattern.append([isinstance(b, tuple) for b in bs])
        seen += [tok.decode([t for t in b[1]["target"][i].tolist() if t > 2])
                 for b in bs if isinstance(b, tuple) for i in range(2)]
    assert pattern[0] == pattern[1] == [True, False]  # 8 rows per rank: extras with row 0 of each rank
    assert len(seen) == 4 and len(set(seen)) == 4  # ranks read different text rows
