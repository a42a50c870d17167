"""Keep freed tensor memory inside the process on CPU (glibc malloc settings), so a training step does not page-fault
its way through fresh memory every time.

A training step allocates and frees the same large buffers every step: activations, gradient temporaries and, above
all, the dense gradient of the 59,457-row token table (61 MB for OFA-Tiny, 3x per step). glibc serves every block
above its mmap threshold (at most 32 MB) with a fresh mmap and returns it on free, and trims the heap top beyond its
trim threshold, so the next step touches brand-new pages again: the kernel zero-fills and maps each 4 KiB page on
first write, which shows up as slow `fill_`/`copy_`/`add` in a profile (worst on a busy machine). `tune()` turns
mmap off for malloc (large blocks come from the heap too) and never trims, with glibc's own `mallopt`; memory freed
by one step is reused by the next. The process keeps its peak heap (it would reach the same peak every step anyway).

Only glibc on Linux is touched; elsewhere (macOS, musl) `tune()` does nothing and says so by returning False.
`OFA_DS_MALLOC_TUNE=0` leaves the allocator as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_done = False


def tune() -> bool:
    """Apply the settings once per process (idempotent). True when they are in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("OFA_DS_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                         # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
          and mallopt(M_TOP_PAD, 64 << 20) == 1)
    _done = ok
    return ok
