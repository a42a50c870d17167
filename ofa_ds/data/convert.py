"""Converter (image folder + JSONL/CSV annotations -> official TSV) and validator (TSV -> per-row verdicts).

Annotation records (JSONL objects, or CSV rows with a header; in CSV a list is '&&'-joined and a box is
"x0,y0,x1,y1"). `image` is a path relative to --images. Optional fields get sensible defaults.
  caption:     image, caption (str or list -> '&&' references), [id, image_id, objects]
  vqa:         image, question, answer (str) | answers (list, or dict answer -> confidence), [id, image_id, objects]
  refcoco:     image, text, box, [id, image_id]
  snli_ve:     image, hypothesis, label (entailment/neutral/contradiction), [premise, id, image_id]
  imagenet:    image, label (int, 1-based), name
  pretrain_vl: image, type (caption|qa|visual_grounding), caption/text, [question, answer(s), box, gt_objects,
               dataset_name, id]
Conversion streams (one record in memory at a time). Images are stored as their original bytes when they decode
and need no resizing; with --max-side larger images are shrunk (aspect kept, JPEG q95) and boxes scaled with them.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from .config import DataConfig
from .images import encode_base64_image
from .tsv import BadRow

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
                yield i, BadRow(f"invalid JSON ({e.msg})")


def _clean(s: Any) -> str:
    return " ".join(str(s).replace("\t", " ").split())


def _list(v: Any) -> list[str]:
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return [_clean(x) for x in str(v).split("&&")]


def _box(v: Any) -> list[float]:
    vals = v if isinstance(v, (list, tuple)) else str(v).split(",")
    try:
        b = [float(x) for x in vals]
    except (TypeError, ValueError):
        raise BadRow(f"bad box {v!r}") from None
    if len(b) != 4 or b[2] < b[0] or b[3] < b[1] or min(b) < 0:
        raise BadRow(f"bad box {v!r}")
    return b


def _need(rec: dict, *keys: str) -> list[Any]:
    out = []
    for k in keys:
        if rec.get(k) in (None, ""):
            raise BadRow(f"missing field '{k}'")
        out.append(rec[k])
    return out


def load_image(images_dir: str, name: str, max_side: Optional[int]) -> tuple[str, float, float, int, int]:
    """(base64, x scale, y scale, width, height) of the stored image."""
    path = os.path.join(images_dir, str(name))
    try:
        with open(path, "rb") as f:
            raw = f.read()
        img = Image.open(io.BytesIO(raw))
        img.load()
    except FileNotFoundError:
        raise BadRow(f"image not found: {name}") from None
    except OSError as e:
        raise BadRow(f"unreadable image {name}: {str(e)[:60]}") from None
    w, h = img.size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        resized = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
        return encode_base64_image(resized, quality=95), nw / w, nh / h, nw, nh
    return base64.b64encode(raw).decode("ascii"), 1.0, 1.0, w, h


def _answers(rec: dict) -> str:
    a = rec.get("answers", rec.get("answer"))
    if a in (None, "", [], {}):
        raise BadRow("missing field 'answer'")
    if isinstance(a, dict):
        items = [(float(c), _clean(k)) for k, c in a.items()]
    elif isinstance(a, list):
        items = []
        for x in a:
            if isinstance(x, dict):
                items.append((float(x.get("confidence", 1.0)), _clean(x["answer"])))
            else:
                items.append((1.0, _clean(x)))
    else:
        s = str(a)
        if "|!+" in s:
            return s
        items = [(1.0, x) for x in _list(s)]
    return "&&".join(f"{c:g}|!+{t}" for c, t in items)


def record_to_row(task: str, rec: Any, n: int, images: str, max_side: Optional[int]) -> list[str]:
    if isinstance(rec, Exception):
        raise rec
    if not isinstance(rec, dict):
        raise BadRow("record is not an object")
    uid = _clean(rec.get("id", n))
    iid = _clean(rec.get("image_id", uid))
    (name,) = _need(rec, "image")
    b64, sx, sy, w, h = load_image(images, name, max_side)
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
            raise BadRow(f"box {box} outside the {w}x{h} image")
        return [uid, iid, _clean(text), ",".join(f"{v:.2f}" for v in b), b64]
    if task == "snli_ve":
        hyp, label = _need(rec, "hypothesis", "label")
        if str(label) not in ("entailment", "neutral", "contradiction"):
            raise BadRow(f"unknown label {label!r}")
        return [uid, iid, b64, _clean(hyp), _clean(rec.get("premise", rec.get("caption", ""))), str(label)]
    if task == "imagenet":
        label, cname = _need(rec, "label", "name")
        try:
            label = int(label)
        except ValueError:
            raise BadRow(f"label {label!r} is not an integer") from None
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
            refs = ",".join(f"{v:.2f}" for v in (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy))
        elif typ != "caption":
            raise BadRow(f"unknown type {typ!r}")
        if typ != "qa" and not text:
            raise BadRow("missing field 'caption'")
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


def _validator(task: str, cfg: DataConfig):
    """(function(row) raising BadRow, selected cols) for a task name."""
    from .tasks import make_task
    from .tasks.pretrain import PretrainTask
    if task in ("pretrain_text", "pretrain_image", "pretrain_detection"):
        pt = PretrainTask(cfg, "train")
        rng = np.random.default_rng(0)
        if task == "pretrain_text":
            def check(row):
                if len(row) != 2:
                    raise BadRow(f"expected 2 columns, got {len(row)}")
                pt.text_sample(0, row[1], rng)
        elif task == "pretrain_image":
            def check(row):
                pt.image_sample(0, row)
        else:
            def check(row):
                pt.detection_sample(0, row, rng)
        return check, None
    if task == "pretrain_vl":
        task = "pretrain"
    cfg.task = task
    t = make_task(cfg, "valid")
    return t.check_row, t.cols


def validate(task: str, path: str, selected_cols: Optional[str] = None, stream=None,
             limit: Optional[int] = None) -> tuple[int, int]:
    """Check every row of `path`; prints `file:line: reason` per bad row and a summary. Returns (rows, bad)."""
    stream = stream or sys.stdout
    cfg = DataConfig(task=task, selected_cols=selected_cols, augment=False, patch_image_size=64, v2_image_size=64)
    check, cols = _validator(task, cfg)
    rows = bad = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if limit is not None and rows >= limit:
                break
            rows += 1
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            fields = line.split("\t")
            try:
                if cols is not None:
                    if max(cols) >= len(fields):
                        raise BadRow(f"has {len(fields)} columns, needs column {max(cols)}")
                    fields = [fields[c] for c in cols]
                check(fields)
            except BadRow as e:
                bad += 1
                print(f"{path}:{i}: {e}", file=stream)
    print(f"{path}: {rows} rows, {bad} bad", file=stream)
    return rows, bad
