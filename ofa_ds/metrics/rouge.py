"""Gigaword ROUGE-1/2/L F1 as OFA reports it: hypothesis lower-cased and re-tokenised PTB-style, `<unk>` →
`unk`, every character `1` → `#`; reference = the lower-cased raw target; ROUGE F1 with the Porter stemmer.

What is unusual:
  * `fix_tokenization` re-joins what the BPE round trip splits the PTB way OFA's reference targets are written:
    brackets → -lrb- -rrb- (and -lsb- -rsb- -lcb- -rcb-), double quotes → `` / '' alternating, "do n't"
    style clitics, and digit groups "3 , 000" → "3,000", "3 . 5" → "3.5". It is written from that description
    (OFA's own helper may differ on rare inputs).
  * The score uses the `rouge_score` package (Google's, as HF `datasets` wraps it) when installed; otherwise a
    built-in ROUGE-N/L F1 with the same tokenisation (lower-case, non-alphanumerics → spaces) and no stemming —
    the result then carries "rouge_backend": "builtin-nostem".
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_NONALNUM = re.compile(r"[^a-z0-9]+")


def fix_tokenization(text: str) -> str:
    toks = text.split()
    out: list[str] = []
    open_quote = False
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t in _BRACKETS:
            out.append(_BRACKETS[t])
        elif t == '"':
            out.append("''" if open_quote else "``")
            open_quote = not open_quote
        elif t == "'" and out and out[-1].endswith("n") and nxt == "t":
            if out[-1] == "n":
                out[-1] = "n't"
            else:
                out[-1] = out[-1][:-1]
                out.append("n't")
            i += 1
        elif t == "'" and nxt in ("s", "d", "ll", "m", "re", "ve"):
            out.append("'" + nxt)
            i += 1
        elif t in (",", ".") and out and out[-1].replace(",", "").replace(".", "").isdigit() and nxt is not None \
                and nxt.isdigit():
            out[-1] += t + nxt
            i += 1
        elif t == "." and nxt == "." and i + 2 < len(toks) and toks[i + 2] == ".":
            out.append("...")
            i += 2
        else:
            out.append(t)
        i += 1
    return " ".join(out)


def gigaword_hypothesis(text: str) -> str:
    """OFA's post-processing of a generated summary before ROUGE."""
    t = fix_tokenization(text.strip().lower()).replace("<unk>", " unk").replace("1", "#")
    return " ".join(t.split())


def _tokens(text: str) -> list[str]:
    return _NONALNUM.sub(" ", text.lower()).split()


def _f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    if overlap == 0 or n_hyp == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_builtin(hyp: str, ref: str) -> dict[str, float]:
    h, r = _tokens(hyp), _tokens(ref)
    out = {}
    for n in (1, 2):
        ch = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        cr = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        out[f"rouge{n}"] = _f1(sum((ch & cr).values()), sum(ch.values()), sum(cr.values()))
    out["rougeL"] = _f1(_lcs_len(h, r), len(h), len(r))
    return out


def rouge_scores(hyps: Sequence[str], refs: Sequence[str], stemmer: bool = True, backend: str = "auto") -> dict:
    """Mean ROUGE-1/2/L F1 (fractions; OFA logs ×100) of post-processed hypotheses vs lower-cased references."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    scorer = None
    if backend in ("auto", "rouge_score"):
        try:
            from rouge_score import rouge_scorer
            scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stemmer)
        except ImportError:
            if backend == "rouge_score":
                raise
    tot = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs):
        if scorer is not None:
            s = scorer.score(r, h)
            vals = {k: s[k].fmeasure for k in tot}
        else:
            vals = rouge_builtin(h, r)
        for k in tot:
            tot[k] += vals[k]
    n = max(len(hyps), 1)
    out = {k: v / n for k, v in tot.items()}
    out["rouge_backend"] = ("rouge_score" + ("-stem" if stemmer else "")) if scorer is not None else "builtin-nostem"
    out["n"] = len(hyps)
    return out
