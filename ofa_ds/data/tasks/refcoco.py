"""RefCOCO / RefCOCO+ / RefCOCOg visual grounding (docs/ofa.md#refcoco). Columns: uniq-id, image-id, text, region
"x0,y0,x1,y1" (original pixels), image; selected 0,4,2,3. The image is squashed to patch_image_size x patch_image_size
(RandomResize([S], max_size=S) with OFA's per-side clamp), the box scaled per axis and quantised against
max_image_size (docs/ofa.md#box-coordinates). Extras for evaluation: w_resize_ratios, h_resize_ratios,
region_coords (original pixels)."""
from __future__ import annotations

import numpy as np

from ..images import decode_base64_image, random_resize, to_tensor
from ..text import pre_caption
from ..tsv import BadRow
from .base import Task, parse_box


def box_bins(box, max_image_size: int, num_bins: int) -> list[int]:
    """Bin indices of a resized-image box (x0, y0, x1, y1)."""
    return [int(round(float(v) / max_image_size * (num_bins - 1))) for v in box]


class RefcocoTask(Task):
    name = "refcoco"
    default_cols = [0, 4, 2, 3]
    num_fields = 4

    def bin_ids(self, box) -> list[int]:
        bins = box_bins(box, self.cfg.max_image_size, self.cfg.num_bins)
        if min(bins) < 0 or max(bins) >= self.cfg.num_bins:
            raise BadRow(f"box {list(np.round(box, 1))} falls outside the {self.cfg.num_bins} bins")
        return [self.tok.bin_offset + b for b in bins]

    def build(self, row, sid, rng):
        uniq_id, image, text, region = self.fields(row)
        box = parse_box(region)
        img = decode_base64_image(image)
        w, h = img.size
        if box[0, 2] > w + 1 or box[0, 3] > h + 1:
            raise BadRow(f"box {region.strip()} outside the {w}x{h} image")
        s = self.cfg.patch_image_size
        img, boxes = random_resize(img, box, [s], s, rng)
        rw, rh = img.size
        expr = pre_caption(text, self.cfg.max_src_length)
        src = self.enc(f' which region does the text " {expr} " describe?')
        return self.std_sample(sid, src, self.bin_ids(boxes[0]), image=to_tensor(img), patch_mask=True,
                               extras={"uniq_id": uniq_id, "w_resize_ratios": rw / w, "h_resize_ratios": rh / h,
                                       "region_coords": box[0].astype(np.float32)})
