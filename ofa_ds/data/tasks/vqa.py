"""VQAv2 (docs/ofa.md#vqa) and the decoder-prompt layouts shared with SNLI-VE.

Columns: question-id, image-id, question, answers, object labels, image; selected 0,5,2,3,4 (an optional 6th
selected field, a caption, is accepted and ignored as in OFA). `prompt_layout` implements prompt_type none / src /
prev_output: with prev_output the decoder input is bos + question (+objects) + answer and only the answer + eos
positions of the target are kept. Constraint rows (trie children) are given on the answer positions only.
Extras: `ref_dict` (answer -> confidence) for VQA accuracy, `decoder_prompt` for all-candidate scoring.
"""
from __future__ import annotations

from typing import Optional

from ..collate import Sample
from ..images import decode_base64_image
from ..text import build_trie, constraint_rows, load_candidates, pre_question
from ..tsv import BadRow
from .base import Task, check_objects, need_id, need_text, parse_answers


def prompt_layout(task: Task, sid: int, src: list[int], ans: list[int], prompt_type: str, trie, **kw) -> Sample:
    """src includes bos/eos; ans has no eos. Returns the sample with target padding and constraint rows."""
    bos, eos, pad = task.bos, task.eos, task.pad
    if prompt_type == "none":
        prev, target, dprompt = [bos] + ans, ans + [eos], [bos]
    elif prompt_type == "src":
        prev = src + ans
        target, dprompt = prev[1:] + [eos], list(src)
    elif prompt_type == "prev_output":
        prev = src[:-1] + ans
        target, dprompt = prev[1:] + [eos], src[:-1]
    else:
        raise ValueError(f"prompt_type must be none, src or prev_output, got {prompt_type!r}")
    n_keep = len(ans) + 1
    target = [pad] * (len(target) - n_keep) + target[-n_keep:]
    cons = constraint_rows(trie, bos, target, len(target) - n_keep) if trie is not None else None
    extras = kw.pop("extras", {})
    extras["decoder_prompt"] = dprompt
    return Sample(id=sid, source=src, target=target, prev=prev, constraint=cons, extras=extras, **kw)


class VQATask(Task):
    name = "vqa"
    default_cols = [0, 5, 2, 3, 4]
    layout = (("question-id", "id"), ("image-id", "id"), ("question", "field"), ("answers", "field"),
              ("object labels", "field"), ("image", "field"))

    def __init__(self, cfg, split="train", tokenizer=None):
        super().__init__(cfg, split, tokenizer)
        self.ans2label: Optional[dict[str, int]] = load_candidates(cfg.ans2label_file) if cfg.ans2label_file else None
        self.trie = build_trie(self.tok, self.ans2label) if self.ans2label else None

    def parse(self, row):
        if len(row) not in (5, 6):
            raise BadRow(f"expected 5 columns after selection, got {len(row)}")
        uniq_id, image, question, answers, objects = row[:5]
        need_id(uniq_id, "question-id")
        need_text(question, "question", pre_question)
        ref = {a: c for c, a in parse_answers(answers)}
        check_objects(objects)
        return uniq_id, decode_base64_image(image), question, ref, objects

    def make(self, parsed, sid, rng):
        uniq_id, img, question, ref, objects = parsed
        img = self.square_image(img)
        q = pre_question(question, self.cfg.max_src_length)
        q = q if q.endswith("?") else q + "?"
        answer = max(ref, key=ref.get)
        src = self.enc(" " + q)
        if self.cfg.add_object and objects.strip():
            tags = " ".join(objects.strip().split("&&")[: self.cfg.max_object_length])
            src = src + self.enc(" object: " + tags)
        ans = self.enc(" " + answer)
        return prompt_layout(self, sid, self.wrap(src), ans, self.cfg.prompt_type, self.trie, image=img,
                             patch_mask=True, conf=ref[answer],
                             extras={"uniq_id": uniq_id, "ref_dict": ref, "question": question})
