"""Every task builder against hand-made rows in the official formats (docs/ofa.md#task-formats)."""
import json

import numpy as np
import pytest
import torch

from ofa_ds.data import DataConfig, make_task
from ofa_ds.data.text import pre_caption, pre_question, span_mask
from tests.data.conftest import b64, make_image

CAPTION_PROMPT = [99, 473, 5, 2274, 6190, 116]
YES, NO, MAYBE = 4420, 117, 2085
RNG = np.random.default_rng


def T(task, tok, split="train", **kw):
    kw.setdefault("patch_image_size", 32)
    return make_task(DataConfig(task=task, **kw), split, tok)


def test_text_normalisers():
    assert pre_caption(",.A Man-in/the <person>  ROOM.  ", 30) == "a man in the person room."
    assert pre_caption("  ,.a", 30) == ",.a"  # OFA strips punctuation before whitespace
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_question("Is THIS a <person>?", 10) == "is this a <person>?"


def test_caption_train_and_eval(tok, img64):
    row = ["162365", "12455", "the sun sets over the trees beyond some docks.", "sky&&water&&dock&&pole", img64]
    t = T("caption", tok, max_tgt_length=5)
    s = t.build([row[c] for c in t.cols], 7, RNG(0))
    assert t.cols == [0, 4, 2] and s.source == [0] + CAPTION_PROMPT + [2]
    words = tok.encode(" the sun sets over the")
    assert s.target == words + [2] and s.prev == [0] + words and s.patch_mask and s.image.shape == (3, 32, 32)
    e = T("caption", tok, "valid")
    row[2] = "A dog runs.&&a dog, running"
    s = e.build([row[c] for c in e.cols], 0, RNG(0))
    assert e.cols == [1, 4, 2] and s.extras["captions"] == ["A dog runs", "a dog running"]
    assert s.target == tok.encode(" A dog runs&&a dog running") + [2] and s.extras["uniq_id"] == "12455"


@pytest.fixture
def ans_file(tmp_path):
    p = tmp_path / "ans.json"
    p.write_text(json.dumps({"no": 0, "yes": 1, "maybe": 2, "red apple": 3}))
    return str(p)


def test_vqa_prev_output_with_trie_and_objects(tok, img64, ans_file):
    row = ["79459", "79459", "Is this person wearing shorts", "0.6|!+no&&0.3|!+yes", "house&&short&&sky", img64]
    t = T("vqa", tok, ans2label_file=ans_file, add_object=True, max_object_length=2)
    s = t.build([row[c] for c in t.cols], 1, RNG(0))
    q = tok.encode(" is this person wearing shorts?") + tok.encode(" object: house short")
    assert s.source == [0] + q + [2] and s.prev == [0] + q + [NO]
    assert s.target == [1] * len(q) + [NO, 2] and s.conf == 0.6
    assert s.extras["ref_dict"] == {"no": 0.6, "yes": 0.3} and s.extras["decoder_prompt"] == [0] + q
    assert all(r is None for r in s.constraint[: len(q)])
    assert sorted(s.constraint[len(q)]) == sorted({NO, YES, MAYBE, tok.encode(" red")[0]})
    assert s.constraint[len(q) + 1] == [2]
    b = t.collate([s, t.build([row[c] for c in t.cols][:3] + ["1.0|!+red apple", row[4]], 2, RNG(0))])
    m = b["constraint_masks"]
    assert m.shape == (2, len(q) + 3, tok.vocab_size) and m.dtype == torch.bool
    assert not m[0, : len(q)].any() and m[0, len(q), YES] and not m[0, len(q), 5]
    assert m[0, len(q) + 2].all()  # padding rows are True, like OFA's collate
    assert m[1, len(q) + 1].nonzero().flatten().tolist() == [tok.encode(" apple")[0]]
    assert b["conf"].tolist() == pytest.approx([0.6, 1.0])


