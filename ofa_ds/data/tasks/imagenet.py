"""ImageNet-1K classification as generation (docs/ofa.md#imagenet). Columns: image (often URL-safe base64), 1-based
label, synset words; selected 0,2. Candidates (class name -> label) come from `ans2label_file` (OFA's
class2label_new.pkl or a JSON dict); with them every target position gets trie rows (prev = bos + class tokens).

Train transform: RandomResizedCrop(S, bicubic) + horizontal flip -> RandAugment -> BLIP RandomAugment(2, 7) ->
normalise -> RandomErasing(0.25). Deviation: timm's 'rand-m9-mstd0.5-inc1' RandAugment is approximated by a
second pass of our RandomAugment at magnitude 9 (same op family, no magnitude noise). Eval: bicubic S x S resize.
"""
from __future__ import annotations

from ..images import (IMAGENET_MEAN, IMAGENET_STD, MEAN_05, decode_base64_image, hflip, random_augment,
                      random_erasing, random_resized_crop, resize_exact, to_tensor)
from ..text import build_trie, constraint_rows, load_candidates
from ..tsv import BadRow
from .base import Task

PROMPT = " what does the image describe?"


class ImageNetTask(Task):
    name = "imagenet"
    default_cols = [0, 2]
    num_fields = 2
    layout = (("image", "field"), ("label", "label1"), ("synset words", "field"))

    def __init__(self, cfg, split="train", tokenizer=None):
        super().__init__(cfg, split, tokenizer)
        self.ans2label = load_candidates(cfg.ans2label_file) if cfg.ans2label_file else None
        self.trie = build_trie(self.tok, self.ans2label) if self.ans2label else None
        imnet = cfg.imagenet_default_mean_and_std
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if imnet else (MEAN_05, MEAN_05)

    def parse(self, row):
        image, name = self.fields(row)
        name = name.strip()
        if not name:
            raise BadRow("empty class name", "text")
        return decode_base64_image(image), name

    def make(self, parsed, sid, rng):
        img, name = parsed
        s = self.cfg.patch_image_size
        if self.train and self.cfg.augment:
            img = random_resized_crop(img, s, rng)
            if rng.random() < 0.5:
                img, _ = hflip(img)
            img = random_augment(img, rng, 2, 9)
            img = random_augment(img, rng, 2, 7)
            x = random_erasing(to_tensor(img, self.mean, self.std), rng, 0.25)
        else:
            img, _ = resize_exact(img, s, s)
            x = to_tensor(img, self.mean, self.std)
        ans = self.enc(" " + name)
        smp = self.std_sample(sid, self.enc(PROMPT), ans, image=x, patch_mask=True, extras={"ref_dict": {name: 1.0}})
        if self.trie is not None:
            smp.constraint = constraint_rows(self.trie, self.bos, smp.target, 0)
        return smp
