"""Base class of the per-task sample builders, and the column checks they share.

A task turns one TSV row into one `Sample` (or a list of them for pretraining) and collates lists of samples, in
three steps:
  `select(fields)`  all columns of a line -> the `selected_cols` fields. With the task's official selection the line
                    must have exactly the columns of OFA's format (`layout`) and the columns the task does not read
                    are checked too (ids, ImageNet's 1-based label, caption object labels);
  `parse(row)`      checks every selected field and decodes the image: deterministic, the same for every split and
                    every config, raising BadRow;
  `make(parsed, sid, rng)`  the transforms and tokens; it never rejects a parsed row.
`read(fields)` = parse(select(fields)) is the one rule for bad data: the loader builds `make(read(fields))` and skips
the row on BadRow, `validate` reports exactly the rows on which `read` raises (docs/data.md#bad-rows).
Builders are deterministic given the numpy Generator they receive.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Union

import numpy as np

from ..collate import Sample, collate
from ..config import DataConfig
from ..images import MEAN_05, resize_exact, to_tensor
from ..text import pre_caption, strip_punct_words
from ..tsv import BadRow

_LONG = 1 << 30  # word limit used when checking that a text survives normalisation


def get_tok():
    from ofa_ds.tokenizer import get_tokenizer
    return get_tokenizer()


class Task:
    name = "base"
    default_cols: Optional[list[int]] = None
    """Official selected_cols (None = all columns in file order)."""
    official_cols: tuple[tuple[int, ...], ...] = ()
    """Other selections that read a file in OFA's layout (caption: train 0,4,2 and eval 1,4,2)."""
    layout: tuple[tuple[str, str], ...] = ()
    """OFA's columns in file order: (name, kind); kind is a CELL_CHECKS key, or 'field' for a selected column that
    `parse` checks."""
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

    def square_image(self, img, size: Optional[int] = None, mean=MEAN_05, std=MEAN_05) -> np.ndarray:
        """A decoded image (images.decode_base64_image) -> the S x S tensor of OFA's plain resize."""
        s = size or self.cfg.patch_image_size
        img, _ = resize_exact(img, s, s)
        return to_tensor(img, mean, std)

    def fields(self, row: list[str]) -> list[str]:
        if self.num_fields and len(row) != self.num_fields:
            raise BadRow(f"expected {self.num_fields} columns after selection, got {len(row)}")
        return row

    # ---- interface -----------------------------------------------------------------------------------------------
    def is_official(self) -> bool:
        """Whether the selection reads OFA's layout (then `select` checks all columns of `layout`)."""
        c = self.cfg.cols()
        return bool(self.layout) and (c is None or c == self.default_cols or tuple(c) in self.official_cols)

    def select(self, fields: list[str]) -> list[str]:
        """All columns of a line -> the selected fields (BadRow on a wrong column count or a bad unread column)."""
        if len(fields) == 1 and not fields[0].strip():
            raise BadRow("empty line", "columns")
        cols = self.cols
        if self.is_official():
            if len(fields) != len(self.layout):
                names = ", ".join(n for n, _ in self.layout)
                raise BadRow(f"has {len(fields)} columns, the {self.name} format has {len(self.layout)} ({names})",
                             "columns")
            for c, ((name, kind), value) in enumerate(zip(self.layout, fields)):
                if kind != "field" and (cols is None or c not in cols):
                    CELL_CHECKS[kind](value, name)
        elif cols is not None and max(cols) >= len(fields):
            raise BadRow(f"has {len(fields)} columns, selected_cols needs column {max(cols)}", "columns")
        return fields if cols is None else [fields[c] for c in cols]

    def parse(self, row: list[str]) -> Any:
        """Selected fields -> whatever `make` needs, every field checked and the image decoded (BadRow)."""
        raise NotImplementedError

    def make(self, parsed: Any, sid: int, rng: np.random.Generator) -> Union[Sample, list[Sample]]:
        """The sample(s) of a parsed row: transforms, prompts, tokens. Never raises BadRow."""
        raise NotImplementedError

    def build(self, row: list[str], sid: int, rng: np.random.Generator) -> Union[Sample, list[Sample]]:
        """Selected fields -> sample(s) (BadRow when the row is bad)."""
        return self.make(self.parse(row), sid, rng)

    def read(self, fields: list[str]) -> Any:
        """The one rule for bad data: all columns of a line -> parsed row, or BadRow (what validate reports)."""
        return self.parse(self.select(fields))

    def check_row(self, row: list[str]) -> None:
        """Raise BadRow if the selected fields `row` are bad."""
        self.parse(row)

    def collate(self, samples: list[Sample]) -> Any:
        return collate(samples, self.image_size, self.tok.vocab_size, self.cfg.constraint_masks)


