"""One spec per task family: a request (a dict of inputs) -> a Sample, and a batch -> (text, score, box) per sample.

Prompts and transforms are not written here: every sample is built by the data path's own task builder
(`ofa_ds.data.tasks.*.make`, the code that makes evaluation samples), so a prediction sees exactly the tokens and
pixels the model was finetuned and evaluated on. The builders expect a labelled row; the label fields they are handed
here (caption "x", answer "x", box 0,0,0,0, ...) only shape the unused target tokens. Decoding uses
`ofa_ds.generation` with the per-task settings of `TASK_DEFAULTS` and the same post-processing as
`ofa_ds.metrics.tasks`.

What is unusual:
  * OFA-CN checkpoints (BERT-Chinese vocabulary) get OFA-CN's Chinese source prompts (docs/ofa.md#prompts) for
    captioning, grounding and summarisation; the sample is built by the same builder and only its source tokens are
    replaced. VQA questions are their own prompt. Entailment and classification have no OFA-CN prompt and are refused.
  * Scores: generation tasks give the best hypothesis' score (sum of token log-probs / length^lenpen, as the beam
    search ranks them; raw sum for VQA beam search); all-candidate tasks give the chosen candidate's summed log-prob.
  * Grounding boxes come back in the pixels of the input image (after EXIF rotation): the 4 bins are mapped back
    through `max_image_size` and the per-axis resize ratios, as OFA's evaluation does.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ofa_ds.data.config import DataConfig
from ofa_ds.data.text import build_trie, pre_caption, strip_punct_words
from ofa_ds.generation import BOS, boxes_from_hypos, generate, score_candidates, strip_prefix, task_config

from .inputs import InputError, load_image, need

CN_PROMPTS = {
    "caption": "图片描述了什么内容?",
    "grounding": '这段文字" {} "描述的是哪个区域？',
    "summarize": "{} 请用一个句子简单总结上文：",
}
"""OFA-CN's source prompts (docs/ofa.md#prompts); {} is the normalised expression / article."""

Result = tuple[Optional[str], Optional[float], Optional[list[float]]]


class Spec:
    """A task family: `prepare` (per request, may raise InputError) and `run` (per batch)."""

    name = "base"
    task = "caption"                 # the ofa_ds.data task whose builder makes the samples
    defaults = "caption"             # the TASK_DEFAULTS entry of its decoding
    image_size = 480
    has_image = True
    cn = False                       # whether OFA-CN has a prompt for it

    def __init__(self, tok, gen: Optional[dict] = None, image_size: Optional[int] = None, exif: bool = True,
                 **data_kw: Any):
        from ofa_ds.data.tasks import make_task
        self.tok, self.exif = tok, exif
        self.zh = getattr(tok, "lang", "en") == "zh"
        if self.zh and not self.cn:
            raise ValueError(f"OFA-CN checkpoints have no {self.name} prompt; they answer caption, vqa, grounding "
                             f"and summarize")
        size = image_size or self.image_size
        self.cfg = DataConfig(task=self.task, patch_image_size=size, **data_kw)
        self.builder = make_task(self.cfg, "valid", tok)
        self.gen = task_config(self._defaults(), **(gen or {}))
        self.rng = np.random.default_rng(0)          # builders take one; eval transforms never draw from it

    def _defaults(self) -> str:
        return self.defaults

    def image(self, req: dict):
        if "image" not in req or req["image"] is None:
            raise InputError("no image given")
        return load_image(req["image"], exif=self.exif)

    def prepare(self, req: dict, sid: int):
        raise NotImplementedError

    def run(self, model, batch: dict) -> list[Result]:
        raise NotImplementedError

    def cn_source(self, smp, text: str):
        smp.source = self.builder.wrap(self.tok.encode(text))
        return smp


class Caption(Spec):
    """Captioning; OFA-Huge decodes with its own settings (beam 10, lenpen and temperature 0.98)."""
    name, task, cn = "caption", "caption", True

    def __init__(self, tok, gen=None, image_size=None, exif=True, huge=False):
        self.huge = huge
        super().__init__(tok, gen, image_size, exif)

    def _defaults(self):
        return "caption_cn" if self.zh else "caption_huge" if self.huge else "caption"

    def prepare(self, req, sid):
        smp = self.builder.make((str(sid), self.image(req), "x"), sid, self.rng)
        return self.cn_source(smp, CN_PROMPTS["caption"]) if self.zh else smp

    def run(self, model, batch):
        hyps = generate(model, batch, self.gen)
        return [(strip_punct_words(self.tok.decode(h[0]["tokens"])) if h else "",
                 float(h[0]["score"]) if h else None, None) for h in hyps]


