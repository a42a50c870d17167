"""Caption importers: COCO (Karpathy's `dataset_coco.json` or the official `captions_*2014.json`) and Flickr30k
(Karpathy's `dataset_flickr30k.json`) into OFA's caption layout (docs/ofa.md#captioning):
uniq-id, image-id, caption, object labels (left empty), image.

  * training file (`caption_stage1_train.tsv`): one row per caption; uniq-id = the caption's id (Karpathy `sentid`,
    COCO annotation `id`), image-id = the image's id;
  * evaluation files (`caption_val.tsv`, `caption_test.tsv`): one row per image, uniq-id = image-id, all references
    joined by '&&'. Flickr30k files carry a `flickr30k_` prefix.
Karpathy's train and restval images both go to the training file. COCO image ids are `cocoid` / `id`; Flickr30k has
none, so the file name's stem (the Flickr photo id, e.g. 1000092795) is used.

A caption is the raw sentence (Karpathy: `raw`, else its `tokens` joined), lower-cased (OFA's caption files are
lower-case; its finetuning code does not lower-case them), tabs/newlines/space runs collapsed, '&&' reduced to '&' (it
is the reference separator); punctuation stays (the task strips it when it builds targets). A caption with no word
left once punctuation is stripped is skipped, as the caption task would reject it. Images are sorted by id
(numerically where the ids are numbers), captions keep their order in the source: the same input gives the same
bytes. Each image is read once and its base64 reused for all its caption rows.

`iter_karpathy` and `iter_coco_captions` are the readers, reused by the pretraining importer.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..text import strip_punct_words
from . import Format
from .common import ImportStats, Skip, TSVWriter, clean, embed_image, progress

# Karpathy split -> (file, one row per caption?)
COCO_FILES = {"train": ("caption_stage1_train.tsv", True), "restval": ("caption_stage1_train.tsv", True),
              "val": ("caption_val.tsv", False), "test": ("caption_test.tsv", False)}
FLICKR_FILES = {k: ("flickr30k_" + name, per_caption) for k, (name, per_caption) in COCO_FILES.items()}


@dataclass
class CaptionedImage:
    split: str                          # Karpathy split (train/restval/val/test); "" for a COCO captions file
    path: str                           # image file relative to the images folder ('/'-separated)
    image_id: str
    captions: list[tuple[str, str]] = field(default_factory=list)       # (caption id, caption text)


def caption_text(raw: Any) -> str:
    """The caption cell for a raw sentence ("" when nothing would be left to train on)."""
    text = clean(raw).lower()
    while "&&" in text:
        text = text.replace("&&", "&")
    return text if strip_punct_words(text) else ""


def load_json(path: str) -> Any:
    """The parsed file; ValueError naming the file when it is not JSON (FileNotFoundError when missing)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None


def _id_key(image_id: str) -> tuple[int, int, str]:
    return (0, int(image_id), "") if image_id.isdigit() else (1, 0, image_id)


