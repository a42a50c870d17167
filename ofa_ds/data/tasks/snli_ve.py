"""SNLI-VE (docs/ofa.md#snli-ve). Columns: uniq-id, image-id, image, hypothesis, premise caption, label; selected
0,2,3,4,5. Labels contradiction/entailment/neutral -> no/yes/maybe; the trie always holds the three answers. add_caption
puts the premise into the prompt (released finetunes); prompt_type as in VQA."""
from __future__ import annotations

from ..images import decode_base64_image
from ..text import build_trie, pre_caption
from ..tsv import BadRow
from .base import Task, need_id, need_text
from .vqa import prompt_layout

LABELS = {"contradiction": "no", "entailment": "yes", "neutral": "maybe"}
ANS2LABEL = {"no": 0, "yes": 1, "maybe": 2}


class SnliVeTask(Task):
    name = "snli_ve"
    default_cols = [0, 2, 3, 4, 5]
    num_fields = 5
    layout = (("uniq-id", "id"), ("image-id", "id"), ("image", "field"), ("hypothesis", "field"),
              ("premise", "field"), ("label", "field"))

    def __init__(self, cfg, split="train", tokenizer=None):
        super().__init__(cfg, split, tokenizer)
        self.ans2label = dict(ANS2LABEL)
        self.trie = build_trie(self.tok, ANS2LABEL)

    def parse(self, row):
        uniq_id, image, hypothesis, caption, label = self.fields(row)
        need_id(uniq_id)
        if label.strip() not in LABELS:
            raise BadRow(f"unknown label {label[:30]!r}", "label")
        need_text(hypothesis, "hypothesis")
        need_text(caption, "premise")
        return uniq_id, decode_base64_image(image), hypothesis, caption, LABELS[label.strip()]

    def make(self, parsed, sid, rng):
        uniq_id, img, hypothesis, caption, answer = parsed
        hyp = pre_caption(hypothesis, self.cfg.max_src_length)
        if self.cfg.add_caption:
            cap = pre_caption(caption, self.cfg.max_src_length)
            text = f' can image and text1 " {cap} " imply text2 " {hyp} "?'
        else:
            text = f' does the image describe " {hyp} "?'
        return prompt_layout(self, sid, self.wrap(self.enc(text)), self.enc(" " + answer), self.cfg.prompt_type,
                             self.trie, image=self.square_image(img), patch_mask=True,
                             extras={"uniq_id": uniq_id, "ref_dict": {answer: 1.0}})
