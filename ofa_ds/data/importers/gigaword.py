"""Gigaword summarisation as source/target text files (one article / one summary per line) -> OFA's
`gigaword_{split}.tsv` (article, summary; docs/ofa.md#gigaword-and-glue).

Two ways to name the input:
  * `--source FILE --target FILE [--split NAME]` (split defaults to train);
  * `--gigaword-dir DIR`: every known pair in DIR and its direct sub-folders: `{split}.src.txt`/`{split}.tgt.txt`,
    `{split}.src`/`{split}.tgt`, harvardnlp's `{split}.article.txt`/`{split}.title.txt` and
    `{split}.article.filter.txt`/`{split}.title.filter.txt`, and its test set `input.txt`/`task1_ref0.txt` (split
    test). A split named valid or val is written as dev (OFA's gigaword_dev.tsv).
The two files are read together line by line (millions of lines; never loaded whole), text kept as is (`<unk>`
and `#` digits included: the gigaword task maps `<unk>` itself). Skipped: an empty article or summary, a line
that is not UTF-8. Files of different lengths are an error (ValueError naming both files and the line), and the
output is not written.
"""
from __future__ import annotations

import os
from itertools import zip_longest

from . import Format
from .common import ImportStats, Skip, TSVWriter, progress
from .text_lines import count_lines, read_lines

# (source suffix, target suffix) of a split's pair of files; the split is the file name before the suffix
PAIRS = ((".src.txt", ".tgt.txt"), (".article.filter.txt", ".title.filter.txt"), (".article.txt", ".title.txt"),
         (".src", ".tgt"))
RENAME = {"valid": "dev", "val": "dev"}


def add_arguments(p) -> None:
    p.add_argument("--source", help="articles, one per line")
    p.add_argument("--target", help="summaries, one per line (same line count as --source)")
    p.add_argument("--split", default="train", help="split name of --source/--target (output gigaword_SPLIT.tsv)")
    p.add_argument("--gigaword-dir", help="a folder with known file pairs (train.src.txt/train.tgt.txt, "
                                          "harvardnlp's train.article.txt/train.title.txt, ...)")


def find_pairs(root: str) -> list[tuple[str, str, str]]:
    """(split, source, target) for every known pair in `root` and its direct sub-folders, sorted by split."""
    if not os.path.isdir(root):
        raise FileNotFoundError(2, "Gigaword folder not found", root)
    folders = [root] + sorted(os.path.join(root, d) for d in os.listdir(root)
                              if os.path.isdir(os.path.join(root, d)))
    found: dict[str, tuple[str, str]] = {}
    for folder in folders:
        names = set(os.listdir(folder))
        pairs = []
        if "input.txt" in names and "task1_ref0.txt" in names:
            pairs.append(("test", "input.txt", "task1_ref0.txt"))
        for name in sorted(names):
            for s_suf, t_suf in PAIRS:
                if name.endswith(s_suf) and name[: -len(s_suf)] + t_suf in names:
                    split = name[: -len(s_suf)]
                    pairs.append((RENAME.get(split, split), name, split + t_suf))
                    break
        for split, s, t in pairs:
            s, t = os.path.join(folder, s), os.path.join(folder, t)
            if split in found:
                raise ValueError(f"{root}: two sources for split {split}: {found[split][0]} and {s}")
            found[split] = (s, t)
    if not found:
        raise FileNotFoundError(2, "no Gigaword file pairs (e.g. train.src.txt + train.tgt.txt, "
                                   "train.article.txt + train.title.txt)", root)
    return [(split, s, t) for split, (s, t) in sorted(found.items())]


def rows(source: str, target: str, stats: ImportStats):
    """(article, summary) per line pair, streamed; ValueError at the first line one file has and the other lacks."""
    pairs = zip_longest(read_lines(source), read_lines(target))
    for (a, b) in progress(pairs, count_lines(source), os.path.basename(source)):
        if a is None or b is None:
            longer, shorter, i = (source, target, a[0]) if b is None else (target, source, b[0])
            raise ValueError(f"{source} and {target} differ in length: {longer} has line {i}, {shorter} ends "
                             f"at line {i - 1}")
        i, article = a
        summary = b[1]
        where = f"{source}:{i}"
        if article is None or summary is None:
            stats.skip(Skip("text not UTF-8", f"{source if article is None else target}:{i}"))
        elif not article.strip():
            stats.skip(Skip("empty article", where))
        elif not summary.strip():
            stats.skip(Skip("empty summary", f"{target}:{i}"))
        else:
            yield article, summary


def run(args, stats: ImportStats) -> None:
    if args.gigaword_dir:
        if args.source or args.target:
            raise ValueError("give either --gigaword-dir or --source/--target, not both")
        jobs = find_pairs(args.gigaword_dir)
    else:
        if not (args.source and args.target):
            raise ValueError("need --source and --target (or --gigaword-dir)")
        for p in (args.source, args.target):
            if not os.path.isfile(p):
                raise FileNotFoundError(2, "file not found", p)
        if not args.split or os.sep in args.split:
            raise ValueError(f"--split {args.split!r}: expected a plain name such as train, dev or test")
        jobs = [(args.split, args.source, args.target)]
    for split, source, target in jobs:
        with TSVWriter(os.path.join(args.out, f"gigaword_{split}.tsv"), stats) as w:
            for article, summary in rows(source, target, stats):
                w.write([article, summary])


FORMATS = {"gigaword": Format("Gigaword article/summary line files -> gigaword_{split}.tsv", add_arguments, run)}
