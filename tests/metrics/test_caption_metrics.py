"""CIDEr-D, BLEU and ROUGE-L against pycocoevalcap's scorers on the same tokens (skipped, with the reason, when
pycocoevalcap is not installed), document-frequency caches, and the Java-free PTB tokenizer."""
import datetime
import math
import pickle
import random
from collections import defaultdict

import pytest

from ofa_ds.metrics import CiderD, bleu, caption_scores, document_frequency, load_df, rouge_l, save_df
from ofa_ds.metrics.tokenize import java_available, ptb_tokenize_py, tokenize

WORDS = "a an the man woman dog cat red blue big small on in with riding sitting table street two of".split()


def _corpus(seed, n_img=30):
    rng = random.Random(seed)
    sent = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))  # noqa: E731
    hyps = [sent() for _ in range(n_img)]
    refs = [[sent() for _ in range(rng.randint(1, 5))] for _ in range(n_img)]
    hyps[0] = refs[0][0]            # one exact match
    return hyps, refs


def _coco():
    return pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (pip install pycocoevalcap)")


def test_cider_d_equals_pycocoevalcap():
    _coco()
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    for seed in range(3):
        hyps, refs = _corpus(seed)
        ref_scorer = CiderScorer(n=4, sigma=6.0)
        for h, rs in zip(hyps, refs):
            ref_scorer += (h, rs)
        want, want_each = ref_scorer.compute_score()
        got, got_each = CiderD().compute(hyps, refs)
        assert abs(got - want) < 1e-6
        assert max(abs(a - b) for a, b in zip(got_each, want_each)) < 1e-6
        assert got > 0


def test_bleu_and_rouge_equal_pycocoevalcap():
    _coco()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    for seed in range(3):
        hyps, refs = _corpus(seed)
        gts = {i: rs for i, rs in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        want_b, _ = Bleu(4).compute_score(gts, res, verbose=0)
        want_r, _ = Rouge().compute_score(gts, res)
        for a, b in zip(bleu(hyps, refs), want_b):
            assert abs(a - b) < 1e-9
        assert abs(rouge_l(hyps, refs) - want_r) < 1e-9


def test_cider_hand_example_and_cached_df(tmp_path):
    hyps, refs = _corpus(5, n_img=12)
    df, n = document_frequency(refs)
    corpus, each = CiderD().compute(hyps, refs)
    cached, each2 = CiderD(df=df, ref_len=n).compute(hyps, refs)
    assert corpus == cached and each == each2
    assert math.isclose(CiderD().compute(["a b"], [["a b"]])[0], 0.0)   # one image: log(1) idf is zero everywhere
    # JSON cache and OFA's pickle layout (defaultdict of n-gram tuples + ref_len) load to the same df
    save_df(str(tmp_path / "df.json"), df, n)
    d1, n1 = load_df(str(tmp_path / "df.json"))
    dd = defaultdict(float, df)
    with open(tmp_path / "words.p", "wb") as f:
        pickle.dump({"document_frequency": dd, "ref_len": float(n)}, f)
    d2, n2 = load_df(str(tmp_path / "words.p"))
    assert d1 == d2 == dict(df) and n1 == n2 == n
    with open(tmp_path / "words2.p", "wb") as f:                       # protocol 2, as Python 2 wrote them
        pickle.dump({"document_frequency": dd, "ref_len": float(n)}, f, protocol=2, fix_imports=True)
    assert load_df(str(tmp_path / "words2.p")) == (dict(df), float(n))
    with open(tmp_path / "evil.p", "wb") as f:
        pickle.dump({"document_frequency": datetime.date(2020, 1, 1), "ref_len": 1.0}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_df(str(tmp_path / "evil.p"))
    # a df from another corpus changes the scores
    other, _ = document_frequency(_corpus(9)[1])
    assert CiderD(df=other, ref_len=30).compute(hyps, refs)[0] != corpus


JAVA_CASES = {   # pycocoevalcap's PTBTokenizer (Java) output, then its punctuation removal
    "A man riding a horse.": "a man riding a horse",
    "The dog's toy isn't red, it's blue!": "the dog 's toy is n't red it 's blue",
    "A t-shirt and/or 3.5 $5 (big) 1,000 u.s. flags...": "a t-shirt and/or 3.5 $ 5 -lrb- big -rrb- 1,000 u.s. flags",
    'Two people -- one "smiling"; 50% off': "two people one smiling 50 % off",
    "I cannot go": "i can not go",
    "a [big] {red} dog": "a -lsb- big -rsb- -lcb- red -rcb- dog",
    "Mr. Smith e.g. this etc.": "mr. smith e.g. this etc.",
    "a cat on a T.V. screen": "a cat on a t.v. screen",
    "Two dogs playing w/ a ball": "two dogs playing w / a ball",
    "the #1 fan & his girl's 2nd toy": "the # 1 fan & his girl 's 2nd toy",
    "a hot-dog @ noon + 2=3": "a hot-dog @ noon + 2 = 3",
    "a 'quoted' word": "a quoted word",
    "it is 10:30 and 1/2 done": "it is 10:30 and 1/2 done",
}


def test_python_ptb_tokenizer_matches_recorded_java_output():
    for text, want in JAVA_CASES.items():
        assert " ".join(ptb_tokenize_py(text)) == want, text


COCO_STYLE = ["A man riding a wave on top of a surfboard.", "Two giraffes standing next to each other in a field.",
              "A woman's hand holding a cell phone.", "A plate of food with broccoli, carrots and rice.",
              "The cat is sleeping on the couch!", "A red double-decker bus driving down a street.",
              "Kids playing frisbee in a park; one is jumping.", "Isn't that a 747 airplane?",
              "A close up of a pizza with pepperoni & cheese", "People walking in the rain w/ umbrellas",
              "There's a dog (brown) on the bed.", "A 2-year-old boy eating a donut.",
              "An old man sitting on a bench... reading", 'A "stop" sign at an intersection',
              "Bowl of fruit: apples, bananas, oranges.", "A T-shirt that says 'I love NY'",
              "Cars parked along the curb at 5:30 p.m.", "A kitchen with stainless-steel appliances.",
              "Mr. and Mrs. Smith's wedding cake"]


@pytest.mark.skipif(not java_available(), reason="java or pycocoevalcap not available")
def test_python_ptb_tokenizer_matches_java_now():
    caps = {i: [t] for i, t in enumerate(list(JAVA_CASES) + COCO_STYLE)}
    java, used = tokenize(caps, "java")
    assert used == "ptb-java"
    py, _ = tokenize(caps, "python")
    assert java == py


def test_caption_scores_end_to_end():
    preds = {1: "A man riding a horse.", 2: "two dogs on the street", 3: "a cat"}
    refs = {1: ["A man rides a horse", "a man riding a brown horse."], 2: ["Two dogs in a street."],
            3: ["a small cat sitting on a table", "A cat."]}
    s = caption_scores(preds, refs, tokenizer="python")
    assert s["tokenizer"] == "ptb-approx" and s["n"] == 3
    assert 0 < s["CIDEr"] and 0 < s["Bleu_4"] <= s["Bleu_1"] <= 1 and 0 < s["ROUGE_L"] <= 1
    perfect = caption_scores({i: r[0] for i, r in refs.items()}, refs, tokenizer="python")
    assert perfect["CIDEr"] > s["CIDEr"] and perfect["ROUGE_L"] == 1.0
    with pytest.raises(KeyError):
        caption_scores({9: "x"}, refs)
