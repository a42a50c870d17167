"""TSV files with a cached byte-offset index, and the deterministic sharded order the loaders walk.

Unusual points:
* The index (int64 line-start offsets) is built once with numpy over 8 MiB chunks and cached as `<file>.idx`
  (or under `index_cache_dir`), stamped with the file's size and mtime_ns; a stale or foreign cache is rebuilt.
* File handles are opened lazily per process (DataLoader workers fork/spawn after construction).
* The order of an epoch is a pure function of (n_rows, seed, epoch): a permutation when shuffling. Rank r of W
  takes order positions r, r+W, r+2W, ... (optionally wrapped round so all ranks get ceil(n/W) rows); its rows are
  cut into batches and batch b goes to DataLoader worker b mod n_workers, which is the order in which PyTorch's
  DataLoader hands worker outputs back. The resumable state is therefore just (epoch, batches consumed).
* Lines are split on b"\n" only (a final line without one counts; an empty line is a row, and a bad one). One
  trailing "\r" (CRLF files) and a UTF-8 byte-order mark at the start of the file are dropped; any other byte that
  is not UTF-8 makes the row bad. `split_line` is the one place that turns bytes into fields, for the loader and for
  `validate` alike (docs/data.md#bad-rows).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("ofa_ds.data")

_CHUNK = 8 << 20
_IDX_MAGIC = 0x0FA1D8


CATEGORIES = {
    "encoding": "the line is not UTF-8",
    "columns": "wrong number of tab-separated columns (an empty line, an extra or a missing tab)",
    "id": "an empty id column",
    "text": "an empty or unusable text column (caption, question, expression, sentence, dataset name, type)",
    "objects": "an '&&'-joined object list with an empty item",
    "answer": "a VQA answer that is not conf|!+answer with a confidence in [0, 1]",
    "label": "a label outside the task's set, or not a 1-based integer (ImageNet)",
    "box": "a box that is not x0,y0,x1,y1 inside the image, or a detection item that is not box,cat_id,name",
    "codes": "image codes that are not integers in 0..8191",
    "image": "an image that does not decode (base64, format, truncated, zero size, over the pixel limit)",
}
"""Short category of every BadRow (what `BadRowCounter.reasons` counts) -> what it means."""


class BadRow(ValueError):
    """A malformed row. str(e) is the full human-readable reason; `category` is one of CATEGORIES."""

    def __init__(self, reason: str, category: str = "columns"):
        super().__init__(reason)
        self.category = category

    def __reduce__(self):
        return BadRow, (str(self), self.category)


_BOM = b"\xef\xbb\xbf"


def split_line(raw: bytes, first: bool = False) -> list[str]:
    """One line's bytes (with or without its terminator) -> its tab-separated fields; `first` marks the file's first
    line (a UTF-8 byte-order mark is dropped there). BadRow('encoding') when the bytes are not UTF-8."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if first and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start} of the line)", "encoding") from None
    return text.split("\t")


def _cache_path(path: str, cache_dir: str) -> str:
    if cache_dir:
        h = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
        return os.path.join(cache_dir, f"{os.path.basename(path)}.{h}.idx")
    return path + ".idx"


def build_offsets(path: str) -> np.ndarray:
    """Line-start offsets plus the end offset (len = rows + 1). A final line without newline counts; a trailing
    newline does not add an empty row."""
    starts = [np.zeros(1, dtype=np.int64)]
    pos = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            nl = np.frombuffer(buf, dtype=np.uint8) == 10
            starts.append(np.flatnonzero(nl).astype(np.int64) + pos + 1)
            pos += len(buf)
    offs = np.concatenate(starts)
    if offs[-1] != pos:  # last line has no newline
        offs = np.append(offs, pos)
    return offs


