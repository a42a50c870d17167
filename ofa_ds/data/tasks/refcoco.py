"""RefCOCO / RefCOCO+ / RefCOCOg visual grounding (docs/ofa.md#refcoco). Columns: uniq-id, image-id, text, region
"x0,y0,x1,y1" (original pixels), image; selected 0,4,2,3. The image is squashed to patch_image_size x patch_image_size
(RandomResize([S], max_size=S) with OFA's per-side clamp), the box scaled per axis and quantised against
max_image_size (docs/ofa.md#box-coordinates). Extras for evaluation: w_resize_ratios, h_resize_ratios,
region_coords (original pixels).

A box must end inside the image (1 pixel of tolerance); its bins are clamped to 0..num_bins-1 like
tokenizer.bin_index, so whether a row is good never depends on patch_image_size or max_image_size."""
from __future__ import annotations

import numpy as np

from ..images import decode_base64_image, random_resize, to_tensor
from ..text import pre_caption
from .base import Task, box_inside, need_id, need_text, parse_box


def box_bins(box, max_image_size: int, num_bins: int) -> list[int]:
    """Bin indices of a resized-image box (x0, y0, x1, y1), clamped to the bin range."""
    return [min(max(int(round(float(v) / max_image_size * (num_bins - 1))), 0), num_bins - 1) for v in box]


class RefcocoTask(Task):
    name = "refcoco"
    default_cols = [0, 4, 2, 3]
    num_fields = 4
    layout = (("uniq-id", "id"), ("image-id", "id"), ("text", "field"), ("region", "field"), ("image", "field"))

    def bin_ids(self, box) -> list[int]:
        return [self.tok.bin_offset + b for b in box_bins(box, self.cfg.max_image_size, self.cfg.num_bins)]

    def parse(self, row):
        uniq_id, image, text, region = self.fields(row)
        need_id(uniq_id)
        need_text(text, "text")
        box = parse_box(region)
        img = decode_base64_image(image)
        box_inside(box, img, region)
        return uniq_id, img, text, box

    def make(self, parsed, sid, rng):
        uniq_id, img, text, box = parsed
        w, h = img.size
        s = self.cfg.patch_image_size
        img, boxes = random_resize(img, box, [s], s, rng)
        rw, rh = img.size
        expr = pre_caption(text, self.cfg.max_src_length)
        src = self.enc(f' which region does the text " {expr} " describe?')
        return self.std_sample(sid, src, self.bin_ids(boxes[0]), image=to_tensor(img), patch_mask=True,
                               extras={"uniq_id": uniq_id, "w_resize_ratios": rw / w, "h_resize_ratios": rh / h,
                                       "region_coords": box[0].astype(np.float32)})
