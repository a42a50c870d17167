"""Per-task evaluators: turn a collated batch into prediction records with OFA's decoding settings (the per-task
settings of `ofa_ds.generation.TASK_DEFAULTS`), and a list of records (gathered from every rank) into the task's
metrics. `launch/evaluate.py` and the held-out evaluation during training (`ofa_ds.training.evaluate`) both decode
and score through these; the model is any object with OFAModel's encode/decode.

What is unusual:
  * A record carries everything its metric needs (references, reference dict, ground-truth box), so metrics are
    computed from the gathered records alone; records are keyed by the TSV row id ("id") and sorted by it before
    scoring, so any number of ranks gives bit-identical metrics.
  * Captions: decoded text with all string.punctuation removed (OFA's post-processing), CIDEr-D in corpus mode
    with the chosen tokenizer backend (recorded in the metrics). VQA: all-candidate scoring by default (paper
    numbers), or beam search with the question forced as prefix and the answer trie. RefCOCO: beam 5 on 4 tokens;
    `restrict_bins` additionally limits those tokens to location bins (off by default, like OFA).
  * Metrics are fractions (COCO scale for CIDEr: 1.382 = "138.2"), except `n` counts.
  * Under ZeRO-3 pass `sync=True` (generation in lockstep) and give every rank the same batches (equalised
    shards): all-candidate scoring makes a number of decoder calls that depends only on the batch size and the
    candidate list, so it needs no extra synchronisation.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ofa_ds.data.text import strip_punct_words
from ofa_ds.generation import (BOS, boxes_from_hypos, build_trie, generate, score_candidates,
                               strip_prefix, task_config)
from ofa_ds.metrics.caption import caption_scores
from ofa_ds.metrics.rouge import gigaword_hypothesis, rouge_scores
from ofa_ds.metrics.simple import box_iou, grounding_hits, vqa_score


def _ids(batch: dict) -> list[int]:
    return [int(i) for i in batch["id"].tolist()]


def _as_list(v: Any) -> list:
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


class Evaluator:
    name = "base"
    defaults = "caption"

    def __init__(self, tokenizer, gen_overrides: Optional[dict] = None, **kw: Any):
        self.tok = tokenizer
        self.gen = task_config(self.defaults, **(gen_overrides or {}))
        self.kw = kw
        self.sync = bool(kw.get("sync", False))   # ZeRO-3 callers: generation in lockstep across ranks

    def predict(self, model, batch: dict) -> list[dict]:
        raise NotImplementedError

    def metrics(self, records: list[dict]) -> dict:
        raise NotImplementedError

    @staticmethod
    def dedupe(records: list[dict]) -> list[dict]:
        seen: dict[int, dict] = {}
        for r in records:
            seen.setdefault(r["id"], r)
        return [seen[k] for k in sorted(seen)]


class CaptionEvaluator(Evaluator):
    name, defaults = "caption", "caption"

    def predict(self, model, batch):
        hyps = generate(model, batch, self.gen, sync=self.sync)
        out = []
        for i, sid in enumerate(_ids(batch)):
            text = self.tok.decode(hyps[i][0]["tokens"]) if hyps[i] else ""
            cap = strip_punct_words(text)
            out.append({"id": sid, "image_id": str(batch["uniq_id"][i]), "caption": cap,
                        "refs": list(batch["captions"][i])})
        return out

    def metrics(self, records):
        recs = self.dedupe(records)
        preds = {r["id"]: r["caption"] for r in recs}
        refs = {r["id"]: r["refs"] for r in recs}
        return caption_scores(preds, refs, tokenizer=self.kw.get("caption_tokenizer", "auto"))


class _AllCandidate(Evaluator):
    """Shared by VQA / SNLI-VE / ImageNet: argmax over every candidate's summed log-prob of answer + eos.
    `constrained=False` (keyword): the log-softmax runs over the whole vocabulary instead of the candidate trie."""

    def __init__(self, tokenizer, answers: list[str], gen_overrides=None, mode: str = "allcand", **kw):
        if kw.get("zero_shot"):                   # pretrained checkpoint: free beam 20, unnormalised, no trie
            mode = "beam"
            self.defaults = "vqa_zero_shot"
        super().__init__(tokenizer, gen_overrides, **kw)
        self.answers = list(answers)
        self.cand_tokens = [tokenizer.encode(" " + a) for a in self.answers]
        self.trie = build_trie(tokenizer, self.answers) if kw.get("constrained", True) else None
        self.mode = mode
        self.chunk_rows = int(kw.get("chunk_rows", 256))

    def prompts(self, batch) -> list[list[int]]:
        return [list(p) for p in batch["decoder_prompt"]]

    first_token_only = False

    def choose(self, model, batch) -> list[str]:
        prompts = self.prompts(batch)
        if self.mode == "beam":
            prefix = [p[1:] for p in prompts]
            trie = None if self.kw.get("zero_shot") else self.trie
            hyps = generate(model, batch, self.gen, prefix_tokens=prefix, trie=trie, sync=self.sync)
            return [self.tok.decode(strip_prefix(h[0], len(p))).strip() if h else "" for h, p in zip(hyps, prefix)]
        enc = model.encode(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"))
        scores = score_candidates(model, enc, prompts, self.cand_tokens, trie=self.trie, chunk_rows=self.chunk_rows,
                                  first_token_only=self.first_token_only)
        return [self.answers[j] for j in scores.argmax(1).tolist()]


class VQAEvaluator(_AllCandidate):
    name, defaults = "vqa", "vqa_beam"

    def predict(self, model, batch):
        preds = self.choose(model, batch)
        return [{"id": sid, "question_id": str(batch["uniq_id"][i]), "answer": a,
                 "score": vqa_score(a, batch["ref_dict"][i])} for i, (sid, a) in enumerate(zip(_ids(batch), preds))]

    def metrics(self, records):
        recs = self.dedupe(records)
        return {"vqa_acc": sum(r["score"] for r in recs) / max(len(recs), 1), "n": len(recs), "mode": self.mode}


class SnliVeEvaluator(_AllCandidate):
    name, defaults = "snli_ve", "vqa_beam"

    def predict(self, model, batch):
        preds = self.choose(model, batch)
        return [{"id": sid, "uniq_id": str(batch["uniq_id"][i]), "answer": a,
                 "gold": max(batch["ref_dict"][i], key=batch["ref_dict"][i].get)}
                for i, (sid, a) in enumerate(zip(_ids(batch), preds))]

    def metrics(self, records):
        recs = self.dedupe(records)
        return {"acc": sum(r["answer"] == r["gold"] for r in recs) / max(len(recs), 1), "n": len(recs),
                "mode": self.mode}


class ImageNetEvaluator(SnliVeEvaluator):
    name = "imagenet"

    def prompts(self, batch):
        return [[BOS] for _ in range(batch["src_tokens"].shape[0])]

    def predict(self, model, batch):
        preds = self.choose(model, batch)
        return [{"id": sid, "answer": a, "gold": next(iter(batch["ref_dict"][i]))}
                for i, (sid, a) in enumerate(zip(_ids(batch), preds))]


class GlueEvaluator(SnliVeEvaluator):
    """GLUE: one forward over the decoder prompt (prompt_type src: the whole source), argmax of the label
    tokens' first-token log-probs at the last position; accuracy, plus MCC for CoLA."""
    name = "glue"
    first_token_only = True

    def predict(self, model, batch):
        preds = self.choose(model, batch)
        return [{"id": sid, "answer": a, "gold": next(iter(batch["ref_dict"][i]))}
                for i, (sid, a) in enumerate(zip(_ids(batch), preds))]

    def metrics(self, records):
        from ofa_ds.metrics.simple import matthews_corr
        recs = self.dedupe(records)
        out = {"acc": sum(r["answer"] == r["gold"] for r in recs) / max(len(recs), 1), "n": len(recs)}
        if self.kw.get("task") == "cola":
            out["mcc"] = matthews_corr([r["answer"] for r in recs], [r["gold"] for r in recs])
        return out


