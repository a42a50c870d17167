"""TSV files with a cached byte-offset index, and the deterministic sharded order the loaders walk.

Unusual points:
* The index (int64 line-start offsets) is built once with numpy over 8 MiB chunks and cached as `<file>.idx`
  (or under `index_cache_dir`), stamped with the file's size and mtime_ns; a stale or foreign cache is rebuilt.
* File handles are opened lazily per process (DataLoader workers fork/spawn after construction).
* The order of an epoch is a pure function of (n_rows, seed, epoch): a permutation when shuffling. Rank r of W
  takes order positions r, r+W, r+2W, ... (optionally wrapped round so all ranks get ceil(n/W) rows); its rows are
  cut into batches and batch b goes to DataLoader worker b mod n_workers, which is the order in which PyTorch's
  DataLoader hands worker outputs back. The resumable state is therefore just (epoch, batches consumed).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("ofa_ds.data")

_CHUNK = 8 << 20
_IDX_MAGIC = 0x0FA1D8


class BadRow(ValueError):
    """A malformed row (wrong column count, undecodable image, bad box...). Carries a human-readable reason."""


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

    def line(self, i: int) -> str:
        """Row i as text without the line terminator."""
        if self._pid != os.getpid() or self._fh is None:
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        self._fh.seek(a)
        raw = self._fh.read(b - a)
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def row(self, i: int) -> list[str]:
        """Row i split on tabs, with `selected_cols` applied (BadRow if a selected column is missing)."""
        fields = self.line(i).split("\t")
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


class BadRowCounter:
    """Counts malformed rows, logs each file:line once, and raises past the threshold fraction."""

    def __init__(self, threshold: float, min_rows: int = 100):
        self.threshold = threshold
        self.min_rows = min_rows
        self.rows = 0
        self.bad = 0
        self.seen: set[str] = set()
        self.examples: list[str] = []

    def ok(self, n: int = 1) -> None:
        self.rows += n

    def report(self, where: str, reason: str) -> None:
        self.rows += 1
        self.bad += 1
        msg = f"{where}: {reason}"
        if where not in self.seen:
            self.seen.add(where)
            log.warning("skipping bad row %s", msg)
            if len(self.examples) < 20:
                self.examples.append(msg)
        self.check()

    def check(self) -> None:
        if self.rows >= self.min_rows and self.bad > self.threshold * self.rows:
            raise RuntimeError(
                f"too many bad rows: {self.bad} of {self.rows} ({self.bad / self.rows:.2%}) exceed the threshold "
                f"{self.threshold:.2%}; first ones:\n  " + "\n  ".join(self.examples))
