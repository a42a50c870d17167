"""Pre-flight check of a hostfile before a multi-node DeepSpeed job (`python launch/doctor.py --hostfile H`).

A 64-GPU job that hangs in `init_process_group` tells nobody why. The doctor asks each node the questions that
explain such hangs, the way the real launch will reach it, and prints one table plus one message per problem:

1. hostfile syntax (`host slots=N`, comments, duplicates; the same rules as DeepSpeed's runner, every line at once);
2. the launcher on this node (pdsh, or mpirun + mpi4py for OpenMPI) when the hostfile has more than one host;
3. passwordless ssh to every host, this one included (pdsh ssh-es to itself too), with the same options pdsh
   will use (`PDSH_SSH_ARGS_APPEND`, `--ssh-port`), in batch mode so nothing waits for a password;
4. the same Python / torch / deepspeed / ofa_ds version and ofa_ds git commit on every node, found by running the
   interpreter the launcher will run (this `sys.executable`) in the directory it will `cd` to, with the
   environment it will export (PYTHONPATH, `.deepspeed_env`);
5. GPUs: count >= slots, memory free (a busy GPU means another job), bf16 configs on pre-A100 GPUs (skipped with
   a note on CPU-only nodes);
6. the master address and port: a listener is opened on the first host, and every node must connect to it;
7. NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name an interface that exists on every node;
8. each `--data PATH` is readable on every node.

What runs on the nodes is `ofa_ds/cluster/probe.py` (stdlib only), sent as `python -c`. `--via srun` reaches the
nodes through `srun -w host` instead of ssh (SLURM clusters without ssh between nodes).
"""
from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ofa_ds.cluster.launch_setup import Hostfile, parse_hostfile, read_ds_env

PROBE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py")
VERSION_KEYS = ("python", "torch", "deepspeed", "ofa_ds", "commit")


@dataclass
class Options:
    hostfile: str
    master_addr: str | None = None
    master_port: int = 29500
    data: list[str] = field(default_factory=list)
    launcher: str = "pdsh"  # pdsh | openmpi | no_ssh (no_ssh: the doctor itself still needs ssh or srun)
    via: str = "ssh"  # ssh | srun | local (a one-host hostfile: DeepSpeed starts it locally, without ssh)
    ssh_port: int | None = None
    ssh_args: str | None = None  # default: $PDSH_SSH_ARGS_APPEND, as pdsh uses it
    env_file: str | None = None  # default: $DS_ENV_FILE, ./.deepspeed_env, ~/.deepspeed_env (DeepSpeed's order)
    ds_config: str | None = None
    timeout: float = 10.0
    min_free_frac: float = 0.9
    python: str = sys.executable
    cwd: str = field(default_factory=os.getcwd)


