"""Held-out evaluation during and after training: loss, all-candidate VQA accuracy, greedy captioning (CIDEr-D) and
greedy grounding (Acc@0.5), each next to its trivial baseline. Predictions come from the evaluators of
`ofa_ds.metrics.tasks` (the ones `launch/evaluate.py` runs) and metrics from `ofa_ds.metrics`; this file picks the
training-time settings, computes the loss and the baselines, and gathers records across ranks.

Training-time settings (they differ from `launch/evaluate.py`'s OFA defaults on purpose: cheap, and meaningful for a
model early in training):
  * Captions and boxes: greedy decoding = beam 1 of `ofa_ds.generation.generate`, no n-gram blocking, bos never
    emitted (an early-training model ranks it first; it decodes to nothing). Captions have 1 to `max_len` tokens;
    CIDEr-D on the lower-cased, punctuation-stripped words (tokenizer "none", the text OFA's validation scores),
    document frequencies from the evaluated references.
  * Grounding decodes exactly 4 tokens restricted to the location bins (OFA does not restrict; an early-training
    model otherwise emits words there). Box = bin / (num_bins − 1) · max_image_size / resize ratio.
  * All-candidate scoring sums the log-probabilities of answer + eos after the sample's decoder prompt, with the
    softmax over the whole vocabulary (no candidate trie) and no length normalisation.
  * ZeRO-3 gathers parameters collectively at every module call: when the model's parameters are partitioned every
    rank must run the same batches (the data stream equalises shards by wrapping round) and generation runs in
    lockstep (`sync`: no rank stops decoding before all are done). Records are gathered and de-duplicated by id.
  * Trivial baselines come from the training files named in `EvalConfig.reference_stats`: the most frequent VQA
    answer and each training question's most frequent answer, the most frequent caption, the mean box (in original
    pixels). With `EvalConfig.vqa_answer_types` (a type2ans.json) VQA accuracy is also reported per answer type
    (`vqa_acc_<type>`, by the best reference answer).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ofa_ds.data.tasks.base import parse_answers
from ofa_ds.data.text import strip_punct_words
from ofa_ds.losses import label_smoothed_ce, pair_loss
from ofa_ds.metrics.caption import caption_scores
from ofa_ds.metrics.simple import box_iou, grounding_hits, vqa_score
from ofa_ds.metrics.tasks import (CaptionEvaluator, Evaluator, ImageNetEvaluator, RefcocoEvaluator,
                                  SnliVeEvaluator, VQAEvaluator)

NET_KEYS = ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens", "code_masks")


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a batch dict (or a (v1, v2) pair) to `device`; float images to `dtype` when given."""
    if isinstance(batch, tuple):
        return tuple(to_device(b, device, dtype) for b in batch)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if dtype is not None and k == "patch_images":
                v = v.to(dtype)
        out[k] = v
    return out


def net_input(batch: dict) -> dict:
    return {k: batch.get(k) for k in NET_KEYS}


# ---- collective helpers (work without torch.distributed too) ---------------------------------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_records(records: list[dict]) -> list[dict]:
    """All ranks' records, de-duplicated by 'id' (equalised shards repeat a few samples)."""
    if _world() > 1:
        parts: list[Any] = [None] * _world()
        dist.all_gather_object(parts, records)
        records = [r for p in parts for r in p]
    return unique_records(records)


def unique_records(records: list[dict]) -> list[dict]:
    """Records with repeated 'id's dropped (first kept), sorted by id: any number of ranks gives the same list."""
    return Evaluator.dedupe(records)


def partitioned(model) -> bool:
    """Whether the model's parameters are ZeRO-3 partitions (DeepSpeed marks them with `ds_id`): then every module
    call gathers collectively and generation must keep the ranks in lockstep."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def batch_loss(model, batch: Any, eps: float, sample_patch_num: int | None = None) -> tuple[float, float]:
    """(summed loss, sample size) of one batch or (v1, v2) pair, as the training loss computes them."""
    parts = batch if isinstance(batch, tuple) else (batch,)
    outs = []
    for j, b in enumerate(parts):
        spn = sample_patch_num if (len(parts) == 2 and j == 0) else None
        logits = model(**net_input(b), sample_patch_num=spn)
        outs.append(label_smoothed_ce(logits, b["target"], eps=eps, conf=b.get("conf"),
                                      constraint_masks=b.get("constraint_masks"),
                                      constraint_rows=b.get("constraint_rows"),
                                      constraint_index=b.get("constraint_index")))
    out = pair_loss(*outs) if len(outs) == 2 else outs[0]
    return float(out.loss), out.sample_size


# ---- metrics ---------------------------------------------------------------------------------------------------------
def caption_words(text: str) -> str:
    """Lower-cased words without punctuation (what CIDEr and the exact-match rate compare)."""
    return strip_punct_words(text.lower())


def cider(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus CIDEr-D of hypotheses against their references, on punctuation-stripped lower-cased words."""
    keys = [f"{i:09d}" for i in range(len(hyps))]          # caption_scores sorts by key: keep the given order
    preds = {k: strip_punct_words(h) for k, h in zip(keys, hyps)}
    return caption_scores(preds, {k: [strip_punct_words(r) for r in rs] for k, rs in zip(keys, refs)},
                          tokenizer="none")["CIDEr"]