class RefcocoEvaluator(Evaluator):
    name, defaults = "refcoco", "refcoco"

    def __init__(self, tokenizer, gen_overrides=None, restrict_bins: bool = False, max_image_size: int = 512, **kw):
        gen_overrides = dict(gen_overrides or {})
        if restrict_bins:
            gen_overrides.setdefault("bin_steps", 4)
        super().__init__(tokenizer, gen_overrides, **kw)
        self.max_image_size = max_image_size

    def predict(self, model, batch):
        hyps = generate(model, batch, self.gen, bin_offset=self.tok.bin_offset, sync=self.sync)
        boxes = boxes_from_hypos(hyps, self.tok, _as_list(batch["w_resize_ratios"]),
                                 _as_list(batch["h_resize_ratios"]), self.max_image_size)
        gt = torch.as_tensor(batch["region_coords"], dtype=torch.float64).view(-1, 4)
        pred = torch.tensor(boxes, dtype=torch.float64).view(-1, 4)
        iou, hit = box_iou(pred, gt), grounding_hits(pred, gt)
        return [{"id": sid, "uniq_id": str(batch["uniq_id"][i]), "box": boxes[i], "gt": gt[i].tolist(),
                 "iou": float(iou[i]), "hit": bool(hit[i])} for i, sid in enumerate(_ids(batch))]

    def metrics(self, records):
        recs = self.dedupe(records)
        n = max(len(recs), 1)
        return {"acc@0.5": sum(r["hit"] for r in recs) / n, "mean_iou": sum(r["iou"] for r in recs) / n,
                "n": len(recs)}


