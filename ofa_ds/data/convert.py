"""Converter (image folder + JSONL/CSV annotations -> official TSV) and validator (TSV -> per-row verdicts).

Annotation records (JSONL objects, or CSV rows with a header; in CSV a list is '&&'-joined and a box is
"x0,y0,x1,y1"). `image` is a path relative to --images. Optional fields get sensible defaults.
  caption:     image, caption (str or list -> '&&' references), [id, image_id, objects]
  vqa:         image, question, answer (str) | answers (list, or dict answer -> confidence), [id, image_id, objects]
  refcoco:     image, text, box, [id, image_id]
  snli_ve:     image, hypothesis, premise, label (entailment/neutral/contradiction), [id, image_id]
  imagenet:    image, label (int, 1-based), name
  pretrain_vl: image, type (caption|qa|visual_grounding), caption/text, [question, answer(s), box, gt_objects,
               dataset_name, id]
Conversion streams (one record in memory at a time). Images are stored as their original bytes when they decode
and need no resizing; with --max-side larger images are shrunk (aspect kept, JPEG q95) and boxes scaled with them.
Images are checked by images.decode_image, the loader's decoder, and answers by the tasks' parse_answers, so a
written row passes `validate`.

`validate` reads lines with tsv.split_line and checks them with the task's `read` (or PretrainTask.read_extra):
the very functions the training loader uses, so it reports exactly the rows training would skip
(docs/data.md#bad-rows).
"""
from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from .config import DataConfig
from .images import decode_image, encode_base64_image
from .tasks.base import check_objects, need_caption, need_text, parse_answers, parse_label1
from .text import pre_question
from .tsv import BadRow, split_line

CONVERT_TASKS = ("caption", "vqa", "refcoco", "snli_ve", "imagenet", "pretrain_vl")
EXTRA_VALIDATE = ("pretrain_vl", "pretrain_text", "pretrain_image", "pretrain_detection")


