"""Image captioning (docs/ofa.md#captioning). Columns: uniq-id, image-id, caption, object labels, image; train selects
0,4,2 and eval 1,4,2. Train targets are punctuation-stripped and cut to max_tgt_length words (the caption recipe uses
20); eval targets are the '&&'-joined stripped references, also returned as `captions` (list of lists) for CIDEr."""
from __future__ import annotations

from ..images import decode_base64_image
from ..text import strip_punct_words
from .base import Task, need_caption, need_id

PROMPT = " what does the image describe?"


class CaptionTask(Task):
    name = "caption"
    num_fields = 3
    layout = (("uniq-id", "id"), ("image-id", "id"), ("caption", "field"), ("object labels", "objects"),
              ("image", "field"))
    official_cols = ((0, 4, 2), (1, 4, 2))

    @property
    def default_cols(self):
        return [0, 4, 2] if self.train else [1, 4, 2]

    def parse(self, row):
        uniq_id, image, caption = self.fields(row)
        need_id(uniq_id, "uniq-id" if self.train else "image-id")
        need_caption(caption)
        return uniq_id, decode_base64_image(image), caption

    def make(self, parsed, sid, rng):
        uniq_id, img, caption = parsed
        if self.train:
            tgt = strip_punct_words(caption, self.cfg.max_tgt_length)
            refs = [tgt]
        else:
            caption = " ".join(caption.strip().split())
            refs = [strip_punct_words(c) for c in caption.split("&&")]
            tgt = "&&".join(refs)
        return self.std_sample(sid, self.enc(PROMPT), self.enc(" " + tgt), image=self.square_image(img),
                               patch_mask=True, extras={"uniq_id": uniq_id, "captions": refs})
