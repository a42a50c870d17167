"""OFA's pretraining files (docs/ofa.md#pretraining-data) from public annotations:

  * `pretrain_vl`: vision_language_examples.tsv (uniq-id, image, caption, question, refs, gt_objects, dataset_name,
    type) from image-text pairs (Karpathy split file, COCO captions_*.json, or a JSONL of {image, caption}), VQA v2
    (questions + annotations) and RefCOCO-style grounding (refs pickle + instances.json), plus negative_sample/ with
    all_captions.txt, object.txt and type2ans.json, the three files the pretraining task draws ITM negatives from;
  * `pretrain_detection`: detection_examples.tsv (uniq-id, image, '&&'-joined 'x0,y0,x1,y1,cat_id,name') from a
    COCO-style instances.json;
  * `pretrain_text`: text_examples.tsv (uniq-id, text) from plain text files, one document per line or per paragraph,
    streamed.
image_examples.tsv is not written: its third column holds the VQGAN codes of the image's centre, and computing them
needs the VQGAN tokenizer, which ofa_ds does not ship.

Unusual points:
  * The source parsers are the task importers' own (`captions.iter_karpathy` / `iter_coco_captions`,
    `vqa.read_questions` with its `ImageIndex`, `refcoco.iter_refs` and `clip_box`); this module only turns their
    records into pretraining rows. Answers and confidences are therefore the VQA importer's (official answer
    normalisation, VQA accuracy against the ten human answers, best first), grounding boxes the RefCOCO importer's.
  * gt_objects of a row are the object words found in its text (as pre_caption normalises it, whole words, plural
    's'/'es' allowed), because the ITM negative replaces that word in the caption; the vocabulary is the category
    names of a COCO instances.json (--instances, else the grounding source's). A JSONL pair may name its own objects
    (kept only when they occur in its caption). object.txt = that vocabulary plus every object written.
  * type2ans.json maps an answer type to the answers whose best-confidence answer carries it: VQA's answer_type
    'yes/no' stays, 'number' becomes 'how many' (the type the pretraining task shifts by +-1), each answer under the
    type it has most often; 'other' is the catch-all pool of every best answer (the task draws untyped negatives
    from it and never types its members). The VQA reader does not pass answer_type on, so the type is taken from
    the answer itself (yes/no; digits = 'how many'; else 'other'), which agrees with answer_type for nearly all.
  * By default only training images enter: Karpathy train+restval, RefCOCO train; the VQA files are whichever the
    user passes (pass the train2014 ones to keep val images out of pretraining).
  * Rows come out source by source (the pretraining loader shuffles per epoch), deterministic for the same input.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import zlib
from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator, Optional

from ..text import pre_caption
from . import Format
from .captions import caption_text, iter_coco_captions, iter_karpathy, load_json
from .common import (EmbeddedImage, ImportStats, Skip, TSVWriter, box_cell, clean, clip_box, coco_box, embed_image,
                     progress)
from .refcoco import iter_refs
from .vqa import ImageIndex, read_questions

VL_FILE, DET_FILE, TEXT_FILE = "vision_language_examples.tsv", "detection_examples.tsv", "text_examples.tsv"
NEG_DIR = "negative_sample"
# VQA answer_type -> the type name in type2ans.json ('how many' answers get the +-1 negatives in the pretraining task)
ANSWER_TYPES = {"yes/no": "yes/no", "number": "how many", "other": "other"}


# ---- shared helpers ------------------------------------------------------------------------------------------------

def write_atomic(path: str, text: str) -> None:
    """A small side file (negative_sample/*) written whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def need_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(2, "no such folder", path)


def need_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such file", path)


class ImageCache:
    """Embeds an image once for consecutive rows of the same file (a Skip is remembered the same way)."""

    def __init__(self, max_side: Optional[int]):
        self.max_side, self.path, self.value = max_side, None, None

    def get(self, path: str) -> EmbeddedImage:
        if path != self.path:
            try:
                self.value = embed_image(path, self.max_side)
            except Skip as s:
                self.value = s
            self.path = path
        if isinstance(self.value, Skip):
            raise self.value
        return self.value


def _id_key(v: Any) -> tuple:
    s = str(v)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


# ---- object words (gt_objects, object.txt) ---------------------------------------------------------------------------

def category_names(instances_json: str, data: Any = None) -> dict[int, str]:
    """category id -> name of a COCO-style instances.json (`data`: the file already parsed); ValueError naming the
    file when it has no 'categories' list."""
    data = load_json(instances_json) if data is None else data
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list):
        raise ValueError(f"{instances_json}: expected a COCO instances object with a 'categories' list")
    out = {}
    for c in cats:
        if isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) \
                and clean(c["name"]):
            out[c["id"]] = clean(c["name"])
    return out


def object_word(name: str) -> str:
    """An object word as the pretraining task sees text: pre_caption-normalised, no '&&' (the list separator)."""
    return pre_caption(clean(name).replace("&&", " "), 10_000)


class ObjectMatcher:
    """Finds vocabulary words in a text (whole words, an 's'/'es' plural allowed), longest names first."""

    def __init__(self, words: Iterable[str]):
        self.words = sorted({w for w in (object_word(x) for x in words) if w})
        alts = sorted(self.words, key=lambda w: (-len(w), w))
        self.rx = re.compile(r"(?<![\w])(" + "|".join(map(re.escape, alts)) + r")(?:e?s)?(?![\w])") if alts else None

    def find(self, text: str) -> list[str]:
        if self.rx is None:
            return []
        out: list[str] = []
        for m in self.rx.finditer(pre_caption(text, 10_000)):
            if m.group(1) not in out:
                out.append(m.group(1))
        return out


def present_objects(text: str, names: Iterable[str]) -> list[str]:
    """The given object words that occur in `text` (as the task's word replacement needs them to)."""
    t = " " + pre_caption(text, 10_000) + " "
    out: list[str] = []
    for n in names:
        w = object_word(n)
        if w and w not in out and re.search(r"(?<![\w])" + re.escape(w) + r"(?:e?s)?(?![\w])", t):
            out.append(w)
    return out


# ---- pretrain_detection ---------------------------------------------------------------------------------------------

def read_instances(path: str, stats: ImportStats, keep_crowd: bool = False):
    """(images sorted by id as (image id, file name), image id -> [(box, cat id, name)], the category names)."""
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ValueError(f"{path}: expected a COCO instances object with 'images', 'annotations' and 'categories' "
                         f"lists (such as instances_train2017.json)")
    name = os.path.basename(path)
    cats = category_names(path, data)
    images, seen = [], set()
    for i, im in enumerate(data["images"]):
        fn = im.get("file_name") if isinstance(im, dict) else None
        iid = im.get("id") if isinstance(im, dict) else None
        if not isinstance(fn, str) or not fn.strip() or isinstance(iid, bool) or not isinstance(iid, (int, str)):
            stats.skip(Skip("malformed record", f"{name}: images[{i}]: needs 'id' and 'file_name'"))
            continue
        if iid in seen:
            stats.skip(Skip("duplicate image id", f"{name}: images[{i}]: id {iid}"))
            continue
        seen.add(iid)
        images.append((iid, fn))
    images.sort(key=lambda t: _id_key(t[0]))
    boxes: dict[Any, list] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        where = f"{name}: annotations[{i}]"
        try:
            if not isinstance(ann, dict) or ann.get("image_id") not in seen:
                raise Skip("malformed record", f"{where}: " + ("not an object" if not isinstance(ann, dict) else
                                                               f"image_id {ann.get('image_id')!r} not in 'images'"))
            if ann.get("iscrowd") and not keep_crowd:
                raise Skip("crowd box", f"{where} (image {ann['image_id']})")
            cid = ann.get("category_id")
            if cid not in cats:
                raise Skip("unknown category", f"{where}: category_id {cid!r}")
            boxes[ann["image_id"]].append((coco_box(ann, where), cid, cats[cid]))
        except Skip as s:
            stats.skip(s)
    return images, boxes, cats


def detection_cell(objs: list, img: EmbeddedImage, where: str, stats: ImportStats) -> str:
    """'&&'-joined 'x0,y0,x1,y1,cat_id,name' in the stored image's pixels; boxes clipped to the image (an overhang
    over one pixel, or nothing left, skips that box)."""
    size = (img.width / img.sx, img.height / img.sy)
    items = []
    for box, cid, cname in objs:
        try:
            b = clip_box(box, size, where)
        except Skip as s:
            stats.skip(s)
            continue
        items.append(f"{box_cell(b, img)},{cid},{clean(cname).replace('&&', '&')}")
    return "&&".join(items)


def run_detection(a, stats: ImportStats) -> None:
    need_file(a.instances)
    need_dir(a.images)
    images, boxes, _ = read_instances(a.instances, stats, a.keep_crowd)
    out = os.path.join(a.out, DET_FILE)
    with TSVWriter(out, stats) as w:
        for iid, fn in progress(images, len(images), DET_FILE):
            where = f"image {iid} ({fn})"
            objs = boxes.get(iid)
            try:
                if not objs:
                    raise Skip("image without boxes", where)
                img = embed_image(os.path.join(a.images, fn), a.max_side)
                cell = detection_cell(objs, img, where, stats)
                if not cell:
                    raise Skip("image without boxes", f"{where}: none left inside the image")
            except Skip as s:
                stats.skip(s)
                continue
            w.write([iid, img.b64, cell])


# ---- pretrain_text -------------------------------------------------------------------------------------------------

def text_files(paths: list[str]) -> list[str]:
    """Files as given; a folder stands for every non-hidden file under it, in sorted order."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
        else:
            need_file(p)
            out.append(p)
    return out


def iter_documents(path: str, unit: str, stats: ImportStats) -> Iterator[str]:
    """Documents of one text file (.gz read as gzip): each non-blank line, or each blank-line-separated paragraph
    (its lines joined by a space). A document with a line that is not UTF-8 is skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    name = os.path.basename(path)
    para: list[str] = []
    first, bad = 0, False
    with opener(path, "rb") as f, _corrupt_gzip_is_malformed(path):
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                line = None
            if line is not None and not line.strip() and unit == "paragraph":
                if para or bad:
                    yield from _document(para, bad, f"{name}:{first}", stats)
                para, bad = [], False
                continue
            if not para and not bad:
                first = n
            if line is None:
                bad = True
            else:
                para.append(line)
            if unit == "line":
                yield from _document(para, bad, f"{name}:{n}", stats)
                para, bad = [], False
    if para or bad:
        yield from _document(para, bad, f"{name}:{first}", stats)


@contextlib.contextmanager
def _corrupt_gzip_is_malformed(path: str):
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({type(e).__name__}: {e})") from None


def _document(lines: list[str], bad: bool, where: str, stats: ImportStats) -> Iterator[str]:
    if bad:
        stats.skip(Skip("not UTF-8", where))
        return
    doc = clean(" ".join(lines))
    if doc:
        yield doc


def run_text(a, stats: ImportStats) -> None:
    files = text_files(a.text)
    out = os.path.join(a.out, TEXT_FILE)

    def docs():
        for p in files:
            yield from iter_documents(p, a.unit, stats)

    with TSVWriter(out, stats) as w:
        for n, doc in enumerate(progress(docs(), None, TEXT_FILE)):
            w.write([n, doc])


# ---- pretrain_vl ---------------------------------------------------------------------------------------------------

class VLWriter:
    """vision_language_examples.tsv rows plus what negative_sample/ is made of."""

    def __init__(self, w: TSVWriter, matcher: ObjectMatcher):
        self.w, self.matcher = w, matcher
        self.captions: set[str] = set()
        self.objects: set[str] = set()
        self.answer_types: dict[str, Counter] = defaultdict(Counter)

    def row(self, uid: str, img: EmbeddedImage, caption: str, question: str, refs: str, objects: list[str],
            dataset: str, typ: str) -> None:
        self.objects.update(objects)
        self.w.write([uid, img.b64, caption, question, refs, "&&".join(objects), dataset, typ])

    def caption(self, uid: str, img: EmbeddedImage, text: str, dataset: str, objects: Optional[list] = None) -> None:
        objs = self.matcher.find(text) if objects is None else present_objects(text, objects)
        self.captions.add(clean(text))
        self.row(uid, img, text, "", "", objs, dataset, "caption")

    def negative_sample(self, out_dir: str) -> None:
        d = os.path.join(out_dir, NEG_DIR)
        caps = sorted(self.captions)
        objs = sorted(set(self.matcher.words) | self.objects)
        type2ans: dict[str, list[str]] = {}
        for ans, types in sorted(self.answer_types.items()):
            t = min(types, key=lambda k: (-types[k], k))
            if t != "other":
                type2ans.setdefault(t, []).append(ans)
        type2ans["other"] = sorted(self.answer_types)
        write_atomic(os.path.join(d, "all_captions.txt"), "".join(c + "\n" for c in caps))
        write_atomic(os.path.join(d, "object.txt"), "".join(o + "\n" for o in objs))
        write_atomic(os.path.join(d, "type2ans.json"), json.dumps(type2ans, indent=1, sort_keys=True) + "\n")


def _caption_images(a, stats: ImportStats) -> Iterator[tuple[str, str, str, list[str], str]]:
    """(source tag, image path, image id, captions, dataset name) of the caption sources, in a fixed order."""
    if a.karpathy:
        splits = set(a.karpathy_splits.split(","))
        name = a.karpathy_name or ("flickr30k" if "flickr" in os.path.basename(a.karpathy).lower() else "coco")
        for split, rel, iid, caps in iter_karpathy(a.karpathy, stats):
            if split in splits:
                yield "cap", os.path.join(a.karpathy_images, *rel.split("/")), iid, caps, name
    if a.coco_captions:
        for fn, iid, caps in iter_coco_captions(a.coco_captions, stats):
            yield "cap", os.path.join(a.coco_images, *fn.split("/")), iid, caps, a.coco_name


def _pairs(a, stats: ImportStats) -> Iterator[tuple[int, str, list[str], Optional[list[str]], str]]:
    """(line, image path, captions, objects or None, dataset name) of the JSONL pairs file, streamed."""
    name = os.path.basename(a.pairs)
    with open(a.pairs, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{name}:{n}"
            if not raw.strip():
                continue
            try:
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise Skip("malformed record", f"{where}: not a JSON object ({getattr(e, 'msg', e)})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"].strip():
                    raise Skip("malformed record", f"{where}: needs 'image' (a path) and 'caption'")
                raw_caps = rec.get("caption", rec.get("captions"))
                raw_caps = raw_caps if isinstance(raw_caps, list) else [raw_caps]
                if not all(isinstance(c, str) for c in raw_caps):
                    raise Skip("malformed record", f"{where}: 'caption' must be text or a list of texts")
                caps = [caption_text(c) for c in raw_caps]
                for k in range(len(caps) if len(caps) > 1 else 0):
                    if not caps[k]:
                        stats.skip(Skip("empty caption", f"{where}: caption {k}"))
                caps = [t for t in caps if t]
                if not caps:
                    raise Skip("empty caption", where)
                objs = rec.get("gt_objects", rec.get("objects"))
                if objs is not None:
                    objs = [str(o) for o in objs] if isinstance(objs, list) else str(objs).split("&&")
                ds = clean(rec.get("dataset_name") or a.pairs_name)
            except Skip as s:
                stats.skip(s)
                continue
            yield n, os.path.join(a.pairs_images, rec["image"]), caps, objs, ds


def _answers_cell(answers: Iterable[tuple[str, float]]) -> str:
    """'conf|!+answer&&...' as the VQA importer writes it (best first)."""
    return "&&".join(f"{c}|!+{t}" for t, c in answers)


def _write_captions(a, vl: VLWriter, cache: ImageCache, stats: ImportStats) -> None:
    for tag, path, iid, caps, ds in progress(_caption_images(a, stats), None, "captions"):
        try:
            img = cache.get(path)
        except Skip as s:
            stats.skip(Skip(s.reason, f"{s.detail}; image id {iid}, {len(caps)} captions"))
            continue
        for k, text in enumerate(caps):
            vl.caption(f"{tag}{iid}_{k}", img, text, ds)
    if a.pairs:
        for n, path, caps, objs, ds in progress(_pairs(a, stats), None, os.path.basename(a.pairs)):
            try:
                img = cache.get(path)
            except Skip as s:
                stats.skip(Skip(s.reason, f"{s.detail}; {os.path.basename(a.pairs)}:{n}"))
                continue
            for k, text in enumerate(caps):
                vl.caption(f"pair{n}_{k}", img, text, ds, objs)


def _vqa_type(q: Any, answer: str) -> str:
    """type2ans.json type of a question's best answer: from VQA's answer_type where the record carries it, else
    from the answer itself (yes/no, digits = 'how many', anything else 'other')."""
    t = getattr(q, "answer_type", None)
    if isinstance(t, str) and t in ANSWER_TYPES:
        return ANSWER_TYPES[t]
    if answer in ("yes", "no"):
        return "yes/no"
    return "how many" if answer.isdigit() else "other"


def _write_vqa(a, vl: VLWriter, cache: ImageCache, stats: ImportStats) -> None:
    images = ImageIndex(a.vqa_images)
    questions = read_questions(a.vqa_questions, a.vqa_annotations, stats)
    for q in progress(questions, len(questions), "vqa"):
        try:
            answers = [(t, c) for t, c in q.answers if "&&" not in t and "|!+" not in t]
            if not answers:
                raise Skip("no answer", f"question {q.question_id}: {[t for t, _ in q.answers][:3]}")
            img = cache.get(images.find(q.subtype, q.image_id))
        except Skip as s:
            stats.skip(Skip(s.reason, f"{s.detail} (question {q.question_id})"))
            continue
        best = answers[0][0]
        vl.answer_types[best][_vqa_type(q, best)] += 1
        vl.row(f"qa{q.question_id}", img, "", q.question, _answers_cell(answers), vl.matcher.find(q.question),
               a.vqa_name, "qa")


def _write_refs(a, vl: VLWriter, cache: ImageCache, stats: ImportStats) -> None:
    splits = set(a.ref_splits.split(","))
    name = a.ref_name or _ref_dataset(a.refs)
    for r in progress(iter_refs(a.refs, a.ref_instances, stats), None, "grounding"):
        if r["split"] not in splits:
            continue
        try:
            img = cache.get(os.path.join(a.ref_images, r["file_name"]))
            box = clip_box(r["box"], (img.width / img.sx, img.height / img.sy),
                           f"ref_id {r['ref_id']} on {r['file_name']}")
        except Skip as s:
            stats.skip(s)
            continue
        text = r["sentence"]
        vl.row(f"ref{r['uniq_id']}", img, text, "", box_cell(box, img), vl.matcher.find(text), name,
               "visual_grounding")


def _ref_dataset(refs_path: str) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(refs_path))).lower()
    return parent if parent in ("refcoco", "refcoco+", "refcocog") else "refcoco"


def run_vl(a, stats: ImportStats) -> None:
    have = {"--karpathy": a.karpathy, "--coco-captions": a.coco_captions, "--pairs": a.pairs,
            "--vqa-questions": a.vqa_questions, "--refs": a.refs}
    if not any(have.values()):
        raise ValueError("pretrain_vl needs at least one source: " + ", ".join(have))
    for opt, dep in (("karpathy", "karpathy_images"), ("coco_captions", "coco_images"), ("pairs", "pairs_images"),
                     ("vqa_questions", "vqa_annotations"), ("vqa_questions", "vqa_images"),
                     ("refs", "ref_instances"), ("refs", "ref_images")):
        if bool(getattr(a, opt)) != bool(getattr(a, dep)):
            given, missing = (opt, dep) if getattr(a, opt) else (dep, opt)
            raise ValueError(f"--{given.replace('_', '-')} needs --{missing.replace('_', '-')}")
    vocab_file = a.instances or a.ref_instances
    for f in (a.karpathy, a.coco_captions, a.pairs, a.vqa_questions, a.vqa_annotations, a.refs, a.ref_instances,
              vocab_file):
        if f:
            need_file(f)
    for d in (a.karpathy and a.karpathy_images, a.coco_captions and a.coco_images, a.pairs and a.pairs_images,
              a.refs and a.ref_images, *(a.vqa_images if a.vqa_questions else ())):
        if d:
            need_dir(d)
    matcher = ObjectMatcher(category_names(vocab_file).values() if vocab_file else ())
    cache = ImageCache(a.max_side)
    with TSVWriter(os.path.join(a.out, VL_FILE), stats) as w:
        vl = VLWriter(w, matcher)
        _write_captions(a, vl, cache, stats)
        if a.vqa_questions:
            _write_vqa(a, vl, cache, stats)
        if a.refs:
            _write_refs(a, vl, cache, stats)
    vl.negative_sample(a.out)


# ---- the FORMATS entries -------------------------------------------------------------------------------------------

def _args_vl(p) -> None:
    g = p.add_argument_group("image-text pairs (caption rows)")
    g.add_argument("--karpathy", help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json)")
    g.add_argument("--karpathy-images", help="its images root (COCO: the folder holding train2014/, val2014/)")
    g.add_argument("--karpathy-splits", default="train,restval",
                   help="Karpathy splits to take (default train,restval: no val/test image enters pretraining)")
    g.add_argument("--karpathy-name", default=None, help="dataset_name of these rows (default coco, or flickr30k)")
    g.add_argument("--coco-captions", help="official COCO captions file (captions_train2014.json)")
    g.add_argument("--coco-images", help="the folder of its images (file_name is relative to it)")
    g.add_argument("--coco-name", default="coco", help="dataset_name of these rows (default coco)")
    g.add_argument("--pairs", help='JSONL, one {"image": path, "caption": text or [texts]} per line, optionally '
                                   '"gt_objects": [words] and "dataset_name"')
    g.add_argument("--pairs-images", help="folder the JSONL's image paths are relative to")
    g.add_argument("--pairs-name", default="custom",
                   help="dataset_name of these rows (default custom; cc12m makes the task ignore the first two "
                        "target tokens, as OFA does for CC12M)")
    g = p.add_argument_group("VQA (qa rows)")
    g.add_argument("--vqa-questions", help="v2_OpenEnded_mscoco_train2014_questions.json")
    g.add_argument("--vqa-annotations", help="v2_mscoco_train2014_annotations.json")
    g.add_argument("--vqa-images", action="append", metavar="DIR",
                   help="COCO images folder of those files (train2014/; repeat for several)")
    g.add_argument("--vqa-name", default="vqa", help="dataset_name of these rows (default vqa)")
    g = p.add_argument_group("grounding (visual_grounding rows)")
    g.add_argument("--refs", help="refs(unc).p / refs(umd).p of RefCOCO, RefCOCO+ or RefCOCOg")
    g.add_argument("--ref-instances", help="the instances.json next to it")
    g.add_argument("--ref-images", help="COCO train2014 images folder")
    g.add_argument("--ref-splits", default="train", help="splits to take (default train)")
    g.add_argument("--ref-name", default=None, help="dataset_name of these rows (default: the refs file's folder "
                                                    "name: refcoco, refcoco+ or refcocog)")
    p.add_argument("--instances", default=None,
                   help="COCO instances.json whose category names are the object words (gt_objects, object.txt); "
                        "default: --ref-instances")


def _args_detection(p) -> None:
    p.add_argument("--instances", required=True, help="COCO-style instances.json (instances_train2017.json)")
    p.add_argument("--images", required=True, help="the folder of its images (file_name is relative to it)")
    p.add_argument("--keep-crowd", action="store_true", help="keep iscrowd boxes (skipped by default)")


def _args_text(p) -> None:
    p.add_argument("--text", required=True, nargs="+",
                   help="plain text files (UTF-8, .gz allowed) or folders of them (all files, sorted)")
    p.add_argument("--unit", choices=("line", "paragraph"), default="line",
                   help="a document is one line (default) or one blank-line-separated paragraph")


FORMATS = {
    "pretrain_vl": Format(
        "OFA pretraining vision-language file: image-text pairs (Karpathy / COCO captions / JSONL), VQA v2 and "
        "RefCOCO grounding -> vision_language_examples.tsv + negative_sample/ (all_captions.txt, object.txt, "
        "type2ans.json)", _args_vl, run_vl),
    "pretrain_detection": Format(
        "OFA pretraining detection file: COCO-style instances.json + images -> detection_examples.tsv",
        _args_detection, run_detection),
    "pretrain_text": Format(
        "OFA pretraining text file: plain text, one document per line or paragraph -> text_examples.tsv",
        _args_text, run_text),
}
