"""RefCOCO / RefCOCO+ / RefCOCOg as their authors ship them (the `refer` layout: `refs(unc).p`, `refs(umd).p` or
`refs(google).p` next to `instances.json`, plus the COCO train2014 images) -> OFA's RefCOCO TSVs
(docs/ofa.md#refcoco), one file per split, one row per referring expression.

Unusual points:
  * The refs file is a Python 2 pickle. It is read with `load_plain_pickle` (plain containers and scalars only); a
    pickle that asks for any class or function is refused as a malformed source, never run.
  * Python 2 byte strings arrive latin-1 decoded; text that is really UTF-8 is repaired (`_py2_text`).
  * A ref holds several sentences for one box; OFA splits them into one row each with uniq-id `<ref_id>_<k>`
    (k = the sentence's position in the ref, from 0), as in the OFA README's example row `79_1`.
  * The box comes from `instances.json` (COCO [x, y, w, h] -> x0,y0,x0+w,y0+h, original pixels); an overhang of up
    to one pixel past the image is clipped, more is skipped (the row would fail the task's own box check).
  * Output order: refs by ref_id, sentences in their order; files are named `<dataset>_<split>.tsv` with `refcoco+`
    spelled `refcocoplus` as in OFA's released files.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Iterator, Optional

from . import Format
from .common import (ImportStats, Skip, TSVWriter, box_cell, clean, clip_box, coco_box, embed_image,
                     load_plain_pickle, progress)

DATASETS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}        # dataset -> its usual --split-by
FILE_STEM = {"refcoco": "refcoco", "refcoco+": "refcocoplus", "refcocog": "refcocog"}


def _py2_text(s: Any) -> str:
    """A string from a Python 2 pickle: byte strings were decoded as latin-1, so UTF-8 text shows as mojibake;
    re-decode it when the latin-1 bytes are valid UTF-8."""
    if isinstance(s, bytes):
        s = s.decode("latin-1")
    s = str(s)
    if s.isascii():
        return s
    try:
        return s.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def _image_name(ref_file_name: str) -> str:
    """COCO_train2014_000000581857_16.jpg (image name + _<ann_id>) -> COCO_train2014_000000581857.jpg."""
    stem, ext = os.path.splitext(ref_file_name)
    return re.sub(r"_\d+$", "", stem) + ext


def load_refs(path: str) -> list:
    """The refs pickle as a list of dicts; ValueError naming the file when it is not plain data or not a list."""
    try:
        refs = load_plain_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a plain-data refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, (list, tuple)):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return list(refs)


def load_instances(path: str) -> tuple[dict, dict]:
    """(annotation id -> annotation, image id -> image) from a COCO-style instances.json."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO instances object with an 'annotations' list")
    anns = {a["id"]: a for a in data["annotations"] if isinstance(a, dict) and "id" in a}
    images = {i["id"]: i for i in data.get("images") or [] if isinstance(i, dict) and "id" in i}
    return anns, images


