"""CIDEr-D as COCO computes it (pycocoevalcap's `Cider`, which is the CIDEr-D variant), plus document-frequency
caches for SCST rewards and a CLI to build them.

What is unusual (and reproduced on purpose, so scores equal pycocoevalcap's to 1e-6):
  * n-grams n = 1..4 of whitespace tokens (tokenise first, see `ofa_ds.metrics.tokenize`); tf-idf weights
    tf · (log(N_docs) − log(max(1, df))), where df counts the images whose *reference set* contains the n-gram.
  * the "length" in the Gaussian length penalty exp(−Δ²/2σ²), σ = 6, is the number of **bigrams** (a quirk of the
    reference code: it counts when the n-gram index is 1), not the number of words;
  * clipping: Σ min(v_hyp, v_ref) · v_ref over the hypothesis n-grams, divided by ‖v_hyp‖·‖v_ref‖ when both are
    non-zero; mean over n, mean over references, × 10.
  * Corpus mode (df from the evaluated references, N_docs = number of images) is what COCO evaluation uses; a
    cached df (OFA's `coco-train-words.p`, or our JSON) is what SCST uses, with N_docs = the cache's `ref_len`.

Cache formats read by `load_df`: our JSON {"ref_len": N, "df": {"w1 w2": count}} and OFA's pickle
{"document_frequency": {ngram tuple: count}, "ref_len": N} (through a restricted unpickler: builtins only).
CLI: `python -m ofa_ds.metrics.cider build-df --refs caption_train.tsv --col 2 --out df.json [--add-eos]`.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
from collections import Counter, defaultdict
from typing import Iterable, Optional, Sequence

NGram = tuple


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


def document_frequency(refs: Iterable[Sequence[str]], n: int = 4) -> tuple[dict[NGram, float], int]:
    """refs: per image, its list of (tokenised, space-joined) reference strings -> (df, number of images)."""
    df: dict[NGram, float] = defaultdict(float)
    n_docs = 0
    for rs in refs:
        n_docs += 1
        seen = set()
        for r in rs:
            seen.update(ngram_counts(r.split(), n))
        for g in seen:
            df[g] += 1
    return df, n_docs


class CiderD:
    """Corpus CIDEr-D. `df=None`: document frequencies from the scored references (COCO evaluation);
    otherwise `df` + `ref_len` (number of documents it was built from), as in SCST."""

    def __init__(self, n: int = 4, sigma: float = 6.0, df: Optional[dict] = None, ref_len: Optional[float] = None):
        if (df is None) != (ref_len is None):
            raise ValueError("give both df and ref_len (number of documents) or neither")
        self.n, self.sigma, self.df, self.ref_len = n, sigma, df, ref_len

    def _vec(self, counts: Counter, log_n: float, df: dict):
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v = float(tf) * (log_n - math.log(max(1.0, df.get(g, 0.0))))
            vec[k][g] = v
            norm[k] += v * v
            if k == 1:                          # reference-code quirk: "length" = number of bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, vh, nh, lh, vr, nr, lr) -> float:
        delta = float(lh - lr)
        pen = math.e ** (-(delta ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            val = 0.0
            ref_k = vr[k]
            for g, v in vh[k].items():
                rv = ref_k.get(g, 0.0)
                val += min(v, rv) * rv
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            total += val * pen
        return total / self.n

    def compute(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """hyps[i]: tokenised hypothesis (space-joined); refs[i]: its tokenised references.
        Returns (corpus mean, per-sample scores)."""
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
        if not hyps:
            return 0.0, []
        if self.df is None:
            df, n_docs = document_frequency(refs, self.n)
        else:
            df, n_docs = self.df, self.ref_len
        log_n = math.log(float(n_docs))
        scores = []
        for h, rs in zip(hyps, refs):
            vh, nh, lh = self._vec(ngram_counts(h.split(), self.n), log_n, df)
            s = 0.0
            for r in rs:
                vr, nr, lr = self._vec(ngram_counts(r.split(), self.n), log_n, df)
                s += self._sim(vh, nh, lh, vr, nr, lr)
            scores.append(s / len(rs) * 10.0 if rs else 0.0)
        return sum(scores) / len(scores), scores


# ---- document-frequency caches --------------------------------------------------------------------------------------
class _BuiltinsOnly(pickle.Unpickler):
    _OK = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool")}
    _OK |= {("collections", "defaultdict"), ("collections", "OrderedDict"), ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module        # Python 2 pickles (OFA's df files)
        if (module, name) in self._OK:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a document-frequency pickle")


def save_df(path: str, df: dict, ref_len: float, n: int = 4) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"format": "ofa_ds-cider-df", "n": n, "ref_len": ref_len,
                   "df": {" ".join(g): c for g, c in sorted(df.items())}}, f, ensure_ascii=False)


def load_df(path: str) -> tuple[dict[NGram, float], float]:
    """(df, ref_len) from our JSON or OFA's pickle (`coco-train-words.p`)."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return {tuple(k.split(" ")): float(v) for k, v in d["df"].items()}, float(d["ref_len"])
    with open(path, "rb") as f:
        d = _BuiltinsOnly(f, encoding="latin1").load()
    if not isinstance(d, dict) or "document_frequency" not in d or "ref_len" not in d:
        raise ValueError(f"{path}: expected a dict with 'document_frequency' and 'ref_len'")
    return {tuple(k): float(v) for k, v in d["document_frequency"].items()}, float(d["ref_len"])


def build_df_from_tsv(path: str, col: int, n: int = 4, add_eos: bool = False, lowercase: bool = True,
                      group_col: Optional[int] = None) -> tuple[dict, int]:
    """References from a TSV column ('&&'-joined lists allowed), punctuation-stripped like OFA's caption targets.
    `group_col`: rows sharing this column's value are one document (stage-1 files: one caption per row)."""
    from ofa_ds.data.text import strip_punct_words
    docs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            cols = line.rstrip("\n").split("\t")
            key = cols[group_col] if group_col is not None else str(i)
            for c in cols[col].split("&&"):
                t = strip_punct_words(c.lower() if lowercase else c)
                if add_eos:
                    t = t + " <eos>"
                docs.setdefault(key, []).append(t)
    df, n_docs = document_frequency(docs.values(), n)
    return df, n_docs


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofa_ds.metrics.cider")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-df", help="document frequencies of a reference TSV, for SCST's CIDEr-D reward")
    b.add_argument("--refs", required=True, help="TSV file with the references")
    b.add_argument("--col", type=int, default=2, help="0-based column holding the caption(s) ('&&'-joined)")
    b.add_argument("--group-col", type=int, default=None, help="column whose equal values form one image")
    b.add_argument("--add-eos", action="store_true", help="append ' <eos>' to each reference, as OFA's SCST does")
    b.add_argument("--out", required=True, help="output .json")
    a = p.parse_args(argv)
    df, n_docs = build_df_from_tsv(a.refs, a.col, add_eos=a.add_eos, group_col=a.group_col)
    save_df(a.out, df, n_docs)
    print(json.dumps({"written": a.out, "documents": n_docs, "ngrams": len(df)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
