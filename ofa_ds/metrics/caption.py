"""COCO caption metrics on tokenised text: BLEU-1..4 and ROUGE-L computed the way pycocoevalcap computes them, and
`caption_scores`, the one call evaluation uses (tokenise + CIDEr-D + BLEU + ROUGE-L).

What is unusual (reproduced from the COCO reference behaviour):
  * BLEU is a *corpus* score: clipped n-gram matches and guesses summed over all sentences, the reference length of
    a sentence is the reference length closest to the hypothesis length (ties -> the shorter one), smoothing
    constants 1e-15 / 1e-9, brevity penalty exp(1 - r/c) when c < r.
  * ROUGE-L is per sentence: LCS against each reference, the best precision and the best recall (possibly from
    different references), F with beta = 1.2; the corpus value is the mean. Tokens are split on single spaces.
  * Scores are on COCO's scale (CIDEr 1.382 = "138.2" in papers).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from ofa_ds.metrics.cider import CiderD, ngram_counts
from ofa_ds.metrics.tokenize import tokenize


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised (space-joined) hypotheses against their references."""
    tiny, small = 1e-15, 1e-9
    test_len = ref_len = 0
    guess, correct = [0] * n, [0] * n
    for h, rs in zip(hyps, refs):
        words = h.split()
        c = ngram_counts(words, n)
        max_ref: Counter = Counter()
        lens = []
        for r in rs:
            rw = r.split()
            lens.append(len(rw))
            for g, k in ngram_counts(rw, n).items():
                if k > max_ref[g]:
                    max_ref[g] = k
        tl = len(words)
        test_len += tl
        ref_len += min((abs(L - tl), L) for L in lens)[1]
        for k in range(n):
            guess[k] += max(tl - k, 0)
        for g, k in c.items():
            correct[len(g) - 1] += min(k, max_ref[g])
    out, b = [], 1.0
    for k in range(n):
        b *= (correct[k] + tiny) / (guess[k] + small)
        out.append(b ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        out = [x * math.exp(1 - 1 / ratio) for x in out]
    return out


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_sentence(hyp: str, refs: Sequence[str], beta: float = 1.2) -> float:
    hc = hyp.split(" ")
    precs, recs = [], []
    for r in refs:
        rc = r.split(" ")
        lcs = _lcs(rc, hc)
        precs.append(lcs / len(hc))
        recs.append(lcs / len(rc))
    p, r = max(precs), max(recs)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta ** 2) * p * r) / (r + beta ** 2 * p)


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return sum(rouge_l_sentence(h, rs) for h, rs in zip(hyps, refs)) / max(len(hyps), 1)


def caption_scores(preds: dict, refs: dict, tokenizer: str = "auto", df=None, ref_len=None) -> dict:
    """preds {id: caption}, refs {id: [reference, ...]} (same ids) -> {"CIDEr", "Bleu_1".."Bleu_4", "ROUGE_L",
    "tokenizer", "n"}. `tokenizer`: see `ofa_ds.metrics.tokenize.tokenize`. df/ref_len: a cached df (else corpus)."""
    ids = sorted(preds, key=str)
    missing = [i for i in ids if i not in refs]
    if missing:
        raise KeyError(f"{len(missing)} predictions have no references (e.g. {missing[:3]})")
    if not ids:
        return {"CIDEr": 0.0, "Bleu_1": 0.0, "Bleu_2": 0.0, "Bleu_3": 0.0, "Bleu_4": 0.0, "ROUGE_L": 0.0,
                "tokenizer": tokenizer, "n": 0}
    both = {("h", i): [preds[i]] for i in ids}
    both.update({("r", i): list(refs[i]) for i in ids})
    tok, used = tokenize(both, tokenizer)
    H = [tok[("h", i)][0] for i in ids]
    R = [tok[("r", i)] for i in ids]
    cider, _ = CiderD(df=df, ref_len=ref_len).compute(H, R)
    b = bleu(H, R)
    out = {"CIDEr": cider}
    out.update({f"Bleu_{k + 1}": v for k, v in enumerate(b)})
    out["ROUGE_L"] = rouge_l(H, R)
    out["tokenizer"] = used
    out["n"] = len(ids)
    return out