def _box(ann: dict, image: Optional[dict], where: str) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a COCO annotation; Skip when degenerate or (given the image size) off the image."""
    size = None
    if image is not None:
        try:
            size = float(image["width"]), float(image["height"])
        except (KeyError, TypeError, ValueError):
            size = None
    return clip_box(coco_box(ann, where), size, where)


def iter_refs(refs_pickle: str, instances_json: str, stats: Optional[ImportStats] = None,
              splits: Optional[set] = None) -> Iterator[dict]:
    """One dict per referring expression: ref_id, sent_id, uniq_id ('<ref_id>_<k>'), image_id, file_name (the
    COCO image's), sentence (`sent`), raw, box (x0, y0, x1, y1, original pixels, checked against the size given in
    instances.json), split. Order: by ref_id, then sentence order. Only refs of `splits` when given. Records that
    cannot give a row are passed to `stats.skip` (dropped when stats is None). Missing or malformed files raise
    FileNotFoundError / ValueError."""
    anns, images = load_instances(instances_json)
    refs = load_refs(refs_pickle)
    name = os.path.basename(refs_pickle)
    keyed = []
    for i, ref in enumerate(refs):
        rid = ref.get("ref_id") if isinstance(ref, dict) else None
        keyed.append((0 if isinstance(rid, int) else 1, rid if isinstance(rid, int) else i, i, ref))
    keyed.sort(key=lambda t: t[:3])

    def skip(s: Skip) -> None:
        if stats is not None:
            stats.skip(s)

    for _, _, i, ref in keyed:
        where = f"{name} ref #{i}"
        try:
            if not isinstance(ref, dict):
                raise Skip("malformed ref", f"{where}: a {type(ref).__name__}, not a dict")
            missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
            if missing or not isinstance(ref["sentences"], (list, tuple)):
                raise Skip("malformed ref", f"{where}: missing {', '.join(missing) or 'a sentences list'}")
            split = _py2_text(ref["split"])
            if splits is not None and split not in splits:
                continue
            ref_id, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
            where = f"{name} ref_id {ref_id}"
            ann = anns.get(ann_id)
            if ann is None:
                raise Skip("annotation not in instances", f"{where}: ann_id {ann_id}")
            image = images.get(image_id)
            if image is not None and image.get("file_name"):
                file_name = _py2_text(image["file_name"])
            elif ref.get("file_name"):
                file_name = _image_name(_py2_text(ref["file_name"]))
            else:
                raise Skip("image not in instances", f"{where}: image_id {image_id}")
            box = _box(ann, image, where)
        except Skip as s:
            skip(s)
            continue
        for k, sent in enumerate(ref["sentences"]):
            if not isinstance(sent, dict):
                skip(Skip("malformed ref", f"{where}: sentence {k} is a {type(sent).__name__}"))
                continue
            text = clean(_py2_text(sent.get("sent", "")))
            raw = clean(_py2_text(sent.get("raw", "")))
            if not text:
                skip(Skip("empty sentence", f"{where} sentence {k}"))
                continue
            yield {"ref_id": ref_id, "sent_id": sent.get("sent_id"), "uniq_id": f"{ref_id}_{k}",
                   "image_id": image_id, "file_name": file_name, "sentence": text, "raw": raw or text,
                   "box": box, "split": split}


def _add_arguments(p) -> None:
    p.add_argument("--annotations", required=True,
                   help="the dataset's folder from refcoco.zip / refcoco+.zip / refcocog.zip "
                        "(instances.json and refs(<split-by>).p)")
    p.add_argument("--images", required=True, help="COCO train2014 images folder (COCO_train2014_*.jpg)")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="names the output files")
    p.add_argument("--split-by", choices=("unc", "umd", "google"), default=None,
                   help="which refs file to read (default: unc for refcoco/refcoco+, umd for refcocog)")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits to write (default: all in the file, e.g. train,val,testA,testB)")
    p.add_argument("--text", choices=("sent", "raw"), default="sent",
                   help="the expression as `sent` (lower-cased, tokenised) or as written (`raw`)")


def _run(a, stats: ImportStats) -> None:
    split_by = a.split_by or DATASETS[a.dataset]
    refs_path = os.path.join(a.annotations, f"refs({split_by}).p")
    inst_path = os.path.join(a.annotations, "instances.json")
    for p in (inst_path, refs_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(2, "no such file", p)
    if not os.path.isdir(a.images):
        raise FileNotFoundError(2, "no such folder", a.images)
    wanted = set(a.splits.split(",")) if a.splits else None
    by_split: dict[str, list[dict]] = {}
    for r in iter_refs(refs_path, inst_path, stats, wanted):
        by_split.setdefault(r["split"], []).append(r)
    stem = FILE_STEM[a.dataset]
    for split in sorted(by_split):
        rows = by_split[split]
        out = os.path.join(a.out, f"{stem}_{re.sub(r'[^A-Za-z0-9_-]', '_', split)}.tsv")
        cache: tuple[str, Any] = ("", None)       # refs of one image are mostly adjacent: embed (or skip) it once
        with TSVWriter(out, stats) as w:
            for r in progress(rows, len(rows), f"{stem}_{split}"):
                path = os.path.join(a.images, r["file_name"])
                try:
                    if cache[0] != path:
                        try:
                            cache = (path, embed_image(path, a.max_side))
                        except Skip as s:
                            cache = (path, s)
                    img = cache[1]
                    if isinstance(img, Skip):
                        raise img
                    size = (img.width / img.sx, img.height / img.sy)       # the original image's pixels
                    box = clip_box(r["box"], size, f"ref_id {r['ref_id']} on {r['file_name']}")
                except Skip as s:
                    stats.skip(s)
                    continue
                w.write([r["uniq_id"], r["image_id"], r["sentence"] if a.text == "sent" else r["raw"],
                         box_cell(box, img), img.b64])


FORMATS = {"refcoco": Format(
    "RefCOCO / RefCOCO+ / RefCOCOg (refs(unc|umd|google).p + instances.json + COCO train2014 images) -> "
    "<dataset>_<split>.tsv per split", _add_arguments, _run)}
