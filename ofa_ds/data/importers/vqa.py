"""VQA v2, as its authors ship it, into OFA's VQA TSVs (`python -m ofa_ds.data import vqa_v2 ...`).

Sources: `v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json` ({"questions": [{image_id, question,
question_id}], "data_subtype": ...}), `v2_mscoco_{train,val}2014_annotations.json` ({"annotations": [{question_id,
multiple_choice_answer, answers: [{answer, answer_confidence, answer_id}] x 10, ...}]}) and the COCO image folders
(`COCO_{subtype}_{image_id:012d}.jpg`, else any .jpg/.png whose name ends in the 12-digit id, in any sub-folder).
Output (docs/ofa.md#vqa): question-id, image-id, question, answers, object labels, image.

What follows OFA's released data and what is unusual:
  * An answer's confidence is its official VQA accuracy against the ten human answers: the mean over the ten
    leave-one-out sets of nine of min(1, matches / 3), i.e. 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 matching
    humans (as `ofa_ds.metrics.simple.vqa_soft_score` computes it). Every human answer and the multiple-choice
    answer go through the official VQA answer normalisation first; `answer_confidence` (yes / maybe / no) is
    ignored, as the official evaluation ignores it. Written as OFA writes it: `1.0|!+yes&&0.3|!+no`, best first.
  * Candidate answers (`trainval_ans2label.json`, answer -> label, read by the loader as `ans2label_file`): the
    given `--answers` list, else OFA's convention: the normalised multiple-choice answers that answer at least
    `--min-answer-count` (9) questions of the train + val annotations given (3,129 answers on VQA v2). Labels:
    most frequent first, ties alphabetical (labels only index the candidates).
  * Answers outside the candidates are left out of a row; a question with none left is skipped ("no answer in the
    answer list"), in validation too, so minival accuracy counts the answerable questions only.
  * Training rows (OFA: "questions with multiple golden answers become multiple training samples"): one row per
    (question, candidate answer) holding that answer and its confidence, which weights the loss. `--train-rows
    joined` writes one row per question with all its answers instead (the loader then trains the best one).
  * Validation rows: one per question with every candidate answer, the VQA score of a prediction being the
    confidence this cell holds for it. Test rows (no answers published) hold a placeholder answer as OFA's test
    file does (`1.0|!+yes`), since the loader needs one; test scores come from the evaluation server.
  * Splits as OFA finetunes: train = train2014 + val2014 minus a held-out minival of val2014 (`--minival-ids FILE`,
    question ids, or image ids with `--minival-id-kind image`; or `--minival-size N` images chosen by a hash of the
    image id, so a smaller minival is a subset of a larger one); no minival = no vqa_val.tsv.
  * Differences from OFA's files: the first column is the real question id (OFA's train/val files repeat the image
    id there), object labels are empty (OFA's came from VinVL detections, so `--add-object` adds nothing), and
    OFA's extra Visual Genome QA training rows are not made here.
  * Rows are sorted by (image id, question id), so each image is read and encoded once per file. The JSON files are
    loaded whole: reading the train annotations takes about 2.5 GB (measured on a tenth-size file, times ten).
  * Questions are lowercased, as OFA's are, with runs of whitespace collapsed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections import Counter
from typing import Iterable, Iterator, NamedTuple, Optional

from . import Format
from .common import ImportStats, Skip, TSVWriter, embed_image, progress

TEST_PLACEHOLDER = "1.0|!+yes"
ANSWER_LIST_NAME = "trainval_ans2label.json"
_SUBTYPE = re.compile(r"(train2014|val2014|test-dev2015|test2015)")
_IMAGE_ID = re.compile(r"(\d{12})\.(jpe?g|png)$", re.IGNORECASE)


class Question(NamedTuple):
    image_id: int
    question_id: int
    question: str
    answers: tuple            # ((normalised answer, confidence), ...) best first; () without annotations
    mc: str                   # normalised multiple_choice_answer ('' without annotations)
    subtype: str              # train2014 / val2014 / test2015: the COCO image file prefix


# ---- reading the official files ----------------------------------------------------------------------------------
def _load_list(path: str, key: str, what: str) -> tuple[dict, list]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list (the official VQA v2 {what} file)")
    return obj, obj[key]


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise TypeError
    return int(x)


@functools.lru_cache(maxsize=1 << 20)
def _normalize(answer: str) -> str:
    """The official VQA answer normalisation, memoised (the same few answers recur millions of times)."""
    from ofa_ds.metrics.simple import normalize_vqa_answer
    return normalize_vqa_answer(answer)


def answer_confidences(human_answers: Iterable[str]) -> tuple:
    """((normalised answer, confidence), ...) best first, ties alphabetical; empty answers dropped. The confidence
    is `ofa_ds.metrics.simple.vqa_soft_score` in closed form: of the n leave-one-out sets, the m that leave out a
    human who gave the answer hold m - 1 matches, the other n - m hold m."""
    norm = [_normalize(a) for a in human_answers]
    n = len(norm)
    conf = {a: round((m * min(1.0, (m - 1) / 3.0) + (n - m) * min(1.0, m / 3.0)) / n, 4)
            for a, m in Counter(norm).items() if a}
    return tuple(sorted(conf.items(), key=lambda kv: (-kv[1], kv[0])))


def read_questions(questions_json: str, annotations_json: Optional[str] = None,
                   stats: Optional[ImportStats] = None) -> list[Question]:
    """Questions (with their answers when `annotations_json` is given), sorted by (image id, question id).
    Records that cannot become a row are counted in `stats` by reason (and logged to stderr)."""
    stats = stats if stats is not None else ImportStats()
    qobj, qs = _load_list(questions_json, "questions", "questions")
    m = _SUBTYPE.search(str(qobj.get("data_subtype", ""))) or _SUBTYPE.search(os.path.basename(questions_json))
    subtype = m.group(1).replace("test-dev2015", "test2015") if m else ""
    anns: Optional[dict[int, dict]] = None
    matched = 0
    if annotations_json is not None:
        _, al = _load_list(annotations_json, "annotations", "annotations")
        anns = {}
        for i, a in enumerate(al):
            try:
                anns[_int(a["question_id"])] = a
            except (KeyError, TypeError, ValueError):
                stats.skip(Skip("malformed annotation record", f"{annotations_json} item {i}"))
    out: dict[int, Question] = {}
    for i, q in enumerate(qs):
        where = f"{questions_json} item {i}"
        try:
            qid, iid, text = _int(q["question_id"]), _int(q["image_id"]), q["question"]
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            stats.skip(Skip("malformed question record", where))
            continue
        if qid in out:
            stats.skip(Skip("duplicate question id", f"{where} (question {qid})"))
            continue
        text = " ".join(text.split()).lower()
        if not text:
            stats.skip(Skip("empty question", f"{where} (question {qid})"))
            continue
        answers, mc = (), ""
        if anns is not None:
            a = anns.pop(qid, None)
            if a is None:
                stats.skip(Skip("no annotation for the question", f"question {qid} ({annotations_json})"))
                continue
            matched += 1
            try:
                human = [h["answer"] for h in a["answers"]]
                if not all(isinstance(h, str) for h in human):
                    raise TypeError
            except (KeyError, TypeError):
                stats.skip(Skip("malformed annotation record", f"{annotations_json} question {qid}"))
                continue
            answers = answer_confidences(human)
            if not answers:
                stats.skip(Skip("no human answers", f"{annotations_json} question {qid}"))
                continue
            mc = a.get("multiple_choice_answer")
            mc = _normalize(mc) if isinstance(mc, str) else ""
        out[qid] = Question(iid, qid, text, answers, mc, subtype)
    if anns:
        if not matched:
            raise ValueError(f"{annotations_json}: no annotation matches a question of {questions_json} "
                             "(are they files of the same split?)")
        for qid in sorted(anns):
            stats.skip(Skip("annotation without question", f"question {qid} ({annotations_json})"))
    return sorted(out.values())


def iter_vqa(questions_json: str, annotations_json: Optional[str] = None,
             stats: Optional[ImportStats] = None) -> Iterator[dict]:
    """The official files as dicts {question_id, image_id, question, answers: {answer: confidence}} sorted by
    (image id, question id); answers normalised, best first, {} without annotations (every answer, not only the
    candidates: filter with `answer_vocabulary` / `load_answer_list`)."""
    for q in read_questions(questions_json, annotations_json, stats):
        yield {"question_id": q.question_id, "image_id": q.image_id, "question": q.question,
               "answers": dict(q.answers)}


# ---- candidate answers -------------------------------------------------------------------------------------------
def _vocabulary(questions: Iterable[Question], min_count: int) -> dict[str, int]:
    count: dict[str, int] = {}
    for q in questions:
        if q.mc:
            count[q.mc] = count.get(q.mc, 0) + 1
    keep = sorted((a for a, n in count.items() if n >= min_count), key=lambda a: (-count[a], a))
    return {a: i for i, a in enumerate(keep)}


def answer_vocabulary(question_annotation_pairs: Iterable[tuple[str, str]], min_count: int = 9) -> dict[str, int]:
    """OFA's candidate answers from (questions_json, annotations_json) pairs: the normalised multiple-choice answers
    of at least `min_count` questions, label 0 the most frequent."""
    qs: list[Question] = []
    for qj, aj in question_annotation_pairs:
        qs += read_questions(qj, aj)
    return _vocabulary(qs, min_count)


def load_answer_list(path: str) -> dict[str, int]:
    """answer -> label from OFA's trainval_ans2label.pkl, a .json (dict or list) or a .txt (one answer a line)."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            words = [ln.strip() for ln in f if ln.strip()]
        return {a: i for i, a in enumerate(dict.fromkeys(words))}
    import pickle
    from ..text import load_candidates
    try:
        return load_candidates(path)
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not an answer list ({type(e).__name__}: {str(e)[:80]})") from None


