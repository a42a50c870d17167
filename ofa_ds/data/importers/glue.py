"""The official GLUE TSVs (as `download_glue_data.py` or gluebenchmark.com ship them) -> OFA's GLUE TSVs.

`--task cola|sst2|mrpc|qqp|mnli|rte|qnli --glue-dir DIR`: DIR is the task's folder (CoLA, SST-2, MRPC, QQP,
MNLI, RTE, QNLI) or the folder holding it. The source files are read line by line, split on tabs only (they
contain unbalanced quotes, so no CSV quoting), by their header names where they have one (CoLA has none:
source, label, original label, sentence).

Output `{task}_{split}.tsv` in the column layout of OFA's files, which the glue tasks read with their default
columns (docs/ofa.md#gigaword-and-glue):
  cola   index, sentence, label                        cols 1,2   (index = 0-based record number)
  sst2   sentence, label                               cols 0,1
  mrpc   sentence1, sentence2, label (Quality)         cols 0,1,2
  qqp    id, qid1, qid2, question1, question2, label   cols 3,4,5
  mnli   sentence1, sentence2, label                   cols 0,1,2 (neutral 0, entailment 1, contradiction 2,
                                                                   the numbers OFA's MNLI files use)
  rte    index, sentence1, sentence2, label            cols 1,2,3 (entailment / not_entailment)
  qnli   index, question, sentence, label              cols 1,2,3 (entailment / not_entailment)
Splits: train.tsv -> train, dev.tsv -> dev; MNLI dev_matched.tsv -> dev and dev_mismatched.tsv -> dev_mismatched;
MRPC also reads msr_paraphrase_train.txt when train.tsv is missing, and msr_paraphrase_test.txt (labelled) -> test.
GLUE's test.tsv files have no labels, which the glue tasks need, so they are not imported (a note says so).
Skipped: rows with the wrong column count (file:line named), empty text, unknown labels, lines that are not UTF-8.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from . import Format
from .common import ImportStats, Skip, TSVWriter, progress
from .text_lines import count_lines, read_lines

BINARY = {"0": "0", "1": "1"}
ENTAILMENT = {"entailment": "entailment", "not_entailment": "not_entailment"}


@dataclass(frozen=True)
class Source:
    folder: str                          # GLUE's folder name
    splits: tuple                        # (split, candidate file names, first found wins)
    out: tuple                           # output columns by source column name; "#" = 0-based record number
    texts: tuple                         # columns that must not be empty
    label: str                           # the label column
    labels: dict                         # source label -> label written
    columns: Optional[tuple] = None      # names of a headerless file's columns


TRAIN_DEV = (("train", ("train.tsv",)), ("dev", ("dev.tsv",)))
SOURCES = {
    "cola": Source("CoLA", TRAIN_DEV, ("#", "sentence", "label"), ("sentence",), "label", BINARY,
                   columns=("source", "label", "original_label", "sentence")),
    "sst2": Source("SST-2", TRAIN_DEV, ("sentence", "label"), ("sentence",), "label", BINARY),
    "mrpc": Source("MRPC", (("train", ("train.tsv", "msr_paraphrase_train.txt")), ("dev", ("dev.tsv",)),
                            ("test", ("msr_paraphrase_test.txt",))),
                   ("#1 String", "#2 String", "Quality"), ("#1 String", "#2 String"), "Quality", BINARY),
    "qqp": Source("QQP", TRAIN_DEV, ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                  ("question1", "question2"), "is_duplicate", BINARY),
    "mnli": Source("MNLI", (("train", ("train.tsv",)), ("dev", ("dev_matched.tsv",)),
                            ("dev_mismatched", ("dev_mismatched.tsv",))),
                   ("sentence1", "sentence2", "gold_label"), ("sentence1", "sentence2"), "gold_label",
                   {"neutral": "0", "entailment": "1", "contradiction": "2"}),
    "rte": Source("RTE", TRAIN_DEV, ("index", "sentence1", "sentence2", "label"), ("sentence1", "sentence2"),
                  "label", ENTAILMENT),
    "qnli": Source("QNLI", TRAIN_DEV, ("index", "question", "sentence", "label"), ("question", "sentence"),
                   "label", ENTAILMENT),
}
TEST_FILES = ("test.tsv", "test_matched.tsv", "test_mismatched.tsv")


def add_arguments(p) -> None:
    p.add_argument("--task", required=True, choices=sorted(SOURCES), help="the GLUE task")
    p.add_argument("--glue-dir", required=True, help="the task's GLUE folder (e.g. glue_data/CoLA) or its parent")


def task_dir(glue_dir: str, src: Source) -> str:
    if not os.path.isdir(glue_dir):
        raise FileNotFoundError(2, "GLUE folder not found", glue_dir)
    sub = os.path.join(glue_dir, src.folder)
    return sub if os.path.isdir(sub) else glue_dir


def rows(path: str, src: Source, stats: ImportStats):
    """The output rows of one source file, in file order; bad records are skipped with file:line."""
    names = src.columns
    first = 1
    if names is None:
        header = next(read_lines(path), (1, None))[1]
        if header is None:
            raise ValueError(f"{path}: empty or not UTF-8; expected a header line")
        names = tuple(header.split("\t"))
        missing = [c for c in src.out if c != "#" and c not in names]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}; got {header[:80]!r}")
        first = 2
    index = {c: names.index(c) for c in src.out if c != "#"}
    for i, line in progress(read_lines(path), count_lines(path), os.path.basename(path)):
        if i < first:
            continue
        where = f"{path}:{i}"
        if line is None:
            stats.skip(Skip("text not UTF-8", where))
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            stats.skip(Skip("wrong column count", f"{where} has {len(fields)} columns, expected {len(names)}"))
            continue
        if any(not fields[index[c]].strip() for c in src.texts):
            stats.skip(Skip("empty text", where))
            continue
        label = fields[index[src.label]].strip()
        if label not in src.labels:
            stats.skip(Skip("unknown label", f"{where} ({label[:30]!r})"))
            continue
        yield [src.labels[label] if c == src.label else (i - first) if c == "#" else fields[index[c]]
               for c in src.out]


def run(args, stats: ImportStats) -> None:
    src = SOURCES[args.task]
    root = task_dir(args.glue_dir, src)
    found = []
    for split, names in src.splits:
        path = next((os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))), None)
        if path is not None:
            found.append((split, path))
    if not found:
        wanted = ", ".join(n for _, names in src.splits for n in names)
        raise FileNotFoundError(2, f"no GLUE {args.task} files ({wanted})", root)
    for split, path in found:
        with TSVWriter(os.path.join(args.out, f"{args.task}_{split}.tsv"), stats) as w:
            for row in rows(path, src, stats):
                w.write(row)
    for name in TEST_FILES:
        if os.path.isfile(os.path.join(root, name)):
            print(f"note: {os.path.join(root, name)} not imported: GLUE test files have no labels, "
                  f"which the {args.task} task needs", file=sys.stderr)


FORMATS = {"glue": Format("official GLUE TSVs (CoLA, SST-2, MRPC, QQP, MNLI, RTE, QNLI) -> {task}_{split}.tsv",
                          add_arguments, run)}