def _box_scores(boxes: list[list[float]], gts: list[list[float]]) -> tuple[float, float]:
    """(Acc@0.5, mean IoU) of boxes against ground truths (OFA's IoU and hit rule, `ofa_ds.metrics.simple`)."""
    pred = torch.tensor(boxes, dtype=torch.float64).view(-1, 4)
    gt = torch.tensor(gts, dtype=torch.float64).view(-1, 4)
    hits, ious = grounding_hits(pred, gt).tolist(), box_iou(pred, gt).tolist()
    return sum(hits) / len(hits), sum(ious) / len(ious)


# ---- trivial baselines from training files ---------------------------------------------------------------------------
def _column(path: str, col: int, limit: int = 200_000) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            parts = line.rstrip("\n").split("\t")
            if len(parts) > col:
                out.append(parts[col])
    return out


@dataclass(frozen=True)
class VQABaselines:
    majority: str                      # always answer this
    by_question: dict[str, str]        # question_key -> its most frequent training answer
    answer_type: dict[str, str] = field(default_factory=dict)   # answer -> its type (for vqa_acc_<type>)


def question_key(question: str) -> str:
    return " ".join(question.lower().strip().rstrip("?").split())


def load_answer_types(type2ans_json: str) -> dict[str, str]:
    """answer -> type from a JSON of type -> [answers] (OFA's negative_sample/type2ans.json; its catch-all "other"
    list is skipped). An answer listed under two types raises, naming both."""
    with open(type2ans_json, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{type2ans_json}: expected a JSON object of answer type -> list of answers")
    out: dict[str, str] = {}
    for t, answers in data.items():
        if t == "other":
            continue
        for a in answers:
            if out.get(a, t) != t:
                raise ValueError(f"{type2ans_json}: answer {a!r} is listed under both {out[a]!r} and {t!r}")
            out[a] = t
    return out


def type_metric_name(task: str, answer_type: str) -> str:
    """'vqa', 'how many' -> 'vqa_acc_how_many' (lower case, runs of other characters become one '_')."""
    return f"{task}_acc_" + ("_".join(re.findall(r"[a-z0-9]+", answer_type.lower())) or "other")


def vqa_baselines(vqa_train_tsv: str, answer_types: str = "") -> VQABaselines:
    """The majority answer and, per training question text, its most frequent best answer: the question-only
    prior, i.e. what a model that never looks at the image can score (unseen questions get the majority).
    `answer_types` (a type2ans.json, optional) adds the answer -> type map behind the per-type accuracies."""
    per: dict[str, Counter] = {}
    for q, a in zip(_column(vqa_train_tsv, 2), _column(vqa_train_tsv, 3)):
        best = max(parse_answers(a), key=lambda ca: ca[0])[1]
        per.setdefault(question_key(q), Counter())[best] += 1
    majority = sum(per.values(), Counter()).most_common(1)[0][0]
    types = load_answer_types(answer_types) if answer_types else {}
    return VQABaselines(majority, {q: c.most_common(1)[0][0] for q, c in per.items()}, types)


def majority_caption(caption_train_tsv: str) -> str:
    return Counter(caption_words(c) for c in _column(caption_train_tsv, 2)).most_common(1)[0][0]


def mean_box(refcoco_train_tsv: str) -> list[float]:
    boxes = [[float(v) for v in b.split(",")] for b in _column(refcoco_train_tsv, 3)]
    return [sum(b[k] for b in boxes) / len(boxes) for k in range(4)]


def _mean_score(records: list[dict], answer) -> float:
    """Mean VQA score of `answer(record)` against each record's reference dict."""
    return sum(vqa_score(answer(r), r["ref"]) for r in records) / len(records)


def summarise(task: str, records: list[dict], baseline: Any, tok) -> dict[str, float]:
    """Metrics of one task from the gathered per-sample records (and the trivial baseline when known)."""
    out: dict[str, float] = {f"{task}_n": float(len(records))}
    if not records:
        return out
    if "pred_answer" in records[0]:
        out[f"{task}_acc"] = _mean_score(records, lambda r: r["pred_answer"])
        if baseline is not None:
            prior = baseline if isinstance(baseline, VQABaselines) else None
            majority = prior.majority if prior else baseline
            out[f"{task}_majority_baseline"] = _mean_score(records, lambda r: majority)
            if prior and all(r.get("question") is not None for r in records):
                out[f"{task}_question_prior_baseline"] = _mean_score(
                    records, lambda r: prior.by_question.get(question_key(r["question"]), majority))
            if prior and prior.answer_type:      # accuracy by the type of each question's best reference answer
                groups: dict[str, list[float]] = {}
                for r in records:
                    best = max(r["ref"], key=r["ref"].get) if r["ref"] else ""
                    key = type_metric_name(task, prior.answer_type.get(best, "other"))
                    groups.setdefault(key, []).append(vqa_score(r["pred_answer"], r["ref"]))
                out.update({k: sum(v) / len(v) for k, v in sorted(groups.items())})
    if "caption" in records[0]:
        refs = [r["refs"] for r in records]
        out[f"{task}_cider"] = cider([r["caption"] for r in records], refs)
        out[f"{task}_exact"] = sum(caption_words(r["caption"]) in {caption_words(x) for x in r["refs"]}
                                   for r in records) / len(records)
        if baseline is not None:
            out[f"{task}_constant_baseline_cider"] = cider([baseline] * len(records), refs)
    if "box" in records[0]:
        gts = [r["gt"] for r in records]
        out[f"{task}_acc50"], out[f"{task}_miou"] = _box_scores([r["box"] for r in records], gts)
        if baseline is not None:
            acc, miou = _box_scores([list(baseline)] * len(records), gts)
            out[f"{task}_mean_box_baseline_acc50"], out[f"{task}_mean_box_baseline_miou"] = acc, miou
    return out


# ---- one task --------------------------------------------------------------------------------------------------------
_ALL_CANDIDATE = {"vqa": VQAEvaluator, "snli_ve": SnliVeEvaluator, "imagenet": ImageNetEvaluator}


def _evaluator(task: str, tok, *, max_len: int, num_bins: int, max_image_size: int,
               candidates: dict[str, int] | None, sync: bool) -> Evaluator | None:
    """The `ofa_ds.metrics.tasks` evaluator of `task` with the training-time settings (module docstring); None for
    a task without a held-out metric (its loss is still reported)."""
    greedy = {"beam": 1, "no_repeat_ngram_size": 0, "ban_bos": True}
    if candidates:
        answers = sorted(candidates, key=candidates.get)
        return _ALL_CANDIDATE.get(task, VQAEvaluator)(tok, answers, constrained=False, sync=sync)
    if task == "caption":
        return CaptionEvaluator(tok, dict(greedy, max_len_a=0, max_len_b=max_len, min_len=1), sync=sync)
    if task == "refcoco":
        bins = dict(greedy)
        if tok.bin_offset + num_bins < tok.vocab_size:       # fewer bins in use than the vocabulary holds
            bins["constraint_range"] = (tok.bin_offset, tok.bin_offset + num_bins)
        return RefcocoEvaluator(tok, bins, restrict_bins=True, max_image_size=max_image_size, sync=sync)
    return None


def _records(ev: Evaluator, model, batch: dict) -> list[dict]:
    """This batch's records in the layout `summarise` reads."""
    if isinstance(ev, (VQAEvaluator, SnliVeEvaluator)):
        ids = batch["id"].tolist()
        qs = batch.get("question") or [None] * len(ids)
        return [{"id": i, "pred_answer": a, "ref": r, "question": q}
                for i, a, r, q in zip(ids, ev.choose(model, batch), batch["ref_dict"], qs)]
    return ev.predict(model, batch)


def evaluate_task(model, task: str, batches, tok, *, device, dtype, max_len: int, num_bins: int,
                  max_image_size: int, candidates: dict[str, int] | None,
                  eps: float) -> tuple[list[dict], float, float]:
    """Per-sample records of this rank plus (summed loss, sample size) of its batches."""
    ev = _evaluator(task, tok, max_len=max_len, num_bins=num_bins, max_image_size=max_image_size,
                    candidates=candidates, sync=partitioned(model))
    records: list[dict] = []
    loss_sum, size = 0.0, 0.0
    for raw in batches:
        b = to_device(raw, device, dtype)
        if task != "caption":        # caption eval targets are the '&&'-joined references: no meaningful loss
            ls, ss = batch_loss(model, b, eps)
            loss_sum, size = loss_sum + ls, size + ss
        if ev is not None and (not candidates or "ref_dict" in raw):
            records += _records(ev, model, b)
    return records, loss_sum, size


def num_eval_batches(max_samples: int, batch_size: int, world: int, available: int) -> int:
    if max_samples <= 0:
        return available
    return min(available, math.ceil(max_samples / (batch_size * world)))
