"""Held-out evaluation during and after training: loss, VQA-style all-candidate accuracy, greedy captioning (CIDEr-D)
and greedy grounding (Acc@0.5), each next to its trivial baseline.

Unusual points:
  * Every rank runs the same number of batches and the same number of decoding steps (no early exit when all
    sequences have finished), because under ZeRO-3 each forward gathers parameters collectively: a rank that
    stopped early would hang the others (user-needs §2.2). Shards are equalised by the data stream (wrap-round);
    results are gathered and de-duplicated by sample id.
  * All-candidate scoring (§8.3) sums the log-probabilities of answer + eos after the sample's decoder prompt, with
    no constraint and no length normalisation; candidates run in chunks so that no logits tensor exceeds ~64 M floats.
  * Grounding decodes exactly 4 tokens restricted to the location bins (OFA does not restrict; an early-training
    model otherwise emits words there). Box = bins / (num_bins−1) · max_image_size / resize ratio (§8.4).
  * Trivial baselines come from the training files named in `EvalConfig.reference_stats`: the most frequent VQA
    answer, the most frequent caption, the mean box (in original pixels). With `EvalConfig.vqa_answer_types` (a
    type2ans.json) VQA accuracy is also reported per answer type (`vqa_acc_<type>`, by the best reference answer).
  * The full beam-search generator (constraint tries, n-gram blocking, per-task settings of §8.2) belongs to the
    inference module; this file only needs greedy decoding.
"""
from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ofa_ds.losses import label_smoothed_ce, pair_loss

BOS, PAD, EOS = 0, 1, 2
NET_KEYS = ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens", "code_masks")
_PUNCT = str.maketrans("", "", string.punctuation)


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
    """Records with repeated 'id's dropped (first kept)."""
    seen, out = set(), []
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


