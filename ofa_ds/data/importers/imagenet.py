"""ImageNet-1K as downloaded (class folders + the synset words list) -> OFA's ImageNet TSVs (docs/ofa.md#imagenet).

Input:
  * `--synset-words synset_words.txt`: lines `n01440764 tench, Tinca tinca`. The label is the 1-based line number
    (OFA's convention); the class name is the text before the first comma ("tench"), case kept: the short name
    OFA's rows carry (its README's example row: label 769, `rugby ball`). `--class-names all` keeps the whole list.
    Two ImageNet names repeat (crane, maillot): their rows share the name and keep their own labels.
  * `--split-dir NAME=PATH` (repeatable; a bare PATH takes its folder name): a folder of class folders named by
    synset (`train/n01440764/*.JPEG`), or a flat folder of images with `--val-labels FILE`. The labels file has one
    image per line, `FILE SYNSET` (spaces or a comma between them; FILE with or without its extension), which
    covers the usual `ILSVRC2012_val_00000001.JPEG n01751748` lists and Kaggle's `LOC_val_solution.csv` (header
    line ignored; the first synset of PredictionString is used). A number instead of a synset is read as caffe's
    `val.txt`: the 0-based index into the synset words list.

Output under --out: `imagenet_1k_{NAME}.tsv` (image base64, 1-based label, class name; selected cols 0,2) and
`class2label.json` (class name -> label, the candidate list the imagenet task's `ans2label_file` reads; a
repeated name keeps its first label).
Rows are in sorted order: class folder, then file name. Skipped: unreadable images, folders or labels whose synset
is not in the list, files without a label, files outside class folders, files that are not images.
"""
from __future__ import annotations

import json
import os
import re

from . import Format
from .common import ImportStats, Skip, TSVWriter, embed_image, progress

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SYNSET = re.compile(r"n\d{8}$")


def add_arguments(p) -> None:
    p.add_argument("--synset-words", required=True, help="synset_words.txt: 'n01440764 tench, Tinca tinca' per line")
    p.add_argument("--split-dir", action="append", required=True, metavar="NAME=PATH",
                   help="a split folder (class folders, or flat with --val-labels); repeat per split")
    p.add_argument("--val-labels", default=None,
                   help="labels of the flat split folders: 'FILE SYNSET' per line (or caffe's val.txt, "
                        "Kaggle's LOC_val_solution.csv)")
    p.add_argument("--class-names", choices=["first", "all"], default="first",
                   help="class name text: the first name of the synset (OFA's files) or the whole list")


def read_synset_words(path: str, names: str = "first") -> dict[str, tuple[int, str]]:
    """synset -> (1-based label, class name); ValueError naming the file and line for a malformed list."""
    out: dict[str, tuple[int, str]] = {}
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for i, line in enumerate(f, start=1):
            parts = line.strip().split(None, 1)
            if len(parts) != 2 or not _SYNSET.match(parts[0]):
                raise ValueError(f"{path}:{i}: expected 'n01440764 tench, Tinca tinca', got {line.strip()[:60]!r}")
            wnid, words = parts
            if wnid in out:
                raise ValueError(f"{path}:{i}: synset {wnid} listed twice")
            name = words.split(",")[0].strip() if names == "first" else " ".join(words.split())
            out[wnid] = (i, name)
    if not out:
        raise ValueError(f"{path}: no synsets")
    return out


def read_val_labels(path: str, synsets: dict[str, tuple[int, str]]) -> dict[str, str]:
    """file name (and its stem) -> synset. Integer values are caffe's 0-based indices into the synset list."""
    order = list(synsets)
    out: dict[str, str] = {}
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for i, line in enumerate(f, start=1):
            parts = line.replace(",", " ").split()
            if not parts or (i == 1 and parts[0] == "ImageId"):
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{i}: expected 'FILE SYNSET', got {line.strip()[:60]!r}")
            name, value = os.path.basename(parts[0]), parts[1]
            if value.isdigit():
                k = int(value)
                value = order[k] if k < len(order) else f"index {k}"
            out[name] = value
            out.setdefault(os.path.splitext(name)[0], value)
    return out


def _split_dirs(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            path, name = s, os.path.basename(os.path.normpath(s))
        if not os.path.isdir(path):
            raise FileNotFoundError(2, "split folder not found", path)
        if not name or "/" in name:
            raise ValueError(f"--split-dir {s!r}: expected NAME=PATH")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--split-dir: split names repeat: {names}")
    return out


def _entries(root: str) -> tuple[list[str], list[str]]:
    """Sorted (sub-folder names, file names) of `root`, hidden entries left out."""
    dirs, files = [], []
    with os.scandir(root) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            (dirs if e.is_dir() else files).append(e.name)
    return sorted(dirs), sorted(files)


def _records(root: str, synsets, val_labels):
    """(path, synset) per file in sorted order, or (path, Skip) for a file that cannot have a label. A folder with
    sub-folders is read as class folders, one without as a flat folder labelled by `val_labels`."""
    dirs, files = _entries(root)
    if dirs:
        for name in files:
            path = os.path.join(root, name)
            yield path, Skip("file outside class folders", path)
        for d in dirs:
            folder = os.path.join(root, d)
            for name in _entries(folder)[1]:
                path = os.path.join(folder, name)
                yield path, (d if d in synsets else Skip("folder not in synset list", path))
        return
    for name in files:
        path = os.path.join(root, name)
        wnid = val_labels.get(name, val_labels.get(os.path.splitext(name)[0]))
        if wnid is None:
            yield path, Skip("no label for file", path)
        elif wnid not in synsets:
            yield path, Skip("label not in synset list", f"{path} ({wnid})")
        else:
            yield path, wnid


def _count(root: str) -> int:
    dirs, files = _entries(root)
    return sum(len(_entries(os.path.join(root, d))[1]) for d in dirs) if dirs else len(files)


def run(args, stats: ImportStats) -> None:
    splits = _split_dirs(args.split_dir)
    synsets = read_synset_words(args.synset_words, args.class_names)
    val_labels = read_val_labels(args.val_labels, synsets) if args.val_labels else None
    for _, root in splits:
        if val_labels is None and not _entries(root)[0]:
            raise ValueError(f"{root}: no class folders; a flat folder needs --val-labels")
    for split, root in splits:
        out = os.path.join(args.out, f"imagenet_1k_{split}.tsv")
        with TSVWriter(out, stats) as w:
            for path, wnid in progress(_records(root, synsets, val_labels), _count(root), split):
                try:
                    if isinstance(wnid, Skip):
                        raise wnid
                    if not path.lower().endswith(IMAGE_EXTENSIONS):
                        raise Skip("not an image file", path)
                    img = embed_image(path, args.max_side)
                except Skip as s:
                    stats.skip(s)
                    continue
                label, name = synsets[wnid]
                w.write([img.b64, label, name])
    candidates: dict[str, int] = {}
    for label, name in synsets.values():
        candidates.setdefault(name, label)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "class2label.json")
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(candidates, f, ensure_ascii=False, indent=0)
        f.write("\n")
    os.replace(path + ".part", path)


FORMATS = {"imagenet": Format("ImageNet-1K class folders + synset_words.txt -> imagenet_1k_{split}.tsv",
                              add_arguments, run)}
