"""What every importer shares: atomic TSV output, the skip accounting, the progress bar, image embedding and a safe
pickle reader.

An importer turns a public dataset, as its authors ship it, into OFA's TSVs (formats: docs/ofa.md#task-formats).
Rules they all follow:
  * Streaming where the source allows it (images are read one at a time; JSON annotation files are loaded once).
  * Deterministic: the same input gives byte-identical output (sorted ids where the source order is not fixed).
  * Never a half-written file that looks complete: rows go to `<name>.part`, renamed to `<name>` only after the
    last row; on any error the `.part` file is removed (`TSVWriter`). A file that would hold no row is not written
    (the loader refuses empty files); the summary still lists it with 0 rows.
  * A record that cannot become a valid row is skipped with a short reason (`Skip`); `ImportStats` counts rows
    written per file and skips per reason, and the summary names both.
  * Images are embedded as base64 of their original bytes when they decode (with the training loader's decoder, so
    no embedded image is a bad row later) and need no resizing; with `max_side` a larger image is shrunk (aspect
    kept, JPEG quality 95) and the caller scales its boxes by the returned factors.
"""
from __future__ import annotations

import base64
import math
import os
import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from PIL import Image

from ..images import decode_image, encode_base64_image
from ..tsv import BadRow


class Skip(Exception):
    """A source record that does not become a row. `reason` is a short, countable category; `detail` names the
    record (file and id) for the log line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class ImportStats:
    written: Counter = field(default_factory=Counter)      # output file -> rows
    skipped: Counter = field(default_factory=Counter)      # reason -> records
    log_limit: int = 20                                     # skip lines printed per reason
    _printed: Counter = field(default_factory=Counter)

    def skip(self, s: Skip, stream=None) -> None:
        self.skipped[s.reason] += 1
        if self._printed[s.reason] < self.log_limit:
            self._printed[s.reason] += 1
            from tqdm import tqdm
            tqdm.write(f"skipped ({s})", file=stream or sys.stderr)      # above a running progress bar

    def summary(self) -> str:
        files = ", ".join(f"{os.path.basename(k)} {v}" for k, v in sorted(self.written.items())) or "none"
        skips = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"rows written: {sum(self.written.values())} ({files}); skipped: {sum(self.skipped.values())} ({skips})"


class TSVWriter:
    """`with TSVWriter(path, stats) as w: w.write([...])`: rows go to path.part, renamed to path on success."""

    def __init__(self, path: str, stats: ImportStats):
        self.path, self.stats = path, stats
        self.tmp = path + ".part"

    def __enter__(self) -> "TSVWriter":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.f = open(self.tmp, "w", encoding="utf-8", newline="\n")
        self.stats.written[self.path] += 0
        return self

    def write(self, fields: list[Any]) -> None:
        cells = [clean(x) for x in fields]
        self.f.write("\t".join(cells) + "\n")
        self.stats.written[self.path] += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self.f.close()
        if exc_type is None and self.stats.written[self.path] > 0:
            os.replace(self.tmp, self.path)
            return
        try:                         # an error, or nothing to write (no empty file; the summary shows the 0)
            os.remove(self.tmp)
        except OSError:
            pass


def clean(x: Any) -> str:
    """One TSV cell: tabs and newlines inside text become spaces, runs of whitespace one space."""
    return " ".join(str(x).replace("\t", " ").split())


def progress(items: Iterable, total: Optional[int], desc: str) -> Iterator:
    """A progress bar with ETA on stderr (tqdm) around `items`."""
    from tqdm import tqdm
    return iter(tqdm(items, total=total, desc=desc, unit="rec", file=sys.stderr, mininterval=1.0, dynamic_ncols=True))


@dataclass
class EmbeddedImage:
    b64: str
    sx: float                # x scale applied (1.0 when kept as is)
    sy: float
    width: int               # size of the stored image
    height: int


def embed_image(path: str, max_side: Optional[int] = None) -> EmbeddedImage:
    """The image file at `path` as base64 for a TSV cell; Skip('image missing' / 'image unreadable') otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise Skip("image missing", path) from None
    except OSError as e:
        raise Skip("image unreadable", f"{path} ({e.strerror})") from None
    try:
        img = decode_image(raw)          # the loader's own decoder: whatever it refuses is never embedded
    except BadRow as e:
        raise Skip("image unreadable", f"{path} ({e})") from None
    w, h = img.size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        small = img.resize((nw, nh), Image.BICUBIC)
        return EmbeddedImage(encode_base64_image(small, quality=95), nw / w, nh / h, nw, nh)
    return EmbeddedImage(base64.b64encode(raw).decode("ascii"), 1.0, 1.0, w, h)


def coco_box(ann: dict, where: str) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> (x0, y0, x1, y1); Skip('degenerate box') when not 4 finite numbers with w, h > 0."""
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        raise Skip("degenerate box", f"{where}: bbox {str(ann.get('bbox'))[:40]}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise Skip("degenerate box", f"{where}: bbox {[x, y, w, h]}")
    return x, y, x + w, y + h


def clip_box(box, size: Optional[tuple[float, float]], where: str) -> tuple[float, float, float, float]:
    """Clip an overhang of at most one pixel; Skip('box outside image') beyond that."""
    x0, y0, x1, y1 = box
    if size is not None:
        w, h = size
        if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
            raise Skip("box outside image", f"{where}: box {[round(v, 2) for v in box]} on a {w:g}x{h:g} image")
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, w), min(y1, h)
    elif x0 < -1 or y0 < -1:
        raise Skip("box outside image", f"{where}: box {[round(v, 2) for v in box]}")
    else:
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
    if x1 <= x0 or y1 <= y0:
        raise Skip("degenerate box", f"{where}: box {[round(v, 2) for v in box]}")
    return x0, y0, x1, y1


def box_cell(box: Iterable[float], img: EmbeddedImage) -> str:
    """'x0,y0,x1,y1' in the stored image's pixels (scaled with it), two decimals."""
    x0, y0, x1, y1 = box
    return ",".join(f"{v:.2f}" for v in (x0 * img.sx, y0 * img.sy, x1 * img.sx, y1 * img.sy))


class _PlainUnpickler(pickle.Unpickler):
    """Accepts only what a plain data pickle needs: dict, list, tuple, set, str, bytes, numbers, bool, None."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the file holds more than plain data")


def load_plain_pickle(path: str) -> Any:
    """Read a pickle of plain containers and scalars (e.g. RefCOCO's refs(unc).p) without running arbitrary code.
    Python 2 pickles (latin-1 strings) are read too."""
    with open(path, "rb") as f:
        return _PlainUnpickler(f, encoding="latin1").load()