def _write_json(path: str, obj) -> None:
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ---- images ------------------------------------------------------------------------------------------------------
class ImageIndex:
    """Image files under the `--images` folders by name and by 12-digit COCO id (built on first use)."""

    def __init__(self, dirs: list[str]):
        for d in dirs:
            if not os.path.isdir(d):
                raise FileNotFoundError(2, "images folder not found", d)
        self.dirs = dirs
        self.by_name: Optional[dict[str, str]] = None
        self.by_id: dict[int, list[str]] = {}

    def _build(self) -> None:
        self.by_name, seen = {}, set()
        for d in self.dirs:
            for root, subdirs, files in os.walk(d, followlinks=True):
                real = os.path.realpath(root)
                if real in seen:
                    subdirs[:] = []
                    continue
                seen.add(real)
                subdirs.sort()
                for f in sorted(files):
                    m = _IMAGE_ID.search(f)
                    if m:
                        p = os.path.join(root, f)
                        self.by_name.setdefault(f, p)
                        self.by_id.setdefault(int(m.group(1)), []).append(p)

    def find(self, subtype: str, image_id: int) -> str:
        if self.by_name is None:
            self._build()
        p = self.by_name.get(f"COCO_{subtype}_{image_id:012d}.jpg")
        if p:
            return p
        cands = self.by_id.get(image_id, [])
        if not cands:
            raise Skip("image missing", f"COCO image {image_id} ({subtype or 'no split'}) under {', '.join(self.dirs)}")
        same = [c for c in cands if subtype and subtype in os.path.basename(c)]
        return (same or cands)[0]


