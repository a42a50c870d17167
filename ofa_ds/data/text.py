"""Text helpers shared by the task builders: OFA's normalisers (docs/ofa.md#text-normalisation), the answer trie,
candidate-file loading, and BART whole-word span masking (text infilling, docs/ofa.md#pretraining-data).

`span_mask` follows fairseq's DenoisingDataset.add_whole_word_mask with replace_length=1 and random_ratio=0:
Poisson(λ) span lengths (table truncated at k<128 or p<1e-7), spans cut to the budget ceil(ratio * word starts),
one <mask> per span, and zero-length spans turned into inserted <mask> tokens. It uses numpy randomness so that a
sample's noise is a function of its seed.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import string
from typing import Iterable, Optional, Sequence

import numpy as np

_WS = re.compile(r"\s{2,}")
_PUNCT = str.maketrans("", "", string.punctuation)


def pre_caption(text: str, max_words: int) -> str:
    t = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ").replace("<person>", "person")
    t = _WS.sub(" ", t).rstrip("\n").strip(" ")
    words = t.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else t


def pre_question(text: str, max_words: int) -> str:
    t = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    t = _WS.sub(" ", t).rstrip("\n").strip(" ")
    words = t.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else t


def strip_punct_words(text: str, max_words: Optional[int] = None) -> str:
    """Caption finetuning target cleaning: drop string.punctuation, split on whitespace, keep max_words."""
    words = text.translate(_PUNCT).strip().split()
    return " ".join(words if max_words is None else words[:max_words])


class Trie:
    """Prefix tree over token-id sequences; `next_tokens(prefix)` lists the allowed continuations."""

    def __init__(self) -> None:
        self.root: dict = {}

    def insert(self, seq: Sequence[int]) -> None:
        node = self.root
        for t in seq:
            node = node.setdefault(int(t), {})

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        node = self.root
        for t in prefix:
            node = node.get(int(t))
            if node is None:
                return []
        return list(node.keys())


class _RestrictedUnpickler(pickle.Unpickler):
    """Only builtin containers and scalars: a users' ans2label.pkl cannot run code."""

    _OK = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool")}

    def find_class(self, module, name):
        if (module, name) in self._OK:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a candidate-answer pickle")


def load_candidates(path: str) -> dict[str, int]:
    """answer -> label from .json (dict, or list = labels in order) or .pkl (restricted unpickler)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f).load()
    else:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    if isinstance(obj, list):
        obj = {a: i for i, a in enumerate(obj)}
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict answer -> label, got {type(obj).__name__}")
    return {str(k): int(v) for k, v in obj.items()}


def build_trie(tok, answers: Iterable[str]) -> Trie:
    """Trie over [bos] + enc(' ' + answer) + [eos] (docs/ofa.md#vqa)."""
    trie = Trie()
    for a in answers:
        trie.insert([tok.bos] + tok.encode(" " + a) + [tok.eos])
    return trie


def constraint_rows(trie: Trie, bos: int, target: Sequence[int], start: int) -> list[Optional[list[int]]]:
    """Per target position: None (all False) before `start`, else trie children of [bos] + target[start:i]."""
    rows: list[Optional[list[int]]] = [None] * len(target)
    for i in range(start, len(target)):
        rows[i] = trie.next_tokens([bos] + list(target[start:i]))
    return rows


# ---- BART whole-word span masking --------------------------------------------------------------------------------
def _poisson_table(lam: float) -> np.ndarray:
    ps, lk, kf = [], 1.0, 1.0
    for k in range(128):
        ps.append(math.exp(-lam) * lk / kf)
        lk *= lam
        kf *= k + 1
        if ps[-1] < 1e-7:
            break
    p = np.asarray(ps, dtype=np.float64)
    return p / p.sum()


def _insert_masks(tokens: np.ndarray, p: float, mask_idx: int, rng: np.random.Generator) -> np.ndarray:
    if p == 0.0:
        return tokens
    n_tok = len(tokens)
    n = int(math.ceil(n_tok * p))
    idx = rng.permutation(n_tok + n - 2)[:n] + 1
    noise = np.zeros(n_tok + n, dtype=bool)
    noise[idx] = True
    out = np.full(n_tok + n, -1, dtype=np.int64)
    out[idx] = mask_idx
    out[~noise] = tokens
    return out


def span_mask(source: Sequence[int], is_word_start: Sequence[bool], ratio: float, lam: float, mask_idx: int,
              rng: np.random.Generator) -> list[int]:
    """Mask `source` (bos ... eos); returns the noised sequence (bos/eos kept)."""
    src = np.asarray(source, dtype=np.int64).copy()
    ws = np.asarray(is_word_start, dtype=np.int64).copy()
    ws[0] = 0
    ws[-1] = 0
    num = int(math.ceil(ws.sum() * ratio))
    if num == 0:
        return src.tolist()
    table = _poisson_table(lam)
    lengths = rng.choice(len(table), size=num, p=table)
    cum = np.cumsum(lengths)
    while cum[-1] < num:
        lengths = np.concatenate([lengths, rng.choice(len(table), size=num, p=table)])
        cum = np.cumsum(lengths)
    i = int(np.searchsorted(cum, num))  # first i with cum[i] >= num
    lengths[i] = num - (0 if i == 0 else cum[i - 1])
    lengths = lengths[: i + 1]
    n_spans = i + 1
    lengths = lengths[lengths > 0]
    n_inserts = n_spans - len(lengths)
    n_spans -= n_inserts
    if n_spans == 0:
        return _insert_masks(src, n_inserts / len(src), mask_idx, rng).tolist()
    starts = np.flatnonzero(ws)
    indices = starts[rng.permutation(len(starts))[:n_spans]]
    lengths = lengths[: len(indices)]
    keep = np.ones(len(src), dtype=bool)
    ws[-1] = 255
    src[indices] = mask_idx
    lengths = lengths - 1
    while len(indices) > 0:
        lengths = lengths - ws[indices + 1]
        unfinished = lengths >= 0
        indices = indices[unfinished] + 1
        lengths = lengths[unfinished]
        keep[indices] = False
    src = src[keep]
    if n_inserts > 0:
        src = _insert_masks(src, n_inserts / len(src), mask_idx, rng)
    return src.tolist()