class GigawordEvaluator(Evaluator):
    name, defaults = "gigaword", "gigaword"

    def predict(self, model, batch):
        hyps = generate(model, batch, self.gen, sync=self.sync)
        out = []
        for i, sid in enumerate(_ids(batch)):
            text = self.tok.decode(hyps[i][0]["tokens"]) if hyps[i] else ""
            out.append({"id": sid, "summary": gigaword_hypothesis(text), "ref": batch["target_str"][i]})
        return out

    def metrics(self, records):
        recs = self.dedupe(records)
        return rouge_scores([r["summary"] for r in recs], [r["ref"].lower() for r in recs])


EVALUATORS = {"caption": CaptionEvaluator, "vqa": VQAEvaluator, "snli_ve": SnliVeEvaluator,
              "imagenet": ImageNetEvaluator, "refcoco": RefcocoEvaluator, "gigaword": GigawordEvaluator}
GLUE = ("cola", "sst2", "mrpc", "qqp", "mnli", "rte", "qnli")
EVALUATORS.update({t: GlueEvaluator for t in GLUE})


def make_evaluator(task_name: str, data_task, tokenizer, gen_overrides: Optional[dict] = None, **kw) -> Evaluator:
    """Evaluator for `task_name` given the data-side task builder (`ofa_ds.data.make_task(cfg, "valid")`), whose
    candidate answers (ans2label) feed the all-candidate tasks."""
    if task_name not in EVALUATORS:
        raise KeyError(f"no evaluator for task {task_name!r}; choose one of {sorted(EVALUATORS)}")
    cls = EVALUATORS[task_name]
    if cls is GlueEvaluator:
        return cls(tokenizer, list(data_task.answers), gen_overrides, task=task_name, **kw)
    if issubclass(cls, _AllCandidate):
        a2l = getattr(data_task, "ans2label", None)
        if not a2l:
            raise ValueError(f"task {task_name!r} needs candidate answers: set ans2label_file (e.g. --ans2label)")
        answers = [a for a, _ in sorted(a2l.items(), key=lambda kv: (kv[1], kv[0]))]
        return cls(tokenizer, answers, gen_overrides, **kw)
    return cls(tokenizer, gen_overrides, **kw)

