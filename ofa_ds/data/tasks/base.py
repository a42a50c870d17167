"""Base class of the per-task sample builders.

A task turns one TSV row (already split and `selected_cols`-reordered) into one `Sample` (or a list of them for
pretraining) and collates lists of samples. Builders are deterministic given the numpy Generator they receive;
`check_row` is what `validate` and the converter use: the same parsing, no augmentation, raising BadRow.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from ..collate import Sample, collate
from ..config import DataConfig
from ..images import MEAN_05, decode_base64_image, resize_exact, to_tensor
from ..tsv import BadRow


def get_tok():
    from ofa_ds.tokenizer import get_tokenizer
    return get_tokenizer()


class Task:
    name = "base"
    default_cols: Optional[list[int]] = None
    """Official selected_cols (None = all columns in file order)."""
    num_fields = 0
    """Number of fields after column selection."""
    has_images = True
    """Batches carry patch_images (zeros where a sample has none)."""

    def __init__(self, cfg: DataConfig, split: str = "train", tokenizer=None):
        self.cfg = cfg
        self.split = split
        self.train = split == "train"
        self.tok = tokenizer if tokenizer is not None else get_tok()
        self.bos, self.eos, self.pad = self.tok.bos, self.tok.eos, self.tok.pad

    def __getstate__(self):
        """Workers started by spawn/forkserver re-fetch the cached tokenizer instead of unpickling a copy."""
        d = dict(self.__dict__)
        d["tok"] = getattr(self.tok, "lang", "en")
        return d

    def __setstate__(self, d):
        from ofa_ds.tokenizer import get_tokenizer
        self.__dict__.update(d)
        self.tok = get_tokenizer(d["tok"])

    # ---- helpers -------------------------------------------------------------------------------------------------
    @property
    def cols(self) -> Optional[list[int]]:
        c = self.cfg.cols()
        return c if c is not None else self.default_cols

    @property
    def image_size(self) -> Optional[int]:
        return self.cfg.patch_image_size if self.has_images else None

    def enc(self, text: str, max_len: Optional[int] = None) -> list[int]:
        return self.tok.encode(text, max_len=max_len)

    def wrap(self, ids: list[int]) -> list[int]:
        return [self.bos] + ids + [self.eos]

    def std_sample(self, sid: int, prompt_ids: list[int], ans_ids: list[int], **kw: Any) -> Sample:
        """OFA's standard layout (docs/ofa.md#sample-layout): src = bos+prompt+eos, target = ans+eos, prev = bos+ans."""
        return Sample(id=sid, source=self.wrap(prompt_ids), target=ans_ids + [self.eos], prev=[self.bos] + ans_ids,
                      **kw)

    def square_image(self, b64: str, size: Optional[int] = None, mean=MEAN_05, std=MEAN_05) -> np.ndarray:
        s = size or self.cfg.patch_image_size
        img, _ = resize_exact(decode_base64_image(b64), s, s)
        return to_tensor(img, mean, std)

    def fields(self, row: list[str]) -> list[str]:
        if self.num_fields and len(row) != self.num_fields:
            raise BadRow(f"expected {self.num_fields} columns after selection, got {len(row)}")
        return row

    # ---- interface -----------------------------------------------------------------------------------------------
    def build(self, row: list[str], sid: int, rng: np.random.Generator) -> Union[Sample, list[Sample]]:
        raise NotImplementedError

    def check_row(self, row: list[str]) -> None:
        """Raise BadRow if `row` cannot be built (used by validate)."""
        self.build(row, 0, np.random.default_rng(0))

    def collate(self, samples: list[Sample]) -> Any:
        return collate(samples, self.image_size, self.tok.vocab_size, self.cfg.constraint_masks)


def parse_box(text: str) -> np.ndarray:
    """'x0,y0,x1,y1' -> float array [1,4] (BadRow unless 4 finite numbers with x0<=x1, y0<=y1)."""
    try:
        v = [float(x) for x in text.strip().split(",")]
    except ValueError:
        raise BadRow(f"bad box {text[:40]!r}") from None
    if len(v) != 4 or not all(np.isfinite(v)) or v[2] < v[0] or v[3] < v[1] or min(v) < 0:
        raise BadRow(f"bad box {text[:40]!r}")
    return np.asarray([v], dtype=np.float64)


def parse_answers(text: str) -> list[tuple[float, str]]:
    """VQA answers 'conf|!+answer&&conf|!+answer' -> [(conf, answer)]; a bare answer gets conf 1.0."""
    out = []
    for item in text.split("&&"):
        if "|!+" in item:
            c, a = item.split("|!+", 1)
            try:
                conf = float(c)
            except ValueError:
                raise BadRow(f"bad answer confidence {c[:20]!r}") from None
        else:
            conf, a = 1.0, item
        if a.strip():
            out.append((conf, a))
    if not out:
        raise BadRow("no answer")
    return out
