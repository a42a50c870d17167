"""Line-by-line reading of the plain-text sources (GLUE TSVs, Gigaword): streamed, split on '\\n' only.

Python's text mode would also break lines at '\\r', and `str.splitlines` at U+2028, '\\x85' and others, which
occur inside sentences of these corpora; here a line ends at '\\n' alone and a trailing '\\r' is dropped. A UTF-8
byte order mark on the first line is dropped. A line that is not UTF-8 comes back as None, for the caller to skip.
"""
from __future__ import annotations

from typing import Iterator, Optional


def read_lines(path: str) -> Iterator[tuple[int, Optional[str]]]:
    """(1-based line number, text without its line end, or None when not UTF-8) for each line of `path`."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError:
                yield i, None
                continue
            yield i, text.rstrip("\n").rstrip("\r")


def count_lines(path: str) -> int:
    """Number of lines `read_lines` yields (counted in 8 MiB chunks, for the progress bar's total)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")