@dataclass
class Report:
    hostfile: Hostfile
    rows: list[list[str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    probes: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------------- reaching nodes

def ds_env_file(opts: Options) -> str | None:
    """The `.deepspeed_env` DeepSpeed's runner would read (it reads ~ then ., the later one winning)."""
    if opts.env_file:
        return opts.env_file
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    found = None
    for base in (os.path.expanduser("~"), opts.cwd):
        path = os.path.join(base, name)
        if os.path.isfile(path):
            found = path
    return found


def node_exports(opts: Options) -> dict[str, str]:
    """The environment DeepSpeed's pdsh runner exports on every node: PYTHONPATH with the working directory first,
    every PYTHON* variable of this node, then the `.deepspeed_env` lines."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PYTHON") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = ":".join(p for p in [opts.cwd, os.environ.get("PYTHONPATH", "")] if p)
    path = ds_env_file(opts)
    if path and os.path.isfile(path):
        env.update(read_ds_env(path))
    return env


def node_command(opts: Options, host: str, probe_args: list[str]) -> list[str]:
    with open(PROBE_FILE, encoding="utf-8") as f:
        code = f.read()
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in node_exports(opts).items())
    shell = (f"cd {shlex.quote(opts.cwd)} 2>/dev/null || {{ echo OFA_DOCTOR_NOCWD; exit 3; }}; {exports}"
             f"exec {shlex.quote(opts.python)} -c {shlex.quote(code)} " + " ".join(map(shlex.quote, probe_args)))
    if opts.via == "local":
        return ["bash", "-c", shell]
    if opts.via == "srun":
        return ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", host, "bash", "-c", shell]
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no", "-o", f"ConnectTimeout={int(opts.timeout)}"]
    if opts.ssh_port:
        ssh += ["-p", str(opts.ssh_port)]
    extra = opts.ssh_args if opts.ssh_args is not None else os.environ.get("PDSH_SSH_ARGS_APPEND", "")
    return ssh + shlex.split(extra) + [host, shell]


def explain_failure(opts: Options, host: str, rc: int, out: str, err: str) -> str:
    """One actionable sentence for a node that did not answer."""
    text = (err.strip() or out.strip()).splitlines()
    last = text[-1] if text else f"exit status {rc}"
    if "OFA_DOCTOR_NOCWD" in out:
        return (f"{host}: working directory {opts.cwd} does not exist there; the launcher runs `cd {opts.cwd}` on "
                "every node, so use a shared filesystem or the same checkout path on every node")
    if opts.via == "ssh" and rc == 255:
        if "Permission denied" in err:
            return (f"{host}: passwordless ssh refused ({last}); run `ssh-copy-id {host}` from this node "
                    "(pdsh also needs it for the launch node itself)")
        if "Host key verification failed" in err:
            return f"{host}: its host key is unknown; run `ssh-keyscan {host} >> ~/.ssh/known_hosts`"
        if "Could not resolve" in err:
            return f"{host}: the name does not resolve ({last}); fix DNS or /etc/hosts, or put its IP in the hostfile"
        return f"{host}: unreachable over ssh ({last})"
    if rc == 127:
        return (f"{host}: {opts.python} is missing there; DeepSpeed's runner starts this same interpreter path on "
                "every node, so install the same environment at the same path")
    if opts.via == "srun" and rc != 0:
        return f"{host}: srun could not run there ({last})"
    return f"{host}: the probe failed (exit {rc}): {last}"


def run_probe(opts: Options, host: str, probe_args: list[str]) -> tuple[dict | None, str | None]:
    try:
        proc = subprocess.run(node_command(opts, host, probe_args), capture_output=True, text=True,
                              timeout=opts.timeout * 3 + 10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"{host}: no answer within {opts.timeout * 3 + 10:.0f}s"
    for line in proc.stdout.splitlines():
        if line.startswith("OFA_DOCTOR_JSON "):
            return json.loads(line[len("OFA_DOCTOR_JSON "):]), None
    return None, explain_failure(opts, host, proc.returncode, proc.stdout, proc.stderr)


class MasterListener:
    """Holds the master port open on the first host for the duration of the checks (closed with stdin)."""

    def __init__(self, opts: Options, host: str):
        self.host, self.proc, self.error = host, None, None
        cmd = node_command(opts, host, ["--listen", str(opts.master_port), "--listen-timeout", str(opts.timeout * 6)])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        # the first line: listening, bind error, or nothing (ssh failed); never wait longer than ssh could take
        ready, _, _ = select.select([self.proc.stdout], [], [], opts.timeout * 3 + 10)
        line = self.proc.stdout.readline() if ready else ""
        if line.startswith("OFA_DOCTOR_BIND_ERROR"):
            why = line.split(" ", 1)[1].strip()
            self.error = (f"master port {opts.master_port} cannot be opened on {host} ({why}): another job or a "
                          "stale rank holds it; pick another --master-port")
        elif not line.startswith("OFA_DOCTOR_LISTENING"):
            self.error = ""  # unreachable: reported by the probe of that host
        if self.error is not None:
            self.close()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            for stream in (self.proc.stdout, self.proc.stderr):
                stream.close()


# ------------------------------------------------------------------------------------------------------- the checks

def _ifname_ok(spec: str, interfaces: list[str]) -> bool:
    """NCCL's rule: comma-separated prefixes, `=` for exact names, `^` to exclude (exclusion always passes)."""
    if not spec or spec.startswith("^"):
        return True
    exact = spec.startswith("=")
    names = [n for n in spec.lstrip("=").split(",") if n]
    return any((i == n) if exact else i.startswith(n) for n in names for i in interfaces)


def _ds_precision(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for key in ("bf16", "fp16"):
        if str(cfg.get(key, {}).get("enabled", False)).lower() == "true":
            return key
    return "fp32"


def _check_launcher(opts: Options, rep: Report, hosts: list[str]) -> None:
    """The launcher's tools on this node. DeepSpeed's runner uses pdsh / mpirun only for more than one host
    (its multi_node_exec); with one host it starts the ranks locally, whatever --launcher says."""
    if len(hosts) < 2:
        return
    if opts.launcher == "pdsh" and not shutil.which("pdsh"):
        rep.problems.append("pdsh is not installed on this (launch) node: apt-get install pdsh, or use "
                            "--launcher openmpi / no_ssh")
    if opts.launcher == "openmpi" and not (shutil.which("mpirun") and shutil.which("ompi_info")):
        rep.problems.append("OpenMPI (mpirun, ompi_info) is not installed on this node: apt-get install openmpi-bin")


def check(opts: Options) -> Report:
    hf = parse_hostfile(opts.hostfile)
    rep = Report(hf, problems=list(hf.problems))
    hosts = hf.hosts
    if not hosts:
        return rep
    if opts.env_file and not os.path.isfile(opts.env_file):
        rep.problems.append(f"env file {opts.env_file} does not exist (launch/multinode.sh writes one)")
    if len(hosts) > 1 and any(h == "localhost" or h.startswith("127.") for h in hosts):
        rep.problems.append("hostfile: 'localhost' in a multi-node hostfile means a different machine on each node; "
                            "use the real hostname or IP")
    _check_launcher(opts, rep, hosts)

    if len(hosts) == 1 and opts.via == "ssh" and opts.launcher == "pdsh":
        opts.via = "local"
        rep.notes.append(f"one host: DeepSpeed starts its ranks here without ssh (run this on {hosts[0]})")
    master_host = hosts[0]
    master_addr = opts.master_addr or master_host
    listener = MasterListener(opts, master_host)
    if listener.error:
        rep.problems.append(listener.error)
    args = ["--timeout", str(min(opts.timeout, 5.0))]
    if listener.error is None:
        args += ["--connect", f"{master_addr}:{opts.master_port}"]
    for p in opts.data:
        args += ["--data", p]
    try:
        with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
            results = dict(zip(hosts, pool.map(lambda h: run_probe(opts, h, args), hosts)))
    finally:
        listener.close()

    probes = {h: r for h, (r, _) in results.items() if r is not None}
    rep.probes = probes
    rep.problems += [err for _, err in results.values() if err]
    _check_versions(opts, rep, probes)
    _check_gpus(opts, rep, probes)
    _check_network(opts, rep, probes, master_addr, listener.error is None)
    for h, info in probes.items():
        for path, status in info["data"].items():
            if status != "ok":
                rep.problems.append(f"{h}: data path {path} is not readable there ({status})")
    for h in hosts:
        rep.rows.append(_row(opts, h, probes.get(h), hf.slots[h], results[h][1]))
    _mark_differences(rep)
    return rep


def _mark_differences(rep: Report) -> None:
    """Append '*' to version cells that differ from the first answering host's."""
    answered = [r for r in rep.rows if r[2] == "ok"]
    for col in (3, 4, 5, 6):  # python, torch, deepspeed, ofa_ds (commit)
        for r in answered[1:]:
            if r[col] != answered[0][col]:
                r[col] += " *"


def _versions(info: dict) -> dict:
    o = info["ofa_ds"]
    return {"python": info["python"], "torch": info["torch"], "deepspeed": info["deepspeed"],
            "ofa_ds": o["version"], "commit": o["commit"]}


def _check_versions(opts: Options, rep: Report, probes: dict) -> None:
    for h, info in probes.items():
        for key in ("torch", "deepspeed"):
            if info[key] is None:
                rep.problems.append(f"{h}: {key} is not installed for {info['executable']}")
        if info["ofa_ds"]["path"] is None:
            rep.problems.append(f"{h}: ofa_ds is not importable from {info['cwd']} (PYTHONPATH or pip install -e .)")
    if len(probes) < 2:
        return
    for key in VERSION_KEYS:
        seen: dict[str, list[str]] = {}
        for h, info in probes.items():
            seen.setdefault(str(_versions(info)[key]), []).append(h)
        if len(seen) > 1:
            what = "; ".join(f"{v} on {', '.join(hs)}" for v, hs in seen.items())
            name = "ofa_ds git commit" if key == "commit" else key
            rep.problems.append(f"{name} differs between nodes: {what}. Every node must run the same software "
                                "(same venv/conda env and checkout, at the same path)")


def _check_gpus(opts: Options, rep: Report, probes: dict) -> None:
    cpu_only = [h for h, i in probes.items() if i["gpus"] is None]
    with_gpu = [h for h, i in probes.items() if i["gpus"] is not None]
    if cpu_only:
        rep.notes.append(f"GPU checks skipped on {', '.join(cpu_only)}: no nvidia-smi (CPU-only node); "
                         "ranks there use gloo and the fp32 CPU config")
    if cpu_only and with_gpu:
        rep.problems.append(f"some nodes have GPUs ({', '.join(with_gpu)}) and some none ({', '.join(cpu_only)})")
    caps = []
    for h in with_gpu:
        info, slots = probes[h], rep.hostfile.slots[h]
        if info["gpu_error"]:
            rep.problems.append(f"{h}: {info['gpu_error']} (driver problem?)")
            continue
        gpus = info["gpus"]
        if len(gpus) < slots:
            rep.problems.append(f"{h}: slots={slots} but only {len(gpus)} GPU(s); lower slots in the hostfile")
        for g in gpus[:slots]:
            caps.append((g["capability"], g["name"], h))
            if g["mem_free_mib"] < opts.min_free_frac * g["mem_total_mib"]:
                rep.problems.append(f"{h}: GPU {g['index']} ({g['name']}) has only {g['mem_free_mib'] / 1024:.1f} of "
                                    f"{g['mem_total_mib'] / 1024:.1f} GiB free: another process is using it "
                                    f"(nvidia-smi on {h})")
    old = sorted({f"{name} on {h}" for cap, name, h in caps
                  if (cap and tuple(map(int, cap.split("."))) < (8, 0)) or (not cap and "V100" in name)})
    prec = _ds_precision(opts.ds_config) if opts.ds_config else None
    if old and prec == "bf16":
        rep.problems.append(f"{opts.ds_config} trains in bf16 but {', '.join(old)} has no bf16 (pre-Ampere): "
                            "use the fp16 config (launch/multinode.sh --precision auto picks it)")
    elif old and len(old) < len(caps):
        rep.notes.append(f"mixed GPU generations ({', '.join(old)} lack bf16): train in fp16 on every node")


def _check_network(opts: Options, rep: Report, probes: dict, master_addr: str, listening: bool) -> None:
    target = f"{master_addr}:{opts.master_port}"
    if listening:
        for h, info in probes.items():
            if info.get("connect") not in (None, "ok"):
                rep.problems.append(f"{h}: cannot reach the master at {target} ({info['connect']}); check the "
                                    "address, firewalls, and that the hostname resolves to the right interface")
    env = node_exports(opts)
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        spec = env.get(var) or os.environ.get(var, "")
        for h, info in probes.items():
            if spec and not _ifname_ok(spec, info["interfaces"]):
                route = info.get("route_ifname")
                has = ", ".join(info["interfaces"])
                via = f"; the master is reached through {route}" if route else ""
                rep.problems.append(f"{h}: {var}={spec} matches no interface there (it has {has}{via})")
    ifname_set = any(env.get(v) or os.environ.get(v) for v in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"))
    loop = [h for h, i in probes.items() if (i.get("master_ip") or "").startswith("127.")]
    if len(probes) > 1 and loop and not ifname_set:
        rep.problems.append(f"{master_addr} resolves to a loopback address on {', '.join(loop)} (the 127.0.1.1 line "
                            "Debian/Ubuntu put in /etc/hosts): ranks there would advertise an address other nodes "
                            "cannot reach; set the interface (launch/multinode.sh --ifname IF) or use an IP")
    routes = {h: i.get("route_ifname") for h, i in probes.items() if i.get("route_ifname")}
    if routes and not (env.get("NCCL_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")):
        names = sorted(set(routes.values()) - {"lo"})
        if names:
            rep.notes.append(f"NCCL_SOCKET_IFNAME is not set; the master is reached through {', '.join(names)} "
                             f"(launch/multinode.sh --ifname {names[0]} writes it to .deepspeed_env)")


def _row(opts: Options, host: str, info: dict | None, slots: int, err: str | None) -> list[str]:
    if info is None:
        status = "FAIL" if err else "-"
        return [host, str(slots), status] + ["-"] * (len(HEADER) - 3)
    o = info["ofa_ds"]
    gpus = info["gpus"]
    if gpus is None:
        gpu_cell, mem_cell = "cpu-only", "-"
    else:
        gpu_cell = f"{len(gpus)}x {gpus[0]['name'].replace('NVIDIA ', '')}" if gpus else "0"
        mem_cell = ",".join(f"{g['mem_free_mib'] / 1024:.0f}" for g in gpus[:slots]) or "-"
    data = info["data"]
    data_cell = "-" if not data else ("ok" if all(v == "ok" for v in data.values()) else
                                      f"{sum(v != 'ok' for v in data.values())} unreadable")
    connect = info.get("connect")
    return [host, str(slots), "ok", info["python"], str(info["torch"]), str(info["deepspeed"]),
            f"{o['version']} ({o['commit'] or 'no git'})", gpu_cell, mem_cell,
            "-" if connect is None else ("ok" if connect == "ok" else "FAIL"), info.get("route_ifname") or "-",
            data_cell]


HEADER = ["host", "slots", "reach", "python", "torch", "deepspeed", "ofa_ds (commit)", "gpus", "free GiB",
          "master", "iface", "data"]


def render(opts: Options, rep: Report) -> str:
    lines = [f"ofa_ds doctor: {opts.hostfile}, {len(rep.hostfile.hosts)} host(s), "
             f"{rep.hostfile.world_size} rank(s), launcher {opts.launcher}, via {opts.via}, "
             f"master {opts.master_addr or (rep.hostfile.hosts[0] if rep.hostfile.hosts else '?')}:{opts.master_port}"]
    if rep.rows:
        header = HEADER[:]
        header[9] = f"master:{opts.master_port}"
        rows = [header] + rep.rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for n in rep.notes:
        lines.append(f"note: {n}")
    if any(c.endswith(" *") for r in rep.rows for c in r):
        lines.append(f"note: * = differs from {rep.rows[0][0]}")
    if rep.problems:
        lines.append(f"PROBLEMS ({len(rep.problems)}):")
        lines += [f"  {i}. {p}" for i, p in enumerate(rep.problems, 1)]
        lines.append("doctor: FAILED - fix the problems above before launching")
    else:
        lines.append("doctor: OK - every node answered with the same software; the master port is reachable")
    return "\n".join(lines)