def _safe_relpath(p: Any) -> Optional[str]:
    """A relative path inside the images folder, or None (empty, absolute, or climbing out with '..')."""
    if not isinstance(p, str) or not p.strip():
        return None
    norm = posixpath.normpath(p.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or os.path.isabs(p):
        return None
    return norm


def _scalar_id(v: Any) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        return None
    s = clean(v)
    return s or None


def _sorted_unique(images: list[CaptionedImage], where: str, stats: ImportStats) -> list[CaptionedImage]:
    """Images by id; a repeated id keeps the first record (in source order) and skips the others."""
    order = sorted(range(len(images)), key=lambda i: (_id_key(images[i].image_id), i))
    out, seen = [], set()
    for i in order:
        im = images[i]
        if im.image_id in seen:
            stats.skip(Skip("duplicate image id", f"{where}: image id {im.image_id} ({im.path})"))
            continue
        seen.add(im.image_id)
        out.append(im)
    return out


def _keep_captioned(images: list[CaptionedImage], where: str, stats: ImportStats) -> list[CaptionedImage]:
    out = []
    for im in images:
        if im.captions:
            out.append(im)
        else:
            stats.skip(Skip("no captions", f"{where}: image id {im.image_id} ({im.path})"))
    return out


def read_karpathy(json_path: str, stats: ImportStats) -> list[CaptionedImage]:
    """The captioned images of a Karpathy split file (dataset_coco.json / dataset_flickr30k.json), sorted by id."""
    data = load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected an object with an 'images' list (a Karpathy split file)")
    name = os.path.basename(json_path)
    images = []
    for i, rec in enumerate(data["images"]):
        where = f"{name}: images[{i}]"
        if not isinstance(rec, dict):
            stats.skip(Skip("malformed record", f"{where}: not an object"))
            continue
        fname, folder = rec.get("filename"), rec.get("filepath", "")
        ok = isinstance(fname, str) and fname.strip() and isinstance(folder, str)
        rel = _safe_relpath(posixpath.join(folder, fname)) if ok else None
        if not rel:
            stats.skip(Skip("malformed record", f"{where}: bad filename/filepath "
                                                f"{rec.get('filepath')!r}/{rec.get('filename')!r}"))
            continue
        split = rec.get("split")
        if split not in COCO_FILES:
            stats.skip(Skip("malformed record", f"{where}: split {split!r} is not train/restval/val/test"))
            continue
        image_id = _scalar_id(rec["cocoid"]) if "cocoid" in rec else posixpath.splitext(posixpath.basename(rel))[0]
        sents = rec.get("sentences")
        if not image_id or not isinstance(sents, list):
            what = "cocoid" if not image_id else "'sentences' is not a list"
            stats.skip(Skip("malformed record", f"{where}: bad {what}"))
            continue
        im = CaptionedImage(split, rel, image_id)
        for k, s in enumerate(sents):
            swhere = f"{where}.sentences[{k}]"
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(str(t) for t in s["tokens"])
            if not isinstance(raw, str):
                stats.skip(Skip("malformed record", f"{swhere}: no 'raw' text"))
                continue
            text = caption_text(raw)
            if not text:
                stats.skip(Skip("empty caption", f"{swhere} (image id {image_id}): {raw!r}"))
                continue
            cid = _scalar_id(s.get("sentid")) or f"{image_id}_{k}"
            im.captions.append((cid, text))
        images.append(im)
    return _keep_captioned(_sorted_unique(images, name, stats), name, stats)


def read_coco_captions(json_path: str, stats: ImportStats) -> list[CaptionedImage]:
    """The captioned images of an official COCO captions file (captions_train2014.json ...), sorted by id;
    captions of one image in annotation order."""
    data = load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{json_path}: expected an object with 'images' and 'annotations' lists "
                         f"(a COCO captions file such as captions_val2014.json)")
    name = os.path.basename(json_path)
    images, by_id = [], {}
    for i, rec in enumerate(data["images"]):
        where = f"{name}: images[{i}]"
        rel = _safe_relpath(rec.get("file_name")) if isinstance(rec, dict) else None
        image_id = _scalar_id(rec.get("id")) if isinstance(rec, dict) else None
        if not rel or not image_id:
            what = "not an object" if not isinstance(rec, dict) else "bad 'id'" if not image_id else \
                f"bad file_name {rec.get('file_name')!r}"
            stats.skip(Skip("malformed record", f"{where}: {what}"))
            continue
        im = CaptionedImage("", rel, image_id)
        images.append(im)
        by_id.setdefault(image_id, im)
    for i, ann in enumerate(data["annotations"]):
        where = f"{name}: annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            stats.skip(Skip("malformed record", f"{where}: " + ("not an object" if not isinstance(ann, dict)
                                                                 else "no 'caption' text")))
            continue
        image_id = _scalar_id(ann.get("image_id"))
        im = by_id.get(image_id) if image_id else None
        if im is None:
            stats.skip(Skip("malformed record", f"{where}: image_id {ann.get('image_id')!r} is not in 'images'"))
            continue
        text = caption_text(ann["caption"])
        if not text:
            stats.skip(Skip("empty caption", f"{where} (image id {image_id}): {ann['caption']!r}"))
            continue
        im.captions.append((_scalar_id(ann.get("id")) or f"{image_id}_{len(im.captions)}", text))
    return _keep_captioned(_sorted_unique(images, name, stats), name, stats)