class VQA(Spec):
    """Open-ended: beam search with the question forced as the decoder prefix (OFA's VQA beam settings; no trie);
    `answers`: all-candidate scoring over that list with its trie (OFA's paper numbers); `zero_shot`: a
    pretrained checkpoint's free beam 20 with the standard prompt layout."""
    name, task, cn = "vqa", "vqa", True

    def __init__(self, tok, gen=None, image_size=None, exif=True, answers=None, zero_shot=False, chunk_rows=256):
        self.zero_shot = zero_shot
        super().__init__(tok, gen, image_size, exif, prompt_type="none" if zero_shot else "prev_output")
        self.answers = [str(a) for a in answers] if answers is not None else None
        if self.answers is not None:
            if not self.answers or any(not a.strip() for a in self.answers):
                raise ValueError("the answer list is empty or has an empty answer")
            self.cands = [tok.encode(" " + a) for a in self.answers]
            self.trie = build_trie(tok, self.answers)
        self.chunk_rows = chunk_rows

    def _defaults(self):
        return "vqa_zero_shot" if self.zero_shot else "vqa_beam"

    def prepare(self, req, sid):
        question = need(req.get("question"), "question", question=True)
        objects = req.get("objects") or ""
        return self.builder.make((str(sid), self.image(req), question, {"x": 1.0}, objects), sid, self.rng)

    def run(self, model, batch):
        prompts = [list(p) for p in batch["decoder_prompt"]]
        if self.answers is not None:
            return choose(model, batch, prompts, self.cands, self.trie, self.answers, self.chunk_rows)
        prefix = [p[1:] for p in prompts]
        hyps = generate(model, batch, self.gen, prefix_tokens=prefix if any(prefix) else None)
        return [(self.tok.decode(strip_prefix(h[0], len(p))).strip() if h else "",
                 float(h[0]["score"]) if h else None, None) for h, p in zip(hyps, prefix)]


class Grounding(Spec):
    """Visual grounding: the region a text describes, (x0, y0, x1, y1) in the input image's pixels."""
    name, task, defaults, image_size, cn = "grounding", "refcoco", "refcoco", 512, True

    def __init__(self, tok, gen=None, image_size=None, exif=True, restrict_bins=False):
        gen = dict(gen or {})
        if restrict_bins:
            gen.setdefault("bin_steps", 4)
        super().__init__(tok, gen, image_size, exif, max_image_size=512)

    def prepare(self, req, sid):
        text = need(req.get("text"), "text")
        img = self.image(req)
        smp = self.builder.make((str(sid), img, text, np.zeros((1, 4))), sid, self.rng)
        if self.zh:
            smp = self.cn_source(smp, CN_PROMPTS["grounding"].format(pre_caption(text, self.cfg.max_src_length)))
        return smp

    def run(self, model, batch):
        hyps = generate(model, batch, self.gen, bin_offset=self.tok.bin_offset)
        return [(None, float(h[0]["score"]) if h else None, box)
                for h, box in zip(hyps, self.boxes(hyps, batch))]

    def boxes(self, hyps, batch) -> list[list[float]]:
        """Best hypotheses' first 4 tokens -> boxes in original pixels (OFA's rule: generation.boxes_from_hypos)."""
        as_list = lambda v: v.tolist() if isinstance(v, torch.Tensor) else list(v)  # noqa: E731
        return boxes_from_hypos(hyps, self.tok, as_list(batch["w_resize_ratios"]), as_list(batch["h_resize_ratios"]),
                                self.cfg.max_image_size)