# ---- splits and rows ---------------------------------------------------------------------------------------------
def _read_ids(path: str) -> set[int]:
    ids = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            try:
                ids.add(int(s))
            except ValueError:
                raise ValueError(f"{path}:{n}: not an integer id: {s[:40]!r}") from None
    return ids


def minival_ids(val: list[Question], ids_file: Optional[str], id_kind: str, size: int) -> set[int]:
    """Question ids of the held-out minival of val2014."""
    if ids_file:
        ids = _read_ids(ids_file)
        key = (lambda q: q.question_id) if id_kind == "question" else (lambda q: q.image_id)
        chosen = {q.question_id for q in val if key(q) in ids}
        found = {key(q) for q in val} & ids
        if len(found) < len(ids):
            print(f"note: {len(ids) - len(found)} of the {len(ids)} {id_kind} ids in {ids_file} are not among the "
                  "validation questions read", file=sys.stderr)
        return chosen
    if size <= 0:
        return set()
    images = sorted({q.image_id for q in val}, key=lambda i: (hashlib.sha1(str(i).encode()).hexdigest(), i))
    keep = set(images[:size])
    return {q.question_id for q in val if q.image_id in keep}


def _cell(answers: Iterable[tuple[str, float]]) -> str:
    return "&&".join(f"{c}|!+{a}" for a, c in answers)


def _candidates(q: Question, ans2label: dict[str, int]) -> list[tuple[str, float]]:
    keep = [(a, c) for a, c in q.answers if a in ans2label and "&&" not in a and "|!+" not in a]
    if not keep:
        raise Skip("no answer in the answer list", f"question {q.question_id}")
    return keep


def write_split(path: str, questions: list[Question], cells, images: ImageIndex, max_side: Optional[int],
                stats: ImportStats) -> None:
    """One TSV: per question the answer cells `cells(q)` returns (each a row), all with the question's image."""
    last_key, last = None, None
    with TSVWriter(path, stats) as w:
        for q in progress(questions, len(questions), os.path.basename(path)):
            try:
                row_cells = cells(q)
                key = (q.subtype, q.image_id)
                if key != last_key:
                    last_key = key
                    try:
                        last = embed_image(images.find(q.subtype, q.image_id), max_side)
                    except Skip as s:
                        last = s
                if isinstance(last, Skip):
                    raise Skip(last.reason, f"{last.detail} (question {q.question_id})")
            except Skip as s:
                stats.skip(s)
                continue
            for cell in row_cells:
                w.write([q.question_id, q.image_id, q.question, cell, "", last.b64])