# ---- column checks (each raises BadRow with its category) --------------------------------------------------------
def need_id(value: str, what: str = "uniq-id") -> str:
    if not value.strip():
        raise BadRow(f"empty {what}", "id")
    return value


def need_text(value: str, what: str, norm=pre_caption) -> str:
    """A text column that must keep a word after OFA's normalisation (pre_caption / pre_question)."""
    if not norm(value, _LONG):
        raise BadRow(f"empty {what}" if not value.strip() else f"no text in {what} {value[:40]!r}", "text")
    return value


def need_caption(value: str, what: str = "caption") -> str:
    """Caption column: every '&&'-joined reference keeps a word once punctuation is removed."""
    if not value.strip():
        raise BadRow(f"empty {what}", "text")
    if any(not strip_punct_words(c) for c in value.split("&&")):
        raise BadRow(f"{what} {value[:40]!r} has a reference without words", "text")
    return value


def check_objects(value: str, what: str = "object labels") -> str:
    """'&&'-joined tags: may be empty, else no empty tag."""
    if value.strip() and any(not t.strip() for t in value.split("&&")):
        raise BadRow(f"{what} {value[:40]!r} have an empty item", "objects")
    return value


def parse_label1(value: str, what: str = "label") -> int:
    """ImageNet's 1-based integer label."""
    v = value.strip()
    if not re.fullmatch(r"[0-9]+", v) or int(v) < 1:
        raise BadRow(f"{what} {value[:20]!r} is not a 1-based integer", "label")
    return int(v)


def parse_codes(text: str) -> list[int]:
    """Space-separated VQGAN codes, each in 0..8191."""
    try:
        codes = [int(c) for c in text.split()]
    except ValueError:
        raise BadRow("image codes are not integers", "codes") from None
    if not codes or min(codes) < 0 or max(codes) >= 8192:
        raise BadRow("image codes missing or outside 0..8191", "codes")
    return codes


def _unread(value: str, what: str) -> str:
    return value


CELL_CHECKS = {"id": need_id, "objects": check_objects, "label1": parse_label1, "unread": _unread}
"""Checks of the columns a task does not select, by the kind named in its `layout`."""


def parse_box(text: str) -> np.ndarray:
    """'x0,y0,x1,y1' -> float array [1,4] (BadRow unless 4 finite numbers with 0 <= x0 <= x1, 0 <= y0 <= y1)."""
    try:
        v = [float(x) for x in text.strip().split(",")]
    except ValueError:
        raise BadRow(f"bad box {text[:40]!r}", "box") from None
    if len(v) != 4 or not all(np.isfinite(v)) or v[2] < v[0] or v[3] < v[1] or min(v) < 0:
        raise BadRow(f"bad box {text[:40]!r}", "box")
    return np.asarray([v], dtype=np.float64)


def box_inside(box: np.ndarray, img, text: str) -> None:
    """BadRow unless the box ends inside the image (1 pixel of tolerance)."""
    w, h = img.size
    if box[0, 2] > w + 1 or box[0, 3] > h + 1:
        raise BadRow(f"box {text.strip()[:40]} outside the {w}x{h} image", "box")


def parse_answers(text: str) -> list[tuple[float, str]]:
    """VQA answers 'conf|!+answer&&conf|!+answer' -> [(conf, answer)]; every item needs a confidence in [0, 1] and a
    non-empty answer (OFA's format; OFA itself fails on an item without '|!+')."""
    if not text.strip():
        raise BadRow("no answer", "answer")
    out = []
    for item in text.split("&&"):
        if not item.strip():
            raise BadRow(f"empty answer item in {text[:40]!r} (a stray '&&')", "answer")
        if "|!+" not in item:
            raise BadRow(f"answer {item[:30]!r} has no confidence (expected conf|!+answer)", "answer")
        c, a = item.split("|!+", 1)
        try:
            conf = float(c)
        except ValueError:
            raise BadRow(f"bad answer confidence {c[:20]!r}", "answer") from None
        if not (math.isfinite(conf) and 0.0 <= conf <= 1.0):
            raise BadRow(f"bad answer confidence {c[:20]!r} (not in [0, 1])", "answer")
        if not a.strip():
            raise BadRow(f"empty answer in {item[:30]!r}", "answer")
        out.append((conf, a))
    return out