def test_vqa_prompt_types_and_compact_masks(tok, img64, ans_file):
    row = ["1", img64, "what is it?", "1.0|!+yes", ""]
    q = tok.encode(" what is it?")
    s = T("vqa", tok, prompt_type="none").build(row, 0, RNG(0))
    assert s.prev == [0, YES] and s.target == [YES, 2] and s.constraint is None
    s = T("vqa", tok, prompt_type="src").build(row, 0, RNG(0))
    assert s.prev == [0] + q + [2, YES] and s.target == [1] * (len(q) + 1) + [YES, 2]
    dense = T("vqa", tok, ans2label_file=ans_file)
    compact = T("vqa", tok, ans2label_file=ans_file, constraint_masks="compact")
    rows = [row, row[:3] + ["1.0|!+red apple", ""]]
    bd = dense.collate([dense.build(r, i, RNG(0)) for i, r in enumerate(rows)])
    bc = compact.collate([compact.build(r, i, RNG(0)) for i, r in enumerate(rows)])
    assert bc["constraint_masks"] is None
    assert torch.equal(bc["constraint_rows"][bc["constraint_index"]], bd["constraint_masks"])


def test_refcoco_bins_and_ratios(tok):
    img = b64(make_image(64, 48, (10, 8, 30, 28)))
    row = ["79_1", "237367", "A man.", "10,8,30,28", img]
    t = T("refcoco", tok, max_image_size=32)
    s = t.build([row[c] for c in t.cols], 0, RNG(0))
    assert s.source == [0, 61, 976, 473, 5, 2788, 22, 10, 313, 4, 22, 6190, 116, 2]
    expect = [round(v / 32 * 999) for v in (10 * 0.5, 8 * 32 / 48, 30 * 0.5, 28 * 32 / 48)]
    assert s.target == [58457 + b for b in expect] + [2] and s.prev == [0] + [58457 + b for b in expect]
    assert s.extras["w_resize_ratios"] == 0.5 and s.extras["h_resize_ratios"] == pytest.approx(32 / 48)
    box = tok.ids_to_box(s.target[:4], 32, 0.5, 32 / 48)
    assert np.allclose(box, [10, 8, 30, 28], atol=0.05)
    b = t.collate([s])
    assert b["region_coords"].tolist() == [[10.0, 8.0, 30.0, 28.0]] and b["patch_images"].shape == (1, 3, 32, 32)


def test_snli_ve(tok, img64):
    row = ["252244149.jpg#1r1n", "252244149", img64, "a man in pink and gold is chewing on a wooden toothpick.",
           "a man in pink is chewing a toothpick on the subway.", "neutral"]
    t = T("snli_ve", tok, add_caption=True)
    s = t.build([row[c] for c in t.cols], 0, RNG(0))
    src = tok.encode(' can image and text1 " a man in pink is chewing a toothpick on the subway. " imply text2 '
                     '" a man in pink and gold is chewing on a wooden toothpick. "?')
    assert s.source == [0] + src + [2] and s.prev == [0] + src + [MAYBE] and s.target[-2:] == [MAYBE, 2]
    assert sorted(s.constraint[len(src)]) == sorted([YES, NO, MAYBE])
    t2 = T("snli_ve", tok, prompt_type="none")
    s2 = t2.build([row[c] for c in t2.cols], 0, RNG(0))
    p2 = tok.encode(' does the image describe " a')
    assert s2.source[: len(p2) + 1] == [0] + p2
    row[5] = "contradicts"
    from ofa_ds.data.tsv import BadRow
    with pytest.raises(BadRow, match="unknown label"):
        t.build([row[c] for c in t.cols], 0, RNG(0))


def test_imagenet_urlsafe_and_class_trie(tok, tmp_path):
    p = tmp_path / "classes.json"
    p.write_text(json.dumps({"rugby ball": 0, "rugby shirt": 1, "dog": 2}))
    img = b64(make_image(40, 40), urlsafe=True)
    t = T("imagenet", tok, "valid", ans2label_file=str(p), imagenet_default_mean_and_std=True)
    s = t.build([img, "rugby ball"], 0, RNG(0))
    ids = tok.encode(" rugby ball")
    assert s.source == [0] + CAPTION_PROMPT + [2] and s.target == ids + [2] and s.prev == [0] + ids
    assert sorted(s.constraint[0]) == sorted({ids[0], tok.encode(" dog")[0]})
    assert sorted(s.constraint[1]) == sorted({tok.encode(" rugby ball")[1], tok.encode(" rugby shirt")[1]})
    assert s.constraint[2] == [2]
    tt = T("imagenet", tok, "train", ans2label_file=str(p))
    assert tt.build([img, "dog"], 0, RNG(1)).image.shape == (3, 32, 32)