def run(args, stats: ImportStats) -> None:
    for split in ("train", "val"):
        if bool(getattr(args, f"{split}_questions")) != bool(getattr(args, f"{split}_annotations")):
            raise ValueError(f"--{split}-questions and --{split}-annotations go together")
    if not (args.train_questions or args.val_questions or args.test_questions):
        raise ValueError("nothing to import: give --train-questions/--train-annotations, "
                         "--val-questions/--val-annotations and/or --test-questions")
    if (args.minival_ids or args.minival_size) and not args.val_questions:
        raise ValueError("the minival is taken from the validation questions: give --val-questions/--val-annotations")
    images = ImageIndex(args.images)
    out = args.out
    os.makedirs(out, exist_ok=True)
    train = read_questions(args.train_questions, args.train_annotations, stats) if args.train_questions else []
    val = read_questions(args.val_questions, args.val_annotations, stats) if args.val_questions else []
    test = read_questions(args.test_questions, None, stats) if args.test_questions else []
    if train or val:
        ans2label = load_answer_list(args.answers) if args.answers else _vocabulary(train + val, args.min_answer_count)
        if not ans2label:
            raise ValueError(f"the answer list is empty (no answer is the multiple-choice answer of "
                             f"{args.min_answer_count} questions; lower --min-answer-count or give --answers)")
        _write_json(os.path.join(out, ANSWER_LIST_NAME), ans2label)
        held = minival_ids(val, args.minival_ids, args.minival_id_kind, args.minival_size)
        if not held:
            print("note: no minival (--minival-ids / --minival-size): all validation questions go to vqa_train.tsv "
                  "and no vqa_val.tsv is written", file=sys.stderr)
        trainset = sorted(train + [q for q in val if q.question_id not in held])
        if args.train_rows == "expanded":
            train_cells = lambda q: [_cell([ac]) for ac in _candidates(q, ans2label)]  # noqa: E731
        else:
            train_cells = lambda q: [_cell(_candidates(q, ans2label))]  # noqa: E731
        write_split(os.path.join(out, "vqa_train.tsv"), trainset, train_cells, images, args.max_side, stats)
        if held:
            write_split(os.path.join(out, "vqa_val.tsv"), [q for q in val if q.question_id in held],
                        lambda q: [_cell(_candidates(q, ans2label))], images, args.max_side, stats)
    if test:
        write_split(os.path.join(out, "vqa_test.tsv"), test, lambda q: [TEST_PLACEHOLDER], images, args.max_side,
                    stats)


def add_arguments(p) -> None:
    p.add_argument("--train-questions", help="v2_OpenEnded_mscoco_train2014_questions.json")
    p.add_argument("--train-annotations", help="v2_mscoco_train2014_annotations.json")
    p.add_argument("--val-questions", help="v2_OpenEnded_mscoco_val2014_questions.json")
    p.add_argument("--val-annotations", help="v2_mscoco_val2014_annotations.json")
    p.add_argument("--test-questions", help="v2_OpenEnded_mscoco_test2015_questions.json (or test-dev2015)")
    p.add_argument("--images", action="append", required=True, metavar="DIR",
                   help="COCO image folder (repeat, or give the folder above train2014/ val2014/ test2015/)")
    p.add_argument("--answers", metavar="FILE",
                   help="candidate answers: OFA's trainval_ans2label.pkl, a .json or a .txt (one a line); "
                        "default: built from the annotations (--min-answer-count)")
    p.add_argument("--min-answer-count", type=int, default=9,
                   help="without --answers: keep multiple-choice answers of at least N questions (default 9)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minival-ids", metavar="FILE", help="held-out validation ids, one a line (question ids, or "
                                                          "image ids with --minival-id-kind image)")
    g.add_argument("--minival-size", type=int, default=0,
                   help="hold out this many val2014 images (chosen by a hash of the id) as vqa_val.tsv (default 0)")
    p.add_argument("--minival-id-kind", choices=("question", "image"), default="question")
    p.add_argument("--train-rows", choices=("expanded", "joined"), default="expanded",
                   help="expanded (OFA): a row per (question, answer); joined: a row per question, all answers")


FORMATS = {
    "vqa_v2": Format("VQA v2 questions + annotations + COCO images -> vqa_train.tsv (train2014 + val2014 minus "
                     "minival), vqa_val.tsv (minival), vqa_test.tsv, trainval_ans2label.json",
                     add_arguments, run),
}