# ---- scoring primitives ----------------------------------------------------------------------------------------------
@torch.no_grad()
def candidate_scores(model, batch: dict, candidates: list[list[int]], prompts: list[list[int]],
                     max_floats: int = 64_000_000) -> torch.Tensor:
    """Sum of log p(candidate + eos | image, source, decoder prompt): Float[B, C] (§8.3)."""
    enc = model.encode(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"))
    B, C, V = batch["src_tokens"].shape[0], len(candidates), model.cfg.vocab_size
    dev = batch["src_tokens"].device
    scores = torch.empty(B, C, device=dev)
    for i in range(B):
        p = list(prompts[i])
        seqs = [p + c for c in candidates]                        # decoder input: prompt + answer
        tgts = [p[1:] + c + [EOS] for c in candidates]            # shifted: prompt positions, answer, eos
        T = max(len(s) for s in seqs)
        step = max(1, max_floats // ((max(map(len, candidates)) + 64) * V))   # same chunks on every rank
        for c0 in range(0, C, step):
            sl = slice(c0, min(C, c0 + step))
            prev = torch.full((sl.stop - sl.start, T), PAD, dtype=torch.long, device=dev)
            tgt = torch.full_like(prev, PAD)
            for j, (s, t) in enumerate(zip(seqs[sl], tgts[sl])):
                prev[j, : len(s)] = torch.tensor(s, device=dev)
                tgt[j, : len(t)] = torch.tensor(t, device=dev)
            tgt[:, : len(p) - 1] = PAD                            # prompt positions are not scored
            e = enc.index_select(torch.full((prev.shape[0],), i, dtype=torch.long, device=dev))
            lp = F.log_softmax(model.decode(prev, e).float(), -1)
            tok = lp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1).masked_fill(tgt.eq(PAD), 0.0)
            scores[i, sl] = tok.sum(-1)
    return scores


@torch.no_grad()
def greedy(model, batch: dict, steps: int, allowed: torch.Tensor | None = None,
           force_len: bool = False) -> list[list[int]]:
    """Greedy decoding from bos for exactly `steps` steps (lockstep across ranks). `allowed` Bool[V] restricts the
    vocabulary; with force_len eos is never chosen. Returns the tokens before the first eos per sample."""
    enc = model.encode(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"))
    B = batch["src_tokens"].shape[0]
    dev = batch["src_tokens"].device
    prev = torch.full((B, 1), BOS, dtype=torch.long, device=dev)
    cache: dict = {}
    for _ in range(steps):
        logits = model.decode(prev, enc, cache=cache)[:, -1].float()      # [B, V]
        logits[:, PAD] = float("-inf")
        logits[:, BOS] = float("-inf")
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if force_len:
            logits[:, EOS] = float("-inf")
        prev = torch.cat([prev, logits.argmax(-1, keepdim=True)], 1)
    out = []
    for row in prev[:, 1:].tolist():
        out.append(row[: row.index(EOS)] if EOS in row else row)
    return out


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
def iou(a, b) -> tuple[float, bool]:
    """IoU of two (x0, y0, x1, y1) boxes and whether the intersection has positive width and height (§9)."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / (union + 1e-6), iw > 0 and ih > 0


def caption_words(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def cider(hyps: list[str], refs: list[list[str]]) -> float:
    from ofa_ds.metrics.cider import CiderD
    return CiderD().compute([caption_words(h) for h in hyps], [[caption_words(r) for r in rs] for rs in refs])[0]


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


def _best_answer(answers: str) -> str:
    items = [x.split("|!+", 1) if "|!+" in x else ("1.0", x) for x in answers.split("&&")]
    return max(items, key=lambda t: float(t[0]))[1]


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
        per.setdefault(question_key(q), Counter())[_best_answer(a)] += 1
    majority = sum(per.values(), Counter()).most_common(1)[0][0]
    types = load_answer_types(answer_types) if answer_types else {}
    return VQABaselines(majority, {q: c.most_common(1)[0][0] for q, c in per.items()}, types)


def majority_caption(caption_train_tsv: str) -> str:
    return Counter(caption_words(c) for c in _column(caption_train_tsv, 2)).most_common(1)[0][0]


def mean_box(refcoco_train_tsv: str) -> list[float]:
    boxes = [[float(v) for v in b.split(",")] for b in _column(refcoco_train_tsv, 3)]
    return [sum(b[k] for b in boxes) / len(boxes) for k in range(4)]


def summarise(task: str, records: list[dict], baseline: Any, tok) -> dict[str, float]:
    """Metrics of one task from the gathered per-sample records (and the trivial baseline when known)."""
    out: dict[str, float] = {f"{task}_n": float(len(records))}
    if not records:
        return out
    if "pred_answer" in records[0]:
        out[f"{task}_acc"] = sum(r["ref"].get(r["pred_answer"], 0.0) for r in records) / len(records)
        if baseline is not None:
            prior = baseline if isinstance(baseline, VQABaselines) else None
            majority = prior.majority if prior else baseline
            out[f"{task}_majority_baseline"] = sum(r["ref"].get(majority, 0.0) for r in records) / len(records)
            if prior and all(r.get("question") is not None for r in records):
                out[f"{task}_question_prior_baseline"] = sum(
                    r["ref"].get(prior.by_question.get(question_key(r["question"]), majority), 0.0)
                    for r in records) / len(records)
            if prior and prior.answer_type:      # accuracy by the type of each question's best reference answer
                groups: dict[str, list[float]] = {}
                for r in records:
                    best = max(r["ref"], key=r["ref"].get) if r["ref"] else ""
                    key = type_metric_name(task, prior.answer_type.get(best, "other"))
                    groups.setdefault(key, []).append(r["ref"].get(r["pred_answer"], 0.0))
                out.update({k: sum(v) / len(v) for k, v in sorted(groups.items())})
    if "caption" in records[0]:
        refs = [r["refs"] for r in records]
        out[f"{task}_cider"] = cider([r["caption"] for r in records], refs)
        out[f"{task}_exact"] = sum(caption_words(r["caption"]) in {caption_words(x) for x in r["refs"]}
                                   for r in records) / len(records)
        if baseline is not None:
            out[f"{task}_constant_baseline_cider"] = cider([baseline] * len(records), refs)
    if "box" in records[0]:
        ious = [iou(r["box"], r["gt"]) for r in records]
        out[f"{task}_acc50"] = sum(v >= 0.5 and pos for v, pos in ious) / len(records)
        out[f"{task}_miou"] = sum(v for v, _ in ious) / len(records)
        if baseline is not None:
            bi = [iou(baseline, r["gt"]) for r in records]
            out[f"{task}_mean_box_baseline_acc50"] = sum(v >= 0.5 and p for v, p in bi) / len(records)
            out[f"{task}_mean_box_baseline_miou"] = sum(v for v, _ in bi) / len(records)
    return out


# ---- one task --------------------------------------------------------------------------------------------------------
def evaluate_task(model, task: str, batches, tok, *, device, dtype, max_len: int, num_bins: int,
                  max_image_size: int, candidates: dict[str, int] | None,
                  eps: float) -> tuple[list[dict], float, float]:
    """Per-sample records of this rank plus (summed loss, sample size) of its batches."""
    records: list[dict] = []
    loss_sum, size = 0.0, 0.0
    cand_names = sorted(candidates, key=candidates.get) if candidates else None
    cand_ids = [tok.encode(" " + a) for a in cand_names] if cand_names else None
    bins = None
    if task == "refcoco":
        bins = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
        bins[tok.bin_offset: tok.bin_offset + num_bins] = True
    for raw in batches:
        b = to_device(raw, device, dtype)
        if task != "caption":        # caption eval targets are the '&&'-joined references: no meaningful loss
            ls, ss = batch_loss(model, b, eps)
            loss_sum, size = loss_sum + ls, size + ss
        ids = raw["id"].tolist()
        if cand_ids is not None and "ref_dict" in raw:
            prompts = raw.get("decoder_prompt") or [[BOS]] * len(ids)
            best = candidate_scores(model, b, cand_ids, prompts).argmax(-1).tolist()
            qs = raw.get("question") or [None] * len(ids)
            records += [{"id": i, "pred_answer": cand_names[k], "ref": r, "question": q}
                        for i, k, r, q in zip(ids, best, raw["ref_dict"], qs)]
        elif task == "caption":
            for i, seq, refs in zip(ids, greedy(model, b, max_len), raw["captions"]):
                records.append({"id": i, "caption": tok.decode(seq), "refs": list(refs)})
        elif task == "refcoco":
            seqs = greedy(model, b, 4, allowed=bins, force_len=True)
            for k, (i, seq) in enumerate(zip(ids, seqs)):
                box = tok.ids_to_box(seq, max_image_size, float(raw["w_resize_ratios"][k]),
                                     float(raw["h_resize_ratios"][k]))
                records.append({"id": i, "box": box, "gt": [float(v) for v in raw["region_coords"][k]]})
    return records, loss_sum, size


def num_eval_batches(max_samples: int, batch_size: int, world: int, available: int) -> int:
    if max_samples <= 0:
        return available
    return min(available, math.ceil(max_samples / (batch_size * world)))