def read_annotations(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, record or exception) for each record of a .jsonl or .csv file."""
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for i, rec in enumerate(csv.DictReader(f), start=2):
                yield i, rec
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRow(f"invalid JSON ({e.msg})", "encoding")


def _clean(s: Any) -> str:
    return " ".join(str(s).replace("\t", " ").split())


def _list(v: Any) -> list[str]:
    if v is None or v == "":
        return []
    items = v if isinstance(v, (list, tuple)) else str(v).split("&&")
    return [c for c in (_clean(x) for x in items) if c]


def _box(v: Any) -> list[float]:
    vals = v if isinstance(v, (list, tuple)) else str(v).split(",")
    try:
        b = [float(x) for x in vals]
    except (TypeError, ValueError):
        raise BadRow(f"bad box {v!r}", "box") from None
    if len(b) != 4 or not all(np.isfinite(b)) or b[2] < b[0] or b[3] < b[1] or min(b) < 0:
        raise BadRow(f"bad box {v!r}", "box")
    return b


def _need(rec: dict, *keys: str) -> list[Any]:
    out = []
    for k in keys:
        if rec.get(k) in (None, ""):
            raise BadRow(f"missing field '{k}'", "text")
        out.append(rec[k])
    return out


def load_image(images_dir: str, name: str, max_side: Optional[int]) -> tuple[str, float, float, int, int]:
    """(base64, x scale, y scale, width, height) of the stored image."""
    path = os.path.join(images_dir, str(name))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise BadRow(f"image not found: {name}", "image") from None
    except OSError as e:
        raise BadRow(f"unreadable image {name}: {str(e)[:60]}", "image") from None
    try:
        img = decode_image(raw)
    except BadRow as e:
        raise BadRow(f"unreadable image {name}: {e}", "image") from None
    w, h = img.size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        resized = img.resize((nw, nh), Image.BICUBIC)
        return encode_base64_image(resized, quality=95), nw / w, nh / h, nw, nh
    return base64.b64encode(raw).decode("ascii"), 1.0, 1.0, w, h


def _answers(rec: dict) -> str:
    a = rec.get("answers", rec.get("answer"))
    if a in (None, "", [], {}):
        raise BadRow("missing field 'answer'", "answer")
    if not isinstance(a, (dict, list)):
        s = str(a)
        if "|!+" in s:
            parse_answers(s)
            return s
        a = _list(s)
    try:
        if isinstance(a, dict):
            items = [(float(c), _clean(k)) for k, c in a.items()]
        else:
            items = [(float(x.get("confidence", 1.0)), _clean(x["answer"])) if isinstance(x, dict) else (1.0, _clean(x))
                     for x in a]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise BadRow(f"bad answers {str(a)[:40]!r} ({type(e).__name__})", "answer") from None
    out = "&&".join(f"{c:g}|!+{t}" for c, t in items)
    parse_answers(out)
    return out


def record_to_row(task: str, rec: Any, n: int, images: str, max_side: Optional[int]) -> list[str]:
    if isinstance(rec, Exception):
        raise rec
    if not isinstance(rec, dict):
        raise BadRow("record is not an object", "columns")
    uid = _clean(rec["id"] if rec.get("id") not in (None, "") else n)
    iid = _clean(rec["image_id"] if rec.get("image_id") not in (None, "") else uid)
    (name,) = _need(rec, "image")
    b64, sx, sy, w, h = load_image(images, name, max_side)
    row = _row(task, rec, uid, iid, b64, sx, sy, w, h)
    _check_cells(task, row)
    return row


def _check_cells(task: str, row: list[str]) -> None:
    """The checks `validate` applies to the columns other than the image (decoded by load_image already)."""
    if task == "caption":
        need_caption(row[2])
        check_objects(row[3])
    elif task == "vqa":
        need_text(row[2], "question", pre_question)
        check_objects(row[4])
    elif task == "refcoco":
        need_text(row[2], "text")
    elif task == "snli_ve":
        need_text(row[3], "hypothesis")
        need_text(row[4], "premise")
    elif task == "imagenet":
        parse_label1(row[1])
        need_text(row[2], "name", lambda t, n: t.strip())
    elif task == "pretrain_vl":
        if row[7] == "qa":
            need_text(row[3], "question", pre_question)
        else:
            need_text(row[2], "caption")
        check_objects(row[5], "gt_objects")


def _row(task: str, rec: dict, uid: str, iid: str, b64: str, sx: float, sy: float, w: int, h: int) -> list[str]:
    if task == "caption":
        caps = _list(_need(rec, "caption")[0])
        return [uid, iid, "&&".join(caps), "&&".join(_list(rec.get("objects"))), b64]
    if task == "vqa":
        (q,) = _need(rec, "question")
        return [uid, iid, _clean(q), _answers(rec), "&&".join(_list(rec.get("objects"))), b64]
    if task == "refcoco":
        text, box = _need(rec, "text", "box")
        b = _box(box)
        b = [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
        if b[2] > w + 0.5 or b[3] > h + 0.5:
            raise BadRow(f"box {box} outside the {w}x{h} image", "box")
        return [uid, iid, _clean(text), ",".join(f"{v:.2f}" for v in b), b64]
    if task == "snli_ve":
        hyp, label = _need(rec, "hypothesis", "label")
        if str(label) not in ("entailment", "neutral", "contradiction"):
            raise BadRow(f"unknown label {label!r}", "label")
        premise = rec.get("premise") if rec.get("premise") not in (None, "") else rec.get("caption")
        if premise in (None, ""):
            raise BadRow("missing field 'premise'", "text")
        return [uid, iid, b64, _clean(hyp), _clean(premise), str(label)]
    if task == "imagenet":
        label, cname = _need(rec, "label", "name")
        try:
            label = int(label)
        except ValueError:
            raise BadRow(f"label {label!r} is not an integer", "label") from None
        return [b64, str(label), _clean(cname)]
    if task == "pretrain_vl":
        (typ,) = _need(rec, "type")
        text = _clean(rec.get("caption", rec.get("text", "")))
        q, refs = "", ""
        if typ == "qa":
            q = _clean(_need(rec, "question")[0])
            refs = _answers(rec)
        elif typ == "visual_grounding":
            b = _box(_need(rec, "box")[0])
            b = [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
            if b[2] > w + 0.5 or b[3] > h + 0.5:
                raise BadRow(f"box {rec['box']} outside the {w}x{h} image", "box")
            refs = ",".join(f"{v:.2f}" for v in b)
        elif typ != "caption":
            raise BadRow(f"unknown type {typ!r}", "text")
        if typ != "qa" and not text:
            raise BadRow("missing field 'caption'", "text")
        return [uid, b64, text, q, refs, "&&".join(_list(rec.get("gt_objects"))),
                _clean(rec.get("dataset_name", "custom")), typ]
    raise ValueError(f"convert supports {CONVERT_TASKS}, not {task!r}")


def convert(task: str, images: str, annotations: str, out: str, max_side: Optional[int] = None,
            stream=None) -> tuple[int, int]:
    """Write `out`; prints one line per rejected record and a summary. Returns (written, rejected)."""
    stream = stream or sys.stdout
    if task not in CONVERT_TASKS:
        raise ValueError(f"convert supports {CONVERT_TASKS}, not {task!r}")
    written = rejected = 0
    tmp = out + ".part"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for n, rec in read_annotations(annotations):
            try:
                row = record_to_row(task, rec, n, images, max_side)
            except BadRow as e:
                rejected += 1
                print(f"{annotations}:{n}: {e}", file=stream)
                continue
            f.write("\t".join(row) + "\n")
            written += 1
    os.replace(tmp, out)
    print(f"wrote {written} rows to {out}; rejected {rejected}", file=stream)
    return written, rejected


def _checker(task: str, cfg: DataConfig):
    """function(all fields of a line) raising BadRow: the loader's rule for `task`."""
    from .tasks import make_task
    from .tasks.pretrain import PretrainTask
    if task in ("pretrain_text", "pretrain_image", "pretrain_detection"):
        pt = PretrainTask(cfg, "valid")
        kind = task.split("_", 1)[1]
        return lambda fields: pt.read_extra(kind, fields)
    if task == "pretrain_vl":
        task = "pretrain"
    cfg.task = task
    return make_task(cfg, "valid").read


def validate(task: str, path: str, selected_cols: Optional[str] = None, stream=None,
             limit: Optional[int] = None) -> tuple[int, int]:
    """Check every row of `path`; prints `file:line: reason [category]` per bad row, the summary
    `file: N rows, M bad` and, when rows are bad, their count per category. Returns (rows, bad)."""
    stream = stream or sys.stdout
    cfg = DataConfig(task=task, selected_cols=selected_cols, augment=False, patch_image_size=64, v2_image_size=64)
    check = _checker(task, cfg)
    rows = bad = 0
    reasons: Counter = Counter()
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if limit is not None and rows >= limit:
                break
            rows += 1
            try:
                check(split_line(raw, first=i == 1))
            except BadRow as e:
                bad += 1
                reasons[e.category] += 1
                print(f"{path}:{i}: {e} [{e.category}]", file=stream)
    print(f"{path}: {rows} rows, {bad} bad", file=stream)
    if bad:
        by = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        print(f"{path}: bad rows by reason: {by}", file=stream)
    return rows, bad