class TSVFile:
    """Random access to the rows of one TSV file."""

    def __init__(self, path: str, cache_dir: str = "", selected_cols: Optional[Sequence[int]] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        self.path = path
        self.selected_cols = list(selected_cols) if selected_cols is not None else None
        st = os.stat(path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self.offsets = self._load_or_build(cache_dir)
        if len(self) == 0:
            raise ValueError(f"data file is empty: {path}")
        self._fh = None
        self._pid = -1

    def _load_or_build(self, cache_dir: str) -> np.ndarray:
        cp = _cache_path(self.path, cache_dir)
        try:
            head = np.fromfile(cp, dtype=np.int64, count=3)
            if len(head) == 3 and tuple(head) == (_IDX_MAGIC, *self._stamp):
                return np.fromfile(cp, dtype=np.int64)[3:]
        except OSError:
            pass
        offs = build_offsets(self.path)
        for target in (cp, _cache_path(self.path, os.path.expanduser("~/.cache/ofa_ds"))):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
                tmp = f"{target}.{os.getpid()}.tmp"
                np.concatenate([np.array([_IDX_MAGIC, *self._stamp], dtype=np.int64), offs]).tofile(tmp)
                os.replace(tmp, target)
                break
            except OSError:
                continue
        return offs

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> bytes:
        """Row i's bytes, line terminator included."""
        if self._pid != os.getpid() or self._fh is None:
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        self._fh.seek(a)
        return self._fh.read(b - a)

    def fields(self, i: int) -> list[str]:
        """All columns of row i (`split_line`: BadRow when it is not UTF-8)."""
        return split_line(self.raw(i), first=i == 0)

    def line(self, i: int) -> str:
        """Row i as text without the line terminator."""
        return "\t".join(self.fields(i))

    def row(self, i: int) -> list[str]:
        """Row i split on tabs, with `selected_cols` applied (BadRow if a selected column is missing). The loader
        selects through its task instead (`Task.select`), which also checks the columns it does not read."""
        fields = self.fields(i)
        if self.selected_cols is None:
            return fields
        try:
            return [fields[c] for c in self.selected_cols]
        except IndexError:
            raise BadRow(f"has {len(fields)} columns, selected_cols needs column {max(self.selected_cols)}") from None

    def where(self, i: int) -> str:
        return f"{self.path}:{i + 1}"

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"], d["_pid"] = None, -1
        return d


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Row indices of one epoch, a deterministic function of (n, seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).astype(np.int64)


def rank_positions(n: int, rank: int, world: int, equalize: bool) -> np.ndarray:
    """Positions (into the epoch order) read by `rank`: strided, optionally wrapped round to ceil(n / world)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    if equalize:
        per = -(-n // world)
        return (np.arange(per, dtype=np.int64) * world + rank) % n
    return np.arange(rank, n, world, dtype=np.int64)


def num_batches(n_rows: int, batch_size: int, drop_last: bool) -> int:
    return n_rows // batch_size if drop_last else -(-n_rows // batch_size)


def worker_batches(n_batches: int, start: int, worker: int, n_workers: int) -> range:
    """Batch indices produced by one DataLoader worker when iteration restarts at batch `start`."""
    return range(start + worker, n_batches, n_workers)


class TooManyBadRows(RuntimeError):
    """More than `bad_row_threshold` of the rows read were bad. `where` is the last bad row's file:line, `share`
    the bad fraction, `reasons` the bad rows per category."""

    def __init__(self, message: str, where: str, share: float, reasons: Counter):
        super().__init__(message)
        self.where, self.share, self.reasons = where, share, Counter(reasons)

    def __reduce__(self):
        return TooManyBadRows, (str(self), self.where, self.share, self.reasons)


class BadRowCounter:
    """Counts rows read and bad rows (`bad`, and per category in `reasons`), logs each file:line once, and raises
    TooManyBadRows past the threshold fraction (checked once `min_rows` rows were read)."""

    def __init__(self, threshold: float, min_rows: int = 100):
        self.threshold = threshold
        self.min_rows = min_rows
        self.rows = 0
        self.bad = 0
        self.reasons: Counter = Counter()
        self.seen: set[str] = set()
        self.examples: list[str] = []
        self.last = ""
        self.last_where = ""

    def ok(self, n: int = 1) -> None:
        self.rows += n

    def report(self, where: str, reason: str, category: str = "columns") -> None:
        self.rows += 1
        self.bad += 1
        self.reasons[category] += 1
        msg = f"{where}: {reason}"
        self.last, self.last_where = msg, where
        if where not in self.seen:
            self.seen.add(where)
            log.warning("skipping bad row %s", msg)
            if len(self.examples) < 20:
                self.examples.append(msg)
        self.check()

    def by_reason(self) -> str:
        """'image 3, columns 1' (most frequent first)."""
        return ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))

    def check(self) -> None:
        if self.rows >= self.min_rows and self.bad > self.threshold * self.rows:
            share = self.bad / self.rows
            raise TooManyBadRows(
                f"too many bad rows: {self.bad} of {self.rows} rows read ({share:.2%}) were bad, over "
                f"bad_row_threshold {self.threshold:.2%}; by reason: {self.by_reason()}; last one {self.last}",
                self.last_where, share, self.reasons)
