"""Gigaword summarisation (docs/ofa.md#gigaword-and-glue). Columns: article, summary (0,1). No image. The target has no
leading space; with noise_ratio > 0 (OFA: 0.2) each prev_output token after bos is replaced with that probability by a
uniform random text id in [4, 50265). `target_str` (lower-cased raw summary) is kept for ROUGE."""
from __future__ import annotations

from ..collate import Sample
from ..text import pre_caption
from .base import Task, need_text


class GigawordTask(Task):
    name = "gigaword"
    default_cols = [0, 1]
    num_fields = 2
    has_images = False
    layout = (("article", "field"), ("summary", "field"))

    def parse(self, row):
        source, target = self.fields(row)
        need_text(source, "article")
        need_text(target, "summary")
        return source, target

    def make(self, parsed, sid, rng):
        source, target = parsed
        target_str = target.lower()
        src = pre_caption(source, self.cfg.max_src_length).replace("<unk>", "unk")
        tgt = pre_caption(target, self.cfg.max_tgt_length).replace("<unk>", "unk")
        src_ids = self.enc(f' what is the summary of article " {src} "?', max_len=self.cfg.max_src_length)
        tgt_ids = self.enc(tgt)
        noisy = list(tgt_ids)
        if self.cfg.noise_ratio > 0 and self.train:
            hit = rng.random(len(noisy)) < self.cfg.noise_ratio
            text_vocab = self.tok.mask  # 50264: ids below <mask> are the text vocabulary
            rnd = rng.integers(4, text_vocab + 1, size=len(noisy))
            noisy = [int(r) if h else t for t, h, r in zip(noisy, hit, rnd)]
        return Sample(id=sid, source=self.wrap(src_ids), target=tgt_ids + [self.eos], prev=[self.bos] + noisy,
                      extras={"target_str": target_str})