def iter_karpathy(json_path: str, stats: Optional[ImportStats] = None) -> Iterator[tuple[str, str, str, list[str]]]:
    """(split, image path relative to the images root, image id, captions) per captioned image of a Karpathy split
    file, sorted by image id. Skipped records are reported to `stats` (a fresh one that logs to stderr if None)."""
    for im in read_karpathy(json_path, stats if stats is not None else ImportStats()):
        yield im.split, im.path, im.image_id, [t for _, t in im.captions]


def iter_coco_captions(json_path: str, stats: Optional[ImportStats] = None) -> Iterator[tuple[str, str, list[str]]]:
    """(image file name, image id, captions) per captioned image of a COCO captions file, sorted by image id."""
    for im in read_coco_captions(json_path, stats if stats is not None else ImportStats()):
        yield im.path, im.image_id, [t for _, t in im.captions]


def write_caption_files(images: list[CaptionedImage], files: dict[str, tuple[str, bool]], root: str, out: str,
                        max_side: Optional[int], stats: ImportStats, desc: str) -> None:
    """Write the caption layout: `files` maps an image's split to (file name, one row per caption?)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "images folder not found", root)
    with contextlib.ExitStack() as stack:
        writers = {}
        for fname in sorted({f for f, _ in files.values()}):
            writers[fname] = stack.enter_context(TSVWriter(os.path.join(out, fname), stats))
        for im in progress(images, len(images), desc):
            fname, per_caption = files[im.split]
            try:
                img = embed_image(os.path.join(root, *im.path.split("/")), max_side)
            except Skip as s:
                stats.skip(Skip(s.reason, f"{s.detail}; image id {im.image_id}, {len(im.captions)} captions"))
                continue
            w = writers[fname]
            if per_caption:
                for cid, text in im.captions:
                    w.write([cid, im.image_id, text, "", img.b64])
            else:
                w.write([im.image_id, im.image_id, "&&".join(t for _, t in im.captions), "", img.b64])


# ---- the FORMATS entries -------------------------------------------------------------------------------------------

def _args_karpathy(what: str):
    def add(p) -> None:
        p.add_argument("--annotations", required=True, help=f"Karpathy's split file ({what})")
        p.add_argument("--images", required=True,
                       help="images root: COCO images at ROOT/filepath/filename (ROOT holds train2014/, val2014/); "
                            "Flickr30k images at ROOT/filename")
    return add


def _args_coco(p) -> None:
    p.add_argument("--annotations", required=True, help="captions_train2014.json, captions_val2014.json, ...")
    p.add_argument("--images", required=True, help="the folder of that file's images (file_name is relative to it)")
    p.add_argument("--split", required=True, choices=["train", "val", "test"],
                   help="train: caption_stage1_train.tsv, one row per caption; val/test: caption_val.tsv / "
                        "caption_test.tsv, one row per image with its references joined by '&&'")


def _run_karpathy(files):
    def run(args, stats: ImportStats) -> None:
        images = read_karpathy(args.annotations, stats)
        write_caption_files(images, files, args.images, args.out, args.max_side, stats,
                            os.path.basename(args.annotations))
    return run


def _run_coco(args, stats: ImportStats) -> None:
    images = read_coco_captions(args.annotations, stats)
    for im in images:
        im.split = args.split
    write_caption_files(images, {args.split: COCO_FILES[args.split]}, args.images, args.out, args.max_side, stats,
                        os.path.basename(args.annotations))


FORMATS = {
    "coco_karpathy": Format("COCO captions, Karpathy split (dataset_coco.json) -> caption_stage1_train.tsv "
                            "(train+restval), caption_val.tsv, caption_test.tsv",
                            _args_karpathy("dataset_coco.json"), _run_karpathy(COCO_FILES)),
    "coco_captions": Format("COCO captions, official captions_*.json -> the caption file of --split",
                            _args_coco, _run_coco),
    "flickr30k": Format("Flickr30k captions, Karpathy split (dataset_flickr30k.json) -> "
                        "flickr30k_caption_stage1_train.tsv, flickr30k_caption_val.tsv, flickr30k_caption_test.tsv",
                        _args_karpathy("dataset_flickr30k.json"), _run_karpathy(FLICKR_FILES)),
}
