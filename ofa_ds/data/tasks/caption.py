"""Image captioning (docs/ofa.md#captioning). Columns: uniq-id, image-id, caption, object labels, image; train selects
0,4,2 and eval 1,4,2. Train targets are punctuation-stripped and cut to max_tgt_length words (the caption recipe uses
20); eval targets are the '&&'-joined stripped references, also returned as `captions` (list of lists) for CIDEr."""
from __future__ import annotations

from ..text import strip_punct_words
from .base import Task

PROMPT = " what does the image describe?"


class CaptionTask(Task):
    name = "caption"
    num_fields = 3

    @property
    def default_cols(self):
        return [0, 4, 2] if self.train else [1, 4, 2]

    def build(self, row, sid, rng):
        uniq_id, image, caption = self.fields(row)
        img = self.square_image(image)
        if self.train:
            tgt = strip_punct_words(caption, self.cfg.max_tgt_length)
            refs = [tgt]
        else:
            caption = " ".join(caption.strip().split())
            refs = [strip_punct_words(c) for c in caption.split("&&")]
            tgt = "&&".join(refs)
        if not tgt.strip("& "):
            from ..tsv import BadRow
            raise BadRow("empty caption")
        return self.std_sample(sid, self.enc(PROMPT), self.enc(" " + tgt), image=img, patch_mask=True,
                               extras={"uniq_id": uniq_id, "captions": refs})
