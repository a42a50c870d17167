"""Faults a user can cause or meet in a run, reported as one line that names the cause and the path.

`RunFault` carries such a line and the exit status (2: bad input given on the command line or in a config, 1: a
fault met while running). `describe(exc)` turns the exceptions that the other faults raise deep inside libraries
(a missing or unreadable file, a full disk, a port in use, too many bad data rows, a checkpoint that does not load)
into the same; an exception it does not know is a bug and keeps its traceback. docs/training.md lists the lines.

What is unusual:
  * torch.save reports a full disk without an errno ("basic_ios::clear: iostream error", "[enforce fail at
    inline_container.cc] unexpected pos ..."), so `write_failure` asks the file system: a write of 1 MiB next to the
    file that fails with ENOSPC/EDQUOT, or less than 16 MiB left, means the disk is full.
  * An exception raised inside a DataLoader worker comes back as "Caught X in DataLoader worker ..." with the
    worker's traceback in the message (as a RuntimeError when X takes more than one argument); `describe` reads the
    original message from its last line.
  * A fault that every rank meets the same way (a missing file, a bad config) is printed by local rank 0 only
    (`every_rank`), so a launch on 8 GPUs prints one line, not eight. A rank that loses its connection to a rank
    that stopped first exits without a line of its own (`silent`): the rank that stopped printed the cause (or the
    launcher its exit code), and the launcher ends the others.
"""
from __future__ import annotations

import errno
import os
import sys
import re

FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 16 << 20                 # bytes: below this, a failed write is blamed on a full disk
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


class RunFault(RuntimeError):
    """A fault with its one-line message (no "error: " prefix) and exit status."""

    def __init__(self, message: str, status: int = 1, every_rank: bool = False, silent: bool = False):
        super().__init__(message)
        self.status, self.every_rank, self.silent = status, every_rank, silent

    def should_print(self) -> bool:
        """Whether this process prints the line: not for `silent` faults, and for `every_rank` ones on local rank
        0 only."""
        return not self.silent and (not self.every_rank or int(os.environ.get("LOCAL_RANK", "0")) == 0)

    def line(self) -> str:
        """The message on one line (a library's multi-line text folded)."""
        return " ".join(str(self).split())


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    """Bytes this process may still write on the file system holding `path` (root may use the reserved blocks)."""
    st = os.statvfs(_existing(path))
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of the first OSError in `exc`'s chain (cause / context), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(folder: str) -> bool:
    """True when the file system holding `folder` cannot take more data (see the module header)."""
    try:
        if free_bytes(folder) < LOW_SPACE:
            return True
    except OSError:
        return False
    probe = os.path.join(_existing(folder), f".space_probe_{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno in FULL
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return False


def write_failure(exc: BaseException, path: str, doing: str, after: str = "") -> BaseException:
    """The RunFault for a failed write of `path` (`doing`: "saving checkpoint X"), or `exc` itself when the failure
    is neither a file-system error nor torch's writer error (then it is a bug and keeps its traceback). `after` is
    appended to the line (what is left intact, what to do)."""
    code = _errno_of(exc)
    torch_writer = isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("iostream error", "unexpected pos", "file write failed", "PytorchStreamWriter"))
    if code is None and not torch_writer:
        return exc
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    tail = f"; {after}" if after else ""
    if code in FULL or (code is None and disk_full(folder)):
        try:
            left = f" ({human_bytes(free_bytes(folder))} free)"
        except OSError:
            left = ""
        return RunFault(f"no space left on device while {doing}{left}{tail}")
    if code is not None:
        return RunFault(f"{os.strerror(code).lower()} while {doing}{tail}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RunFault(f"could not write {path} while {doing} ({first}){tail}")


def check_writable(folder: str) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it; RunFault naming it if that fails."""
    probe = os.path.join(folder, f".write_probe_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as e:
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        if e.errno in FULL:
            reason = "no space left on device"
        raise RunFault(f"run folder {folder} is not writable ({reason}); pass another --out", status=2,
                       every_rank=True) from None


def check_readable(path: str, what: str) -> None:
    """RunFault naming `what` and `path` when `path` does not exist or cannot be read (a folder: listed)."""
    if not os.path.exists(path):
        raise RunFault(f"{what} not found: {path}", status=2, every_rank=True)
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        raise RunFault(f"cannot read {what} {path} ({os.strerror(e.errno).lower() if e.errno else e})",
                       status=2, every_rank=True) from None


def _worker_message(text: str) -> str | None:
    """The original message of an exception re-raised from a DataLoader worker (its traceback's last line)."""
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return None
    last = text.strip().splitlines()[-1]
    m = re.match(r"^[\w.]+: (.*)$", last)
    return m.group(1) if m else last


def _port_in_use(exc: BaseException) -> str | None:
    text = str(exc)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return None
    m = re.search(r"port: (\d+)", text)
    port = m.group(1) if m else os.environ.get("MASTER_PORT", "?")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return (f"master port {port} on {addr} is already in use (another job?); pick a free one with the deepspeed "
            f"launcher's --master_port, or MASTER_PORT for a plain python launch")


def describe(exc: BaseException) -> RunFault | None:
    """The RunFault for a known fault, None for anything else (a bug: let its traceback show)."""
    from ofa_ds.data.tsv import TooManyBadRows
    from ofa_ds.model.weights import CheckpointError
    from ofa_ds.training.ds_config import ConfigMismatch

    if isinstance(exc, RunFault):
        return exc
    if isinstance(exc, TooManyBadRows):
        return RunFault(str(exc), status=1)
    if isinstance(exc, (ConfigMismatch, CheckpointError)):
        return RunFault(str(exc), status=2, every_rank=True)
    text = str(exc)
    inner = _worker_message(text)
    if inner is not None and "TooManyBadRows" in text.splitlines()[0]:
        return RunFault(inner, status=1)
    if any(s in text for s in PEER_LOST):
        return RunFault("lost the connection to another rank, which stopped first", status=1, silent=True)
    port = _port_in_use(exc)
    if port is not None:
        return RunFault(port, status=1)
    if isinstance(exc, FileNotFoundError):
        msg = f"file not found: {exc.filename}" if exc.filename else text
        return RunFault(msg, status=2, every_rank=True)
    if isinstance(exc, OSError) and exc.errno:
        what = os.strerror(exc.errno).lower() if exc.errno not in FULL else "no space left on device"
        return RunFault(f"{what}: {exc.filename}" if exc.filename else f"{what} ({text})", status=1)
    return None


def report(exc: BaseException) -> int:
    """For a command's top level: print a known fault as its one `error: ...` line (where this rank should) and
    return its exit status; re-raise anything else, so a bug keeps its traceback."""
    fault = describe(exc)
    if fault is None:
        raise exc
    if fault.should_print():
        print(f"error: {fault.line()}", file=sys.stderr, flush=True)
    return fault.status
