"""OFA pretraining (docs/ofa.md#pretraining-data): the vision-language file (caption / qa / visual_grounding rows, each
giving two examples incl. ITM-style yes/no with negatives from negative_sample/) plus the "v2" extras (2 text-infilling,
1 image-infilling, 1 detection sample) on every row whose epoch position is a multiple of 8.

Unusual points:
* Extras come with rows 0, 8, 16, ... of each rank's sequence (OFA's per-process counter), and are read from
  their files at a slot index k that is unique over ranks and epochs (two text rows 2k and 2k+1), modulo the file
  lengths, so a resumed run reads the same extras.
* Sizes scale with cfg: v1 crop S = patch_image_size (OFA 384), RandomResize short side in S*(1 + k/24), k=0..6
  (384..480 for S=384), long side clamped to 1.75*S (672); v2 images are v2_image_size (OFA 256). Boxes are always
  quantised against max_image_size (512), so pretraining bins stay below ~S/512 of the range, as in OFA.
* Collation returns (v1_batch, v2_batch) when the batch holds v2 samples, else v1_batch alone.
* The extras files follow the same rule for bad data as the main file: `read_extra(kind, fields)` checks a whole
  line (exact column count, ids, texts, codes, boxes inside the image, the image) and is what `validate --task
  pretrain_text|pretrain_image|pretrain_detection` runs; a bad extras row is counted and skipped like any other.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ..collate import Sample, collate
from ..images import (center_crop, decode_base64_image, hflip, large_scale_jitter, object_center_crop, random_augment,
                      random_resize, resize_exact, to_tensor)
from ..text import pre_caption, pre_question, span_mask
from ..tsv import BadRow, TSVFile
from .base import Task, box_inside, check_objects, need_id, need_text, parse_answers, parse_box, parse_codes
from .refcoco import box_bins

VL_TYPES = ("caption", "qa", "visual_grounding")
EXTRA_LAYOUTS = {"text": ("uniq-id", "text"), "image": ("uniq-id", "image", "codes"),
                 "detection": ("uniq-id", "image", "boxes")}
"""Columns of text_examples.tsv, image_examples.tsv and detection_examples.tsv."""

P_CAPTION = " what does the image describe?"
P_ITM = ' does the image describe " {} "?'
P_VQA_ITM = ' what is the answer to question " {} ". is " {} "?'
P_GROUND = ' which region does the text " {} " describe?'
P_GCAP = "  what does the region describe? region:"
P_TEXT = ' what is the complete text of " "?'
P_IMAGE = " what is the image in the middle part?"
P_DET = " what are the objects in the image?"


class PretrainTask(Task):
    name = "pretrain"
    default_cols = [0, 1, 2, 3, 4, 5, 6, 7]
    num_fields = 8
    layout = tuple((n, "field") for n in ("uniq-id", "image", "caption", "question", "refs", "gt_objects",
                                          "dataset_name", "type"))

    def __init__(self, cfg, split="train", tokenizer=None):
        super().__init__(cfg, split, tokenizer)
        s = cfg.patch_image_size
        self.scales = [int(round(s * (1 + k / 24))) for k in range(7)] if cfg.augment else [s]
        self.max_size = int(round(s * 1.75))
        self.captions, self.objects, self.type2ans, self.ans2type = [], [], {}, {}
        if cfg.neg_sample_dir:
            d = cfg.neg_sample_dir
            with open(os.path.join(d, "all_captions.txt"), encoding="utf-8") as f:
                self.captions = [x.strip() for x in f if x.strip()]
            with open(os.path.join(d, "object.txt"), encoding="utf-8") as f:
                self.objects = [x.strip() for x in f if x.strip()]
            with open(os.path.join(d, "type2ans.json"), encoding="utf-8") as f:
                self.type2ans = json.load(f)
            self.ans2type = {a: t for t, ans in self.type2ans.items() if t != "other" for a in ans}
        self.extra = {k: (TSVFile(p, cfg.index_cache_dir) if p else None)
                      for k, p in (("text", cfg.text_data), ("image", cfg.image_data),
                                   ("detection", cfg.detection_data))}

    # ---- negatives -------------------------------------------------------------------------------------------------
    @staticmethod
    def _pick_other(pool: list[str], avoid: str, rng) -> str:
        c = pool[int(rng.integers(max(len(pool) - 1, 1)))]
        return pool[-1] if c == avoid else c

    def negative_caption(self, caption: str, gt_objects: str, rng) -> str:
        if gt_objects.strip() and rng.random() > 0.6 and self.objects:
            gt = gt_objects.strip().split("&&")
            obj = gt[int(rng.integers(len(gt)))]
            return caption.replace(obj, self._pick_other(self.objects, obj, rng))
        if not self.captions:
            raise RuntimeError("pretraining needs neg_sample_dir/all_captions.txt for ITM negatives")
        return self.captions[int(rng.integers(len(self.captions)))]

    def negative_answer(self, answer: str, conf: float, rng) -> str:
        prob = rng.random()
        if conf > prob + 0.1 and answer in self.ans2type:
            t = self.ans2type[answer]
            if t == "how many" and answer.isdigit() and prob > 0.5:
                return str(int(answer) + (-1 if rng.random() < 0.5 else 1)) if answer != "0" else "1"
            return self._pick_other(self.type2ans[t], answer, rng)
        pool = self.type2ans.get("other") or sorted(self.ans2type)
        if not pool:
            raise RuntimeError("pretraining qa rows need neg_sample_dir/type2ans.json with an 'other' list")
        return self._pick_other(pool, answer, rng)

    # ---- v1 rows ---------------------------------------------------------------------------------------------------
    def _v1_image(self, img, rng):
        img, _ = random_resize(img, None, self.scales, self.max_size, rng)
        img, _ = center_crop(img, self.cfg.patch_image_size)
        if self.train and self.cfg.augment:
            img = random_augment(img, rng, 2, 7)
        return to_tensor(img)

    def _s(self, sid, src, ans, image, conf=1.0, extras=None):
        return self.std_sample(sid, src, ans, image=image, patch_mask=True, conf=conf, extras=extras or {})

    def parse(self, row):
        uniq_id, image, caption, question, refs, gt_objects, dataset_name, typ = self.fields(row)
        need_id(uniq_id)
        if typ not in VL_TYPES:
            raise BadRow(f"unknown vision-language type {typ[:30]!r}", "text")
        need_text(dataset_name, "dataset_name")
        check_objects(gt_objects, "gt_objects")
        ref, box = None, None
        if typ == "qa":
            need_text(question, "question", pre_question)
            ref = {a: c for c, a in parse_answers(refs)}
        else:
            need_text(caption, "caption" if typ == "caption" else "expression")
            if typ == "visual_grounding":
                box = parse_box(refs)
        img = decode_base64_image(image)
        if box is not None:
            box_inside(box, img, refs)
        return img, caption, question, ref, box, gt_objects, dataset_name, typ

    def make(self, parsed, sid, rng):
        img, caption, question, ref, box, gt_objects, dataset_name, typ = parsed
        mx, mw = self.cfg.max_src_length, self.cfg.max_tgt_length
        yes, no = self.enc(" yes"), self.enc(" no")
        if typ == "caption":
            x = self._v1_image(img, rng)
            tgt = pre_caption(caption, mw)
            out = [self._s(sid, self.enc(P_CAPTION), self.enc(" " + tgt), x)]
            if dataset_name == "cc12m":
                out[0].target[:2] = [self.pad] * min(2, len(out[0].target))
            if self.train:
                if rng.random() >= 0.5:
                    out.append(self._s(sid, self.enc(P_ITM.format(pre_caption(tgt, mx))), yes, x))
                else:
                    neg = pre_caption(self.negative_caption(tgt, gt_objects, rng), mx)
                    out.append(self._s(sid, self.enc(P_ITM.format(neg)), no, x))
            return out
        if typ == "qa":
            x = self._v1_image(img, rng)
            q = pre_question(question, mx)
            answer = max(ref, key=ref.get)
            conf = ref[answer]
            out = [self._s(sid, self.enc(" " + q), self.enc(" " + answer), x, conf)]
            if self.train:
                if rng.random() >= 0.5:
                    out.append(self._s(sid, self.enc(P_VQA_ITM.format(q, answer)), yes, x, conf))
                else:
                    neg = self.negative_answer(answer, conf, rng)
                    out.append(self._s(sid, self.enc(P_VQA_ITM.format(q, neg)), no, x, conf))
            return out
        img, boxes = random_resize(img, box, self.scales, self.max_size, rng)  # visual_grounding
        img, boxes = object_center_crop(img, boxes, self.cfg.patch_image_size)
        bins = [self.tok.bin_offset + b for b in box_bins(boxes[0], self.cfg.max_image_size, self.cfg.num_bins)]
        x = to_tensor(img)
        return [self._s(sid, self.enc(P_GROUND.format(pre_caption(caption, mx))), bins, x),
                self._s(sid, self.enc(P_GCAP) + bins, self.enc(" " + pre_caption(caption, mw)), x)]

    # ---- v2 extras -------------------------------------------------------------------------------------------------
    def read_extra(self, kind: str, fields: list[str]):
        """A whole line of an extras file ('text', 'image' or 'detection') -> parsed row, or BadRow."""
        names = EXTRA_LAYOUTS[kind]
        if len(fields) == 1 and not fields[0].strip():
            raise BadRow("empty line", "columns")
        if len(fields) != len(names):
            raise BadRow(f"has {len(fields)} columns, a {kind}_examples row has {len(names)} ({', '.join(names)})",
                         "columns")
        need_id(fields[0])
        if kind == "text":
            return need_text(fields[1], "text", lambda t, n: t.strip())
        if kind == "image":
            codes = parse_codes(fields[2])
            return decode_base64_image(fields[1]), codes
        boxes, names_, texts = [], [], []
        for item in fields[2].strip().split("&&"):
            parts = item.strip().split(",", 5)
            if len(parts) != 6 or not re.fullmatch(r"\s*[0-9]+\s*", parts[4]) or not parts[5].strip():
                raise BadRow(f"bad detection item {item[:40]!r} (expected x0,y0,x1,y1,cat_id,name)", "box")
            boxes.append(parse_box(",".join(parts[:4])))
            names_.append(parts[5])
            texts.append(",".join(parts[:4]))
        img = decode_base64_image(fields[1])
        for b, t in zip(boxes, texts):
            box_inside(b, img, t)
        return img, np.concatenate(boxes).astype(np.float64), names_

    def text_sample(self, sid: int, text: str, rng) -> Sample:
        ids = self.enc(" " + text.lower(), max_len=512)[-256:]
        full = [self.bos] + ids + [self.eos]
        masked = span_mask(full, self.tok.is_word_start(full), self.cfg.mask_ratio, self.cfg.poisson_lambda,
                           self.tok.mask, rng)
        pre = self.enc(P_TEXT)
        src = pre[:-2] + masked[1:-1] + pre[-2:]
        v = self.cfg.v2_image_size
        return Sample(id=sid, source=self.wrap(src), target=ids + [self.eos], prev=[self.bos] + ids,
                      image=np.zeros((3, v, v), np.float32), patch_mask=False, conf=2.0, v2=True)

    def image_sample(self, sid: int, parsed) -> Sample:
        img, codes = parsed
        v = self.cfg.v2_image_size
        img, _ = resize_exact(img, v, v)
        x = to_tensor(img)
        x[:, v // 4: 3 * v // 4, v // 4: 3 * v // 4] = 0
        ids = [self.tok.code_offset + c for c in codes]
        return Sample(id=sid, source=self.wrap(self.enc(P_IMAGE)), target=ids + [self.eos], prev=[self.bos] + ids,
                      image=x, patch_mask=True, code_mask=True, conf=2.0, v2=True)

    def detection_sample(self, sid: int, parsed, rng) -> Sample:
        img, b, names = parsed
        if rng.random() < 0.5:
            img, b = hflip(img, b)
        img, b, keep = large_scale_jitter(img, b, self.cfg.v2_image_size, rng)
        names = [n for n, k in zip(names, keep) if k]
        tgt: list[int] = []
        for box, name in zip(b, names):
            tgt += [self.tok.bin_offset + x for x in box_bins(box, self.cfg.max_image_size, self.cfg.num_bins)]
            tgt += self.enc(" " + name)
        return Sample(id=sid, source=self.wrap(self.enc(P_DET)), target=tgt + [self.eos], prev=[self.bos] + tgt,
                      image=to_tensor(img), patch_mask=True, conf=2.0, v2=True)

    def extra_sample(self, kind: str, sid: int, parsed, rng) -> Sample:
        if kind == "text":
            return self.text_sample(sid, parsed, rng)
        if kind == "image":
            return self.image_sample(sid, parsed)
        return self.detection_sample(sid, parsed, rng)

    def v2_samples(self, slot: int, rng):
        """Extras for extras-slot `slot` (train split only): (samples, bad rows as (file:line, category, reason)).
        Every row read gives one of them. Slot k reads text rows
        2k and 2k+1, image row k and detection row k (modulo the file lengths)."""
        if not self.train:
            return [], []
        k = slot
        out, bad = [], []
        jobs = []
        if self.extra["text"] is not None:
            jobs += [("text", 2 * k), ("text", 2 * k + 1)]
        if self.extra["image"] is not None:
            jobs.append(("image", k))
        if self.extra["detection"] is not None:
            jobs.append(("detection", k))
        for kind, j in jobs:
            f = self.extra[kind]
            i = j % len(f)
            try:
                parsed = self.read_extra(kind, f.fields(i))
            except BadRow as e:
                bad.append((f.where(i), e.category, str(e)))
                continue
            out.append(self.extra_sample(kind, i, parsed, rng))
        return out, bad

    def collate(self, samples):
        v1 = [s for s in samples if not s.v2]
        v2 = [s for s in samples if s.v2]
        vocab, fmt = self.tok.vocab_size, self.cfg.constraint_masks
        b2 = collate(v2, self.cfg.v2_image_size, vocab, fmt) if v2 else None
        if not v1:
            return b2
        b1 = collate(v1, self.cfg.patch_image_size, vocab, fmt)
        return (b1, b2) if b2 is not None else b1
