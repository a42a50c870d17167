"""What the multi-node launchers (`launch/multinode.sh`, `launch/slurm.sbatch`) and the doctor need to know
before a launch: the hosts, the precision the GPUs allow, the DeepSpeed config, the network interface, the
environment every node gets.

Stdlib only, and no torch import unless a GPU must be asked about without `nvidia-smi`, so that `--help`, hostfile
checks and dry runs are instant on a login node.

* `parse_hostfile` reads DeepSpeed's / OpenMPI's hostfile format (`host slots=N`, `#` comments) like DeepSpeed's
  runner does, but collects *every* problem with its line number instead of stopping at the first.
* `detect_gpus` asks `nvidia-smi` for name, memory and compute capability (torch as a fallback); `pick_precision`
  turns that into bf16 (sm80+: A100, H100, H200), fp16 (sm70/75: V100, T4) or fp32 (no GPU: the CPU config);
  `pick_ds_config` finds the matching file in `ds_configs/`.
* `route_interface` names the network interface that carries traffic to the master address (what
  NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME should be), and `write_ds_env` writes the `.deepspeed_env` file that
  DeepSpeed's runner exports on every node. Its format is strict: one KEY=VALUE per line, no comments, no blanks
  (the runner splits every line on '=').

Command line, used by the shell launchers (`python -m ofa_ds.cluster.launch_setup CMD`):

    hosts HOSTFILE                                     # "host slots" lines, or the problems and exit 2
    precision                                          # bf16 | fp16 | fp32 for this node
    pick-config --zero 3 [--precision auto] [--offload offload|nvme]
    ifname ADDR [ADDR ...]                             # interface that routes to the first non-loopback ADDR
    env-file OUT [--ifname IF] [--set K=V ...]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

from ofa_ds.cluster.probe import nvidia_smi_gpus, route_interface  # stdlib-only helpers shared with the probe

HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")

# Variables carried to every node when set on the launch node (prefix match), in addition to PATH/PYTHONPATH.
PASS_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "OFA_", "HF_", "TRITON_", "DEEPSPEED_TIMEOUT", "CUDA_HOME",
                 "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")
# Never carried: per-node or per-process values that would be wrong elsewhere.
NEVER_PASS = ("CUDA_VISIBLE_DEVICES", "NCCL_COMM_ID", "TORCH_NCCL_TRACE_BUFFER_SIZE")


@dataclass
class Hostfile:
    """A parsed hostfile: hosts in order (the first is rank 0's node), their slots, and every problem found."""
    path: str
    hosts: list[str] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(self.slots.values())


def parse_hostfile(path: str) -> Hostfile:
    """Parse `host slots=N` lines; `#` starts a comment (whole line or trailing), blank lines are skipped.

    Problems reported (all of them, each with its line number): unreadable file, a line without `slots=N`,
    slots that are not a positive integer, extra words, a host listed twice, no host at all.
    """
    hf = Hostfile(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        hf.problems.append(f"hostfile {path}: cannot read it ({e.strerror})")
        return hf
    first_line = {}
    for no, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {path} line {no}"
        m = HOST_LINE.match(line)
        if not m:
            words = line.split()
            if len(words) == 1:
                hf.problems.append(f"{where}: '{line}' has no slots; write '{words[0]} slots=<GPUs on that node>'")
            elif not any(w.startswith("slots=") for w in words[1:]):
                hf.problems.append(f"{where}: '{line}' is not 'host slots=N' (OpenMPI/DeepSpeed format)")
            else:
                bad = [w for w in words[1:] if w.startswith("slots=")][0]
                if not re.fullmatch(r"slots=\d+", bad):
                    hf.problems.append(f"{where}: '{bad}' is not a whole number of slots")
                else:
                    hf.problems.append(f"{where}: '{line}' has extra words; only 'host slots=N' is understood")
            continue
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            hf.problems.append(f"{where}: {host} has slots=0; remove the line or give it at least one slot")
            continue
        if host in hf.slots:
            hf.problems.append(f"{where}: {host} is listed twice (first on line {first_line[host]}); "
                               "DeepSpeed refuses duplicate hosts, merge the slots into one line")
            continue
        first_line[host] = no
        hf.hosts.append(host)
        hf.slots[host] = slots
    if not hf.hosts and not hf.problems:
        hf.problems.append(f"hostfile {path}: no hosts (every line is blank or a comment)")
    return hf


@dataclass
class Gpu:
    index: int
    name: str
    mem_total_mib: int
    mem_free_mib: int
    capability: tuple[int, int] | None


def detect_gpus() -> list[Gpu]:
    """GPUs on this node: from `nvidia-smi` when present, else from torch.cuda; [] on a CPU-only node."""
    try:
        found = nvidia_smi_gpus()
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError):
        found = None
    if found is not None:
        return [Gpu(g["index"], g["name"], g["mem_total_mib"], g["mem_free_mib"],
                    tuple(int(x) for x in g["capability"].split(".")) if g["capability"] else None) for g in found]
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(Gpu(i, torch.cuda.get_device_name(i), total >> 20, free >> 20,
                        tuple(torch.cuda.get_device_capability(i))))
    return gpus


def precision_for(capabilities: list[tuple[int, int] | None], names: list[str] = ()) -> str:
    """bf16 when every GPU is sm80 or newer (A100, H100, H200), fp16 when any is older (V100 sm70, T4 sm75:
    no bf16), fp32 with no GPU. Names are the fallback when a driver does not report the capability."""
    if not capabilities:
        return "fp32"
    caps = []
    for cap, name in zip(capabilities, list(names) + [""] * len(capabilities)):
        if cap is None:
            cap = (7, 0) if re.search(r"V100|T4|P100|K80|RTX 20", name) else (8, 0)
        caps.append(cap)
    return "bf16" if min(caps) >= (8, 0) else "fp16"


def pick_precision(gpus: list[Gpu] | None = None) -> str:
    gpus = detect_gpus() if gpus is None else gpus
    return precision_for([g.capability for g in gpus], [g.name for g in gpus])


def pick_ds_config(zero: int, precision: str, ds_dir: str = "ds_configs", offload: str | None = None) -> str:
    """The `ds_configs/` file for a ZeRO stage and a precision (fp32: the CPU/fp32 file).

    Names are matched loosely (`zero3_bf16.json`, `zero3-bf16.json`, `ds_zero3_fp16.json`, ...): the file must
    name the stage and the precision. offload="offload" picks the CPU-offload variant, "nvme" the NVMe one; without
    it those are never picked. Raises FileNotFoundError listing what is there when nothing matches.
    """
    files = sorted(glob.glob(os.path.join(ds_dir, "*.json")))

    def stage_of(name: str) -> int | None:
        m = re.search(r"(?:zero|stage)[_-]?(\d)", name)
        return int(m.group(1)) if m else None

    def kind_of(name: str) -> str | None:
        return "nvme" if "nvme" in name else "offload" if "offload" in name else None

    cands = []
    for f in files:
        name = os.path.basename(f).lower()
        if kind_of(name) != offload:
            continue
        if precision == "fp32":
            ok = ("cpu" in name or "fp32" in name) and stage_of(name) in (zero, None)
        else:
            ok = precision in name and stage_of(name) == zero
        if ok:
            cands.append(f)
    # prefer the stage-specific file, then the shortest name
    cands.sort(key=lambda f: (stage_of(os.path.basename(f).lower()) != zero, len(f)))
    if not cands:
        have = ", ".join(os.path.basename(f) for f in files) or "nothing"
        raise FileNotFoundError(f"no ZeRO-{zero} {precision}{' ' + offload if offload else ''} config in {ds_dir} "
                                f"(it holds: {have}); pass --ds-config")
    return cands[0]


def ds_env_lines(ifname: str | None = None, extra: dict[str, str] | None = None,
                 environ: dict[str, str] | None = None, repo: str | None = None) -> dict[str, str]:
    """What every node must see: this node's PATH (so the same venv/conda python and ninja are found),
    PYTHONPATH with the repository first, the NCCL/GLOO/TORCH/OFA/HF variables set here, the socket interface,
    and `extra` last (it wins)."""
    env = dict(os.environ if environ is None else environ)
    repo = os.path.abspath(repo or os.getcwd())
    out: dict[str, str] = {}
    out["PATH"] = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    parts = [repo] + [p for p in env.get("PYTHONPATH", "").split(":") if p and os.path.abspath(p) != repo]
    out["PYTHONPATH"] = ":".join(parts)
    for key in sorted(env):
        if key.startswith(PASS_PREFIXES) and key not in NEVER_PASS and "\n" not in env[key]:
            out[key] = env[key]
    if ifname:
        out["NCCL_SOCKET_IFNAME"] = ifname
        out["GLOO_SOCKET_IFNAME"] = ifname
    out.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    out.update(extra or {})
    return out


def write_ds_env(path: str, values: dict[str, str]) -> str:
    """Write `.deepspeed_env`: KEY=VALUE lines only (DeepSpeed's runner splits every line on '=')."""
    for k, v in values.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) or "\n" in v:
            raise ValueError(f"cannot carry {k!r} in .deepspeed_env")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())
    os.replace(tmp, path)
    return path


