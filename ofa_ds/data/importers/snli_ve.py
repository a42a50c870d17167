"""SNLI-VE as its authors ship it (`snli_ve_train.jsonl`, `snli_ve_dev.jsonl`, `snli_ve_test.jsonl` + the
Flickr30k images `<Flickr30K_ID>.jpg`) -> OFA's SNLI-VE TSVs (docs/ofa.md#snli-ve): uniq-id (the SNLI pairID, e.g.
`252244149.jpg#1r1n`), image-id (Flickr30K_ID), image, hypothesis (sentence2), premise caption (sentence1), label
(gold_label as written: entailment / neutral / contradiction). One output file per input file
(`snli_ve_dev.jsonl` -> `snli_ve_dev.tsv`), rows in the source's line order.

Records without annotator consensus (gold_label "-") are skipped, as SNLI-VE's own splits already exclude them;
a line that is not JSON is skipped and named `file:line`, not fatal.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

from . import Format
from .common import ImportStats, Skip, TSVWriter, clean, embed_image, progress

LABELS = ("entailment", "neutral", "contradiction")
SPLITS = ("train", "dev", "test")


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def iter_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or Skip) for each non-blank line of a jsonl file."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, Skip("bad JSON line", f"{name}:{n} ({e.msg})")
                continue
            if not isinstance(rec, dict):
                yield n, Skip("bad JSON line", f"{name}:{n} (a {type(rec).__name__}, not an object)")
                continue
            yield n, rec


def record_to_row(rec: dict, where: str) -> tuple[str, str, str, str, str]:
    """(uniq-id, image-id, hypothesis, premise, label) of one SNLI-VE record, or Skip."""
    missing = [k for k in ("Flickr30K_ID", "pairID", "gold_label", "sentence2") if rec.get(k) is None]
    if missing:
        raise Skip("malformed record", f"{where}: no {', '.join(missing)}")
    label = clean(rec["gold_label"])
    if label == "-":
        raise Skip("no gold label", where)
    if label not in LABELS:
        raise Skip("unknown label", f"{where}: {label[:30]!r}")
    hyp = clean(rec["sentence2"])
    if not hyp:
        raise Skip("empty hypothesis", where)
    premise = clean(rec.get("sentence1") or "")
    if not premise:
        raise Skip("empty premise", where)
    image_id, uniq = clean(rec["Flickr30K_ID"]), clean(rec["pairID"])
    if not re.fullmatch(r"\w+", image_id) or not uniq:
        raise Skip("malformed record", f"{where}: Flickr30K_ID {image_id[:30]!r}, pairID {uniq[:30]!r}")
    return uniq, image_id, hyp, premise, label


def _inputs(paths: list[str]) -> list[str]:
    """The jsonl files to read: files as given; a folder gives its snli_ve_{train,dev,test}.jsonl."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = [os.path.join(p, f"snli_ve_{s}.jsonl") for s in SPLITS]
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                raise FileNotFoundError(2, "no snli_ve_{train,dev,test}.jsonl in", p)
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(2, "no such file", p)
    return out


def _add_arguments(p) -> None:
    p.add_argument("--annotations", required=True, nargs="+",
                   help="snli_ve_*.jsonl files, or a folder holding snli_ve_{train,dev,test}.jsonl")
    p.add_argument("--images", required=True, help="Flickr30k images folder (<Flickr30K_ID>.jpg)")


def _run(a, stats: ImportStats) -> None:
    files = _inputs(a.annotations)
    if not os.path.isdir(a.images):
        raise FileNotFoundError(2, "no such folder", a.images)
    outs = [os.path.join(a.out, os.path.splitext(os.path.basename(f))[0] + ".tsv") for f in files]
    if len(set(outs)) != len(outs):
        raise ValueError(f"{', '.join(files)}: two inputs would write the same output file")
    for src, out in zip(files, outs):
        name = os.path.basename(src)
        cache: tuple[str, Any] = ("", None)       # consecutive records mostly share an image: embed (or skip) once
        with TSVWriter(out, stats) as w:
            for n, rec in progress(iter_records(src), _count_lines(src), name):
                try:
                    if isinstance(rec, Skip):
                        raise rec
                    uniq, image_id, hyp, premise, label = record_to_row(rec, f"{name}:{n}")
                    path = os.path.join(a.images, f"{image_id}.jpg")
                    if cache[0] != path:
                        try:
                            cache = (path, embed_image(path, a.max_side))
                        except Skip as s:
                            cache = (path, s)
                    if isinstance(cache[1], Skip):
                        raise cache[1]
                except Skip as s:
                    stats.skip(s)
                    continue
                w.write([uniq, image_id, cache[1].b64, hyp, premise, label])


FORMATS = {"snli_ve": Format(
    "SNLI-VE (snli_ve_{train,dev,test}.jsonl + Flickr30k images) -> snli_ve_{train,dev,test}.tsv",
    _add_arguments, _run)}
