"""Text-to-image code generation (docs/ofa.md#text-to-image-data). Columns: uniq-id, image codes (space-separated ints),
caption; selected 0,2,1. Target = codes + 50265 then eos, prev = bos + codes, code_masks True. No encoder image: the
batch carries a zero image with patch_masks False (kept so every rank runs the same modules)."""
from __future__ import annotations

from ..text import pre_caption
from .base import Task, need_id, need_text, parse_codes


class ImageGenTask(Task):
    name = "image_gen"
    default_cols = [0, 2, 1]
    num_fields = 3
    layout = (("uniq-id", "field"), ("image codes", "field"), ("caption", "field"))

    def parse(self, row):
        uniq_id, caption, code = self.fields(row)  # file order id, codes, caption; selected 0,2,1
        need_id(uniq_id)
        codes = parse_codes(code)
        need_text(caption, "caption")
        return uniq_id, caption, codes

    def make(self, parsed, sid, rng):
        uniq_id, caption, codes = parsed
        cap = pre_caption(caption, self.cfg.max_src_length)
        ids = [self.tok.code_offset + c for c in codes]
        return self.std_sample(sid, self.enc(f" what is the complete image? caption: {cap}"), ids, code_mask=True,
                               extras={"uniq_id": uniq_id})
