"""VQA soft score (official rule), grounding IoU edge cases with OFA's hit rule, accuracy, Gigaword ROUGE."""
import math

import pytest
import torch

from ofa_ds.metrics import (accuracy, box_iou, gigaword_hypothesis, grounding_hits, normalize_vqa_answer,
                            rouge_scores, vqa_score, vqa_soft_score)
from ofa_ds.metrics.rouge import fix_tokenization, rouge_builtin


def test_vqa_soft_score_official_rule():
    other = ["cat"] * 10
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["dog"] * k + other[k:]
        assert math.isclose(round(vqa_soft_score("dog", answers), 10), want), k
    # official answer processing: numbers, articles, punctuation, contractions
    assert normalize_vqa_answer("Two") == "2"
    assert normalize_vqa_answer("a Dog!") == "dog"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("yes.") == "yes"
    assert vqa_soft_score("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_score("yes", {"yes": 0.9, "no": 0.3}) == 0.9 and vqa_score("maybe", {"yes": 1.0}) == 0.0


def test_iou_edge_cases():
    cases = [  # pred, gt, iou, hit
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0, True),          # identical
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0, False),         # touching edge
        ([0, 0, 10, 10], [10, 10, 20, 20], 0.0, False),        # touching corner
        ([2, 2, 8, 8], [0, 0, 10, 10], 0.36, False),           # contained, small
        ([1, 1, 9, 9], [0, 0, 10, 10], 0.64, True),            # contained, large
        ([0, 0, 10, 10], [1, 1, 9, 9], 0.64, True),            # containing
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0, False),              # both zero-area
        ([3, 3, 3, 8], [0, 0, 10, 10], 0.0, False),            # zero-width prediction inside the gt
        ([0, 0, 20, 10], [0, 0, 10, 10], 0.5, False),          # exactly 0.5 misses: the 1e-6 makes it 0.4999999
        ([0, 0, 19.99, 10], [0, 0, 10, 10], 10 / 19.99, True),
        ([20, 20, 30, 30], [0, 0, 10, 10], 0.0, False),        # disjoint
    ]
    pred = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    gt = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    iou, hits = box_iou(pred, gt), grounding_hits(pred, gt)
    for i, (_, _, want, hit) in enumerate(cases):
        assert abs(float(iou[i]) - want) < 1e-6, i
        assert bool(hits[i]) == hit, i


def test_accuracy_and_mcc():
    from ofa_ds.metrics.simple import matthews_corr
    assert accuracy(["yes", "no", "maybe"], ["yes", "no", "no"]) == pytest.approx(2 / 3)
    gold = ["yes", "no", "yes", "no", "yes"]
    assert matthews_corr(gold, gold) == pytest.approx(1.0)
    assert matthews_corr(["no" if g == "yes" else "yes" for g in gold], gold) == pytest.approx(-1.0)
    assert matthews_corr(["yes"] * 5, gold) == 0.0                       # undefined (constant prediction) -> 0
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2)
    assert matthews_corr(["yes", "yes", "yes", "no", "no"], gold) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


def test_gigaword_postprocessing_and_rouge():
    assert fix_tokenization('he said " it is n \' t ( ok ) " for $ 3 , 000') == \
        "he said `` it is n't -lrb- ok -rrb- '' for $ 3,000"
    assert gigaword_hypothesis("Police arrest 10 men <unk>") == "police arrest #0 men unk"
    h, r = "police killed the gunman", "the gunman was shot down by police"
    b = rouge_builtin(h, r)
    assert b["rouge1"] == pytest.approx(2 * (3 / 4) * (3 / 7) / (3 / 4 + 3 / 7))
    assert b["rougeL"] == pytest.approx(2 * (2 / 4) * (2 / 7) / (2 / 4 + 2 / 7))
    try:
        import rouge_score  # noqa: F401
    except ImportError:
        pytest.skip("rouge_score not installed: only the built-in scorer was checked")
    hyps = [h, "us stocks rise on jobs data", "a b c"]
    refs = [r, "u.s. stocks rose after jobs report", "x y z"]
    ours = rouge_scores(hyps, refs, stemmer=False, backend="builtin")
    theirs = rouge_scores(hyps, refs, stemmer=False, backend="rouge_score")
    for k in ("rouge1", "rouge2", "rougeL"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-9)
    assert rouge_scores(hyps, refs)["rouge_backend"] == "rouge_score-stem"
