"""The part of the multi-node doctor that runs *on* each node (sent over ssh as `python -c <this file>`).

Standard library only and never imports torch, deepspeed or ofa_ds: the doctor must still report a node where
those are missing or broken, and it must answer in well under a second. It prints one line,
`OFA_DOCTOR_JSON {...}`, holding:

* hostname, Python version and executable; torch / deepspeed / mpi4py versions from the installed metadata (what
  `import` would load first on sys.path); where `ofa_ds` would be imported from, its version and git commit;
* GPUs from `nvidia-smi` (index, name, total and free MiB, compute capability), or `gpus: null` when the node has
  no `nvidia-smi` (CPU-only);
* the network interfaces, and the one that routes to the master address;
* for `--connect ADDR:PORT`: whether a TCP connection to the doctor's listener on the master node succeeds;
* for each `--data PATH`: "ok" or why it cannot be read.

`--listen PORT` is the master-node mode: bind PORT on all addresses (the way torch's TCPStore will), print
`OFA_DOCTOR_LISTENING` (or `OFA_DOCTOR_BIND_ERROR <why>`), and greet every connection with `ofa-doctor` until
stdin closes or `--listen-timeout` seconds pass, so it can never outlive the doctor by long.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import socket
import subprocess
import sys
import time

BANNER = b"ofa-doctor\n"


def parse_nvidia_smi_csv(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=index,name,memory.total,memory.free[,compute_cap]
    --format=csv,noheader,nounits` as dicts: index, name, mem_total_mib, mem_free_mib, capability ("8.0" or None)."""
    gpus = []
    for row in text.strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        cap = parts[4] if len(parts) > 4 and re.fullmatch(r"\d+\.\d+", parts[4]) else None
        gpus.append({"index": int(parts[0]), "name": parts[1], "mem_total_mib": int(float(parts[2])),
                     "mem_free_mib": int(float(parts[3])), "capability": cap})
    return gpus


def nvidia_smi_gpus(smi: str | None = None) -> list[dict] | None:
    """This node's GPUs (see parse_nvidia_smi_csv); None without nvidia-smi (a CPU-only node)."""
    smi = smi or shutil.which("nvidia-smi")
    if not smi:
        return None
    for fields in ("index,name,memory.total,memory.free,compute_cap", "index,name,memory.total,memory.free"):
        out = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:  # old drivers do not know compute_cap: ask again without it
            return parse_nvidia_smi_csv(out.stdout)
    raise RuntimeError(f"nvidia-smi failed: {out.stderr.strip() or out.stdout.strip()}")


def route_interface(addr: str) -> str | None:
    """The interface this node uses to reach `addr` (a name or an IP): the `ip route get` device, or, when
    `addr` is one of this node's own addresses, the interface that holds it. None if unknown or unreachable."""
    ip = shutil.which("ip")
    if not ip:
        return None
    try:
        target = socket.gethostbyname(addr)
        out = subprocess.run([ip, "-o", "route", "get", target], capture_output=True, text=True, timeout=10)
        m = re.search(r"\bdev (\S+)", out.stdout)
        if m and m.group(1) != "lo":
            return m.group(1)
        if target.startswith("127."):
            return "lo"
        owned = subprocess.run([ip, "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in owned.stdout.splitlines():  # "3: eth0    inet 10.0.0.5/24 brd ..."
        words = line.split()
        if len(words) > 3 and words[3].split("/")[0] == target:
            return words[1].split("@")[0]
    return None


def _dist_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ofa_ds() -> dict:
    import importlib.util
    try:
        spec = importlib.util.find_spec("ofa_ds")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return {"path": None, "version": None, "commit": None}
    pkg = os.path.dirname(spec.origin)
    version = None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            m = re.search(r"""__version__\s*=\s*["']([^"']+)""", f.read())
            version = m.group(1) if m else None
    except OSError:
        pass
    commit = None
    if shutil.which("git"):
        out = subprocess.run(["git", "-C", pkg, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
    return {"path": pkg, "version": version, "commit": commit}


def _check_path(path: str) -> str:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        return "ok"
    except OSError as e:
        return f"{e.strerror or e}"


def _connect(target: str, timeout: float) -> str:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            greeting = s.recv(len(BANNER))
        return "ok" if greeting == BANNER else "answered, but not by the doctor's listener (another service?)"
    except socket.timeout:
        return f"timed out after {timeout:.0f}s (firewall, or wrong address?)"
    except OSError as e:
        return e.strerror or str(e)


def probe(args: argparse.Namespace) -> dict:
    info = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "torch": _dist_version("torch"),
        "deepspeed": _dist_version("deepspeed"),
        "mpi4py": _dist_version("mpi4py"),
        "ofa_ds": _ofa_ds(),
    }
    try:
        info["gpus"] = nvidia_smi_gpus()
        info["gpu_error"] = None
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
        info["gpus"], info["gpu_error"] = [], str(e)
    try:
        info["interfaces"] = sorted(os.listdir("/sys/class/net"))
    except OSError:
        info["interfaces"] = []
    if args.connect:
        master = args.connect.rpartition(":")[0]
        info["route_ifname"] = route_interface(master)
        try:
            info["master_ip"] = socket.gethostbyname(master)
        except OSError:
            info["master_ip"] = None
        info["connect"] = _connect(args.connect, args.timeout)
    info["data"] = {p: _check_path(p) for p in args.data}
    return info


def listen(port: int, timeout: float) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore does
    try:
        srv.bind(("", port))
        srv.listen(64)
    except OSError as e:
        print(f"OFA_DOCTOR_BIND_ERROR {e.strerror or e}", flush=True)
        return 3
    print("OFA_DOCTOR_LISTENING", flush=True)
    deadline = time.monotonic() + timeout
    watch = [srv, sys.stdin]
    while time.monotonic() < deadline:
        ready, _, _ = select.select(watch, [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the doctor closed our stdin (or died): stop
        if srv in ready:
            conn, _ = srv.accept()
            with conn:  # greet, then let the client close first so TIME_WAIT stays off the master port
                conn.settimeout(2.0)
                try:
                    conn.sendall(BANNER)
                    conn.recv(1)
                except OSError:
                    pass
    srv.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ofa_ds doctor probe (runs on one node)")
    ap.add_argument("--data", action="append", default=[])
    ap.add_argument("--connect", help="ADDR:PORT of the doctor's listener on the master node")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--listen", type=int, help="master mode: hold this port open")
    ap.add_argument("--listen-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    if args.listen is not None:
        return listen(args.listen, args.listen_timeout)
    print("OFA_DOCTOR_JSON " + json.dumps(probe(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