def choose(model, batch, prompts, cands, trie, answers, chunk_rows: int = 256) -> list[Result]:
    """All-candidate scoring (ofa_ds.generation.score_candidates): the best candidate and its summed log-prob."""
    enc = model.encode(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"))
    scores = score_candidates(model, enc, prompts, cands, trie=trie, chunk_rows=chunk_rows)
    best, idx = scores.max(1)
    return [(answers[j], float(s), None) for s, j in zip(best.tolist(), idx.tolist())]


class Entailment(Spec):
    """Visual entailment (SNLI-VE): yes (entailment), no (contradiction) or maybe (neutral) by all-candidate
    scoring. With a premise the prompt is the released finetunes' (add_caption), without it the plain one."""
    name, task, defaults = "entailment", "snli_ve", "snli_ve"

    def __init__(self, tok, gen=None, image_size=None, exif=True):
        super().__init__(tok, gen, image_size, exif, add_caption=True)
        from ofa_ds.data.tasks import make_task
        from ofa_ds.data.tasks.snli_ve import ANS2LABEL
        self.plain = make_task(DataConfig(task=self.task, patch_image_size=self.cfg.patch_image_size), "valid", tok)
        self.answers = [a for a, _ in sorted(ANS2LABEL.items(), key=lambda kv: kv[1])]
        self.cands = [tok.encode(" " + a) for a in self.answers]
        self.trie = build_trie(tok, self.answers)

    def prepare(self, req, sid):
        hyp = need(req.get("hypothesis", req.get("text")), "hypothesis")
        premise = req.get("premise")
        builder = self.builder if premise is not None else self.plain
        if premise is not None:
            need(premise, "premise")
        return builder.make((str(sid), self.image(req), hyp, premise or "x", "yes"), sid, self.rng)

    def run(self, model, batch):
        return choose(model, batch, [list(p) for p in batch["decoder_prompt"]], self.cands, self.trie, self.answers)


class Classify(Spec):
    """Image classification over given class names (OFA's ImageNet finetune: caption prompt, no decoder prompt,
    ImageNet mean/std, all-candidate scoring with the class-name trie)."""
    name, task, defaults = "classify", "imagenet", "imagenet"

    def __init__(self, tok, gen=None, image_size=None, exif=True, classes=(), chunk_rows=256):
        super().__init__(tok, gen, image_size, exif, imagenet_default_mean_and_std=True)
        self.classes = [str(c) for c in classes]
        if not self.classes or any(not c.strip() for c in self.classes):
            raise ValueError("classification needs a list of non-empty class names")
        self.cands = [tok.encode(" " + c) for c in self.classes]
        self.trie = build_trie(tok, self.classes)
        self.chunk_rows = chunk_rows

    def prepare(self, req, sid):
        return self.builder.make((self.image(req), "x"), sid, self.rng)

    def run(self, model, batch):
        prompts = [[BOS] for _ in range(batch["src_tokens"].shape[0])]
        return choose(model, batch, prompts, self.cands, self.trie, self.classes, self.chunk_rows)


class Summarize(Spec):
    """Gigaword-style one-sentence summary of a text (no image). The text is the decoded summary with whitespace
    collapsed; OFA's ROUGE post-processing (digits to '#', PTB fixes; ofa_ds.metrics.rouge) is for scoring only."""
    name, task, defaults, has_image, cn = "summarize", "gigaword", "gigaword", False, True

    def __init__(self, tok, gen=None, image_size=None, exif=True):
        super().__init__(tok, gen, image_size, exif, max_src_length=512, max_tgt_length=64)

    def prepare(self, req, sid):
        text = need(req.get("text"), "text")
        smp = self.builder.make((text, "x"), sid, self.rng)
        if self.zh:
            src = pre_caption(text, self.cfg.max_src_length)
            ids = self.tok.encode(CN_PROMPTS["summarize"].format(src), max_len=self.cfg.max_src_length)
            smp.source = self.builder.wrap(ids)
        return smp

    def run(self, model, batch):
        hyps = generate(model, batch, self.gen)
        out = []
        for h in hyps:
            text = self.tok.decode(h[0]["tokens"]) if h else ""
            out.append((" ".join(text.split()), float(h[0]["score"]) if h else None, None))
        return out


SPECS: dict[str, type[Spec]] = {"caption": Caption, "vqa": VQA, "grounding": Grounding, "entailment": Entailment,
                                "classify": Classify, "summarize": Summarize}
ALIASES = {"refcoco": "grounding", "snli_ve": "entailment", "imagenet": "classify", "gigaword": "summarize",
           "classification": "classify", "summarization": "summarize", "visual_entailment": "entailment"}
"""OFA's task names (and long forms) for the same specs."""