def read_ds_env(path: str) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                out[k.strip()] = v.strip()
    return out


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofa_ds.cluster.launch_setup", description="helpers for launch/*.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hosts", help="print 'host slots' per line, or the hostfile's problems (exit 2)")
    p.add_argument("hostfile")
    sub.add_parser("precision", help="bf16 | fp16 | fp32 for the GPUs of this node")
    p = sub.add_parser("pick-config", help="the ds_configs file for a ZeRO stage and this node's precision")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--offload", default=None, choices=["offload", "nvme"])
    p.add_argument("--dir", default="ds_configs")
    p = sub.add_parser("ifname", help="interface that routes to the first of the addresses not on loopback")
    p.add_argument("addr", nargs="+")
    p = sub.add_parser("env-file", help="write the .deepspeed_env for every node")
    p.add_argument("out")
    p.add_argument("--ifname")
    p.add_argument("--repo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)

    if a.cmd == "hosts":
        hf = parse_hostfile(a.hostfile)
        if hf.problems:
            print("\n".join(hf.problems), file=sys.stderr)
            return 2
        print("\n".join(f"{h} {hf.slots[h]}" for h in hf.hosts))
    elif a.cmd == "precision":
        print(pick_precision())
    elif a.cmd == "pick-config":
        prec = pick_precision() if a.precision == "auto" else a.precision
        try:
            print(pick_ds_config(a.zero, prec, a.dir, a.offload))
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
    elif a.cmd == "ifname":
        names = [route_interface(addr) for addr in a.addr]
        usable = [n for n in names if n and n != "lo"]
        if not usable:
            print(f"no interface other than loopback reaches {' '.join(a.addr)}", file=sys.stderr)
            return 2
        print(usable[0])
    elif a.cmd == "env-file":
        extra = {}
        for kv in a.set:
            k, _, v = kv.partition("=")
            extra[k] = v
        write_ds_env(a.out, ds_env_lines(a.ifname, extra, repo=a.repo))
        print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