def test_gigaword_and_noise(tok):
    row = ["factory orders for manufactured goods rose #.# percent in <unk> september",
           "US september factory orders up #.# percent"]
    s = T("gigaword", tok).build(row, 0, RNG(0))
    src = tok.encode(' what is the summary of article " factory orders for manufactured goods rose #.# percent in '
                     'unk september "?')
    tgt = tok.encode("us september factory orders up #.# percent")
    assert s.source == [0] + src + [2] and s.target == tgt + [2] and s.prev == [0] + tgt and s.image is None
    assert s.extras["target_str"] == "us september factory orders up #.# percent"
    n = T("gigaword", tok, noise_ratio=1.0).build(row, 0, RNG(0))
    assert n.target == s.target and n.prev != s.prev and all(4 <= i <= 50264 for i in n.prev[1:])
    b = T("gigaword", tok).collate([s])
    assert b["patch_images"] is None and not b["patch_masks"].any()


@pytest.mark.parametrize("name,row,label", [
    ("sst2", ["it is great", "1"], " positive"), ("cola", ["x", "the book is red", "0"], " no"),
    ("mnli", ["a b", "c d", "0"], " maybe"), ("rte", ["0", "a", "b", "not_entailment"], " no"),
    ("qqp", ["0", "1", "2", "q one", "q two", "1"], " yes"), ("mrpc", ["s one", "s two", "1"], " yes"),
    ("qnli", ["0", "what?", "It is.", "entailment"], " yes")])
def test_glue_src_layout(tok, name, row, label):
    t = T(name, tok, prompt_type="src")
    s = t.build([row[c] for c in t.cols], 0, RNG(0))
    lab = tok.encode(label)
    assert len(lab) == 1 and s.prev == s.source and len(s.target) == len(s.source)
    assert s.target == [1] * (len(s.source) - 1) + lab
    assert all(r is None for r in s.constraint[:-1]) and lab[0] in s.constraint[-1]
    if name == "qnli":
        assert s.source == [0] + tok.encode(' does " it is. " contain the answer to question " what? "?') + [2]
    if name == "sst2":
        assert sorted(s.constraint[-1]) == sorted(tok.encode(" positive") + tok.encode(" negative"))


def test_image_gen(tok):
    row = ["1", "6674 4336 4532 0 8191", "the people are posing for a group photo."]
    t = T("image_gen", tok)
    s = t.build([row[c] for c in t.cols], 0, RNG(0))
    assert s.source[:7] == [0, 99, 16, 5, 1498, 2274, 116] and s.source[-1] == 2
    codes = [50265 + c for c in (6674, 4336, 4532, 0, 8191)]
    assert s.target == codes + [2] and s.prev == [0] + codes and s.code_mask
    b = t.collate([s])
    assert b["code_masks"].tolist() == [True] and not b["patch_masks"].any()
    assert b["patch_images"].abs().sum() == 0


def test_span_mask_properties(tok):
    text = tok.encode(" the quick brown fox jumps over the lazy dog and then it runs away very fast")
    full = [0] + text + [2]
    outs = set()
    for seed in range(20):
        m = span_mask(full, tok.is_word_start(full), 0.3, 3.0, tok.mask, RNG(seed))
        assert m[0] == 0 and m[-1] == 2 and tok.mask in m
        kept = [t for t in m if t != tok.mask]
        it = iter(full)
        assert all(any(k == f for f in it) for k in kept)  # kept tokens are a subsequence
        outs.add(tuple(m))
    assert len(outs) > 5
    assert span_mask(full, tok.is_word_start(full), 0.3, 3.0, tok.mask, RNG(1)) == \
        span_mask(full, tok.is_word_start(full), 0.3, 3.0, tok.mask, RNG(1))
