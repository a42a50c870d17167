"""VQA accuracy, grounding accuracy (IoU ≥ 0.5) and plain accuracy, as OFA's evaluation computes them.

What is unusual:
  * OFA's VQA score of a prediction is the confidence stored for that answer in the row's answers field (0 if
    absent) — the data already holds the official soft score. `vqa_soft_score` computes that soft score from the
    raw human answers (the official rule: mean over the 10 leave-one-out subsets of min(1, matches / 3), i.e.
    0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / ≥4 matching humans out of 10), with the official answer normalisation.
  * Grounding: a hit needs IoU ≥ 0.5 *and* a positive intersection width and height; IoU = inter /
    (area_p + area_g − inter + 1e-6), continuous coordinates (no +1), in original-image pixels.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                 "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's",
                 "hes": "he's", "shes": "she's", "its": "it's", "couldnt": "couldn't", "wouldnt": "wouldn't",
                 "shouldnt": "shouldn't", "hasnt": "hasn't", "havent": "haven't", "lets": "let's"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(ans: str) -> str:
    """The official VQA evaluation's answer processing: punctuation, number words, articles, contractions."""
    a = ans.replace("\n", " ").replace("\t", " ").strip().lower()
    out = a
    for p in _PUNCT:
        if (p + " " in a or " " + p in a) or re.search(_COMMA_STRIP, a) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_score(pred: str, human_answers: Sequence[str], normalize: bool = True) -> float:
    """Official VQA accuracy of one prediction against the (usually 10) human answers."""
    f = normalize_vqa_answer if normalize else (lambda s: s)
    p = f(pred)
    gts = [f(a) for a in human_answers]
    if not gts:
        return 0.0
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(1 for g in others if g == p) / 3.0))
    return sum(accs) / len(accs)


def vqa_score(pred: str, ref_dict: dict) -> float:
    """OFA's VQA score: the confidence of `pred` in the row's answer→confidence dict (0 when absent)."""
    return float(ref_dict.get(pred, 0.0))


def box_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of [N, 4] (x0, y0, x1, y1) boxes, OFA's formula (no +1, 1e-6 in the denominator)."""
    pred, gt = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(gt, dtype=torch.float64)
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    lt = torch.maximum(pred[:, :2], gt[:, :2])
    rb = torch.minimum(pred[:, 2:], gt[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area_p + area_g - inter + 1e-6)


def grounding_hits(pred: torch.Tensor, gt: torch.Tensor, thresh: float = 0.5) -> torch.Tensor:
    """Bool [N]: IoU ≥ thresh and the intersection has positive width and height (OFA's _calculate_ap_score)."""
    pred, gt = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(gt, dtype=torch.float64)
    lt = torch.maximum(pred[:, :2], gt[:, :2])
    rb = torch.minimum(pred[:, 2:], gt[:, 2:])
    pos = (rb[:, 0] > lt[:, 0]) & (rb[:, 1] > lt[:, 1])
    return (box_iou(pred, gt) >= thresh) & pos


def accuracy(preds: Sequence, golds: Sequence) -> float:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} labels")
    return sum(1 for p, g in zip(preds, golds) if p == g) / max(len(preds), 1)


def matthews_corr(preds: Sequence, golds: Sequence, positive="yes") -> float:
    """Matthews correlation coefficient of a binary labelling (CoLA's metric); 0 when undefined."""
    tp = sum(1 for p, g in zip(preds, golds) if p == positive and g == positive)
    tn = sum(1 for p, g in zip(preds, golds) if p != positive and g != positive)
    fp = sum(1 for p, g in zip(preds, golds) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(preds, golds) if p != positive and g == positive)
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / den if den else 0.0
