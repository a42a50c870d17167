"""Two real hosts on one machine, for the multi-node tests: network namespaces, a veth pair and an sshd in each.

    with TwoHostCluster(tmpdir) as c:            # needs root, `ip netns`, sshd, ssh, pdsh (see requirements())
        c.run("a", ["python", "launch/doctor.py", "--hostfile", c.hostfile()], env=c.ssh_env())

* namespaces `ofamn<pid>a` and `ofamn<pid>b`, joined by a veth pair named `ofa0` on both sides, with the addresses
  10.123.0.1/24 and 10.123.0.2/24 (assigned here; the namespaces reach nothing else);
* `/etc/netns/<ns>/hosts` names them `ofa-node-a` and `ofa-node-b` for every process started with `ip netns exec`
  (that is how `ip netns` gives a namespace its own /etc/hosts), so hostfiles use hostnames as on a cluster;
* an sshd per host, in its own UTS namespace (so `hostname` says which host a rank is on), accepting only a key
  pair made for this cluster; the client side is an ssh config file passed as `PDSH_SSH_ARGS_APPEND=-F <file>`,
  the variable pdsh (and the doctor) use, so nothing under ~/.ssh is touched;
* `add_sshd(node, port, alias, bind_mounts)` starts one more sshd whose sessions see some files replaced (a bind
  mount in a private mount namespace): a node with different software, reachable under another host alias.

`close()` kills every process in the namespaces (`ip netns pids`), deletes them (which removes the veth pair) and
the /etc/netns entries. Namespaces left by a test process that died are removed by the next one.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

SUBNET = "10.123.0"
NODES = {"a": ("ofa-node-a", f"{SUBNET}.1"), "b": ("ofa-node-b", f"{SUBNET}.2")}
IFNAME = "ofa0"
PREFIX = "ofamn"


def requirements() -> str | None:
    """None when the two-host tests can run here, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and sshd)"
    missing = [b for b in ("ip", "unshare", "mount", "ssh", "ssh-keygen", "pdsh") if not shutil.which(b)]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd")
    if missing:
        return f"missing {', '.join(missing)}: run .ci/install_multinode.sh"
    probe = f"{PREFIX}probe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    if not ok:
        return "`ip netns add` is not permitted on this machine"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _kill_namespace(ns: str) -> None:
    for _ in range(3):
        pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.2)
    _sh("ip", "netns", "delete", ns, check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def remove_stale() -> None:
    """Delete namespaces of this harness whose test process is gone."""
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"^({PREFIX}(\d+)[ab])\b", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            _kill_namespace(m.group(1))


class TwoHostCluster:
    def __init__(self, workdir: str):
        self.dir = os.path.abspath(workdir)
        self.ns = {n: f"{PREFIX}{os.getpid()}{n}" for n in NODES}
        self.daemons: list[subprocess.Popen] = []
        self.ssh_config = os.path.join(self.dir, "ssh_config")

    # ------------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "TwoHostCluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        remove_stale()
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)
        pid = os.getpid()
        host_a, host_b = f"ofa{pid}a"[:15], f"ofa{pid}b"[:15]
        for n, ns in self.ns.items():
            _sh("ip", "netns", "add", ns)
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in NODES.values()))
        _sh("ip", "link", "add", host_a, "type", "veth", "peer", "name", host_b)
        for (n, ns), dev in zip(self.ns.items(), (host_a, host_b)):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", dev, "name", IFNAME)
            _sh("ip", "-n", ns, "addr", "add", f"{NODES[n][1]}/24", "dev", IFNAME)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
        key = os.path.join(self.dir, "id_ed25519")
        for path in (key, os.path.join(self.dir, "host_ed25519")):
            if not os.path.exists(path):
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ofa-multinode-test", "-f", path)
        shutil.copy(key + ".pub", os.path.join(self.dir, "authorized_keys"))
        with open(self.ssh_config, "w") as f:
            f.write(f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
                    "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n  ConnectTimeout 5\n")
        for n in NODES:
            self.add_sshd(n, 22)
        for n in NODES:
            self.wait_ssh(NODES[n][0])

    def close(self) -> None:
        for p in self.daemons:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.daemons.clear()
        for ns in self.ns.values():
            _kill_namespace(ns)

    # ------------------------------------------------------------------------------------------------- hosts
    def add_sshd(self, node: str, port: int, alias: str | None = None,
                 bind_mounts: list[tuple[str, str]] = ()) -> None:
        """An sshd on `node`:`port`; `alias` makes it reachable as that host name; sessions see each `src` mounted
        over `dst` (a private mount namespace, gone with the sshd)."""
        name, ip = NODES[node]
        conf = os.path.join(self.dir, f"sshd_{node}_{port}.conf")
        with open(conf, "w") as f:
            f.write(f"ListenAddress {ip}:{port}\nHostKey {self.dir}/host_ed25519\n"
                    f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile none\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "UsePAM no\nStrictModes no\nPrintMotd no\nLogLevel ERROR\n")
        if alias:
            with open(self.ssh_config, "r+") as f:
                text = f.read()
                f.seek(0)
                f.write(f"Host {alias}\n  HostName {ip}\n  Port {port}\n" + text)
        mounts = "".join(f"mount --bind {src} {dst} && " for src, dst in bind_mounts)
        script = f"hostname {name} && {mounts}exec /usr/sbin/sshd -D -f {conf} -E {conf}.log"
        self.daemons.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns[node], "unshare", "--uts", "--mount", "--propagation", "private",
             "sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if alias:
            self.wait_ssh(alias)

    def wait_ssh(self, host: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.run("a", ["ssh", "-F", self.ssh_config, host, "true"], timeout=10)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd for {host} did not come up: {r.stderr.strip()}")
            time.sleep(0.3)

    def hostfile(self, lines: list[str] | None = None, name: str = "hostfile") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("\n".join(lines or ["# two simulated hosts, one rank each", "ofa-node-a slots=1",
                                        "ofa-node-b slots=1"]) + "\n")
        return path

    def ssh_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PDSH_SSH_ARGS_APPEND"] = f"-F {self.ssh_config}"
        env.update(extra)
        return env

    # ------------------------------------------------------------------------------------------------- commands
    def command(self, node: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[node]] + list(cmd)

    def run(self, node: str, cmd: list[str], env: dict | None = None, timeout: float = 120,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on a host; on timeout every process of the cluster's namespaces started by it is killed."""
        p = subprocess.Popen(self.command(node, cmd), env=env, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            self.kill_jobs()
            err += f"\n[cluster] killed after {timeout}s"
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def popen(self, node: str, cmd: list[str], env: dict | None = None, cwd: str | None = None,
              log: str | None = None) -> subprocess.Popen:
        out = open(log, "w") if log else subprocess.DEVNULL
        return subprocess.Popen(self.command(node, cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def kill_jobs(self, node: str | None = None) -> None:
        """Kill whatever runs in the namespaces (or in `node`'s) except the sshds: ranks left by a failed launch,
        or, for one node, what a node failure does to a running job."""
        keep = {str(p.pid) for p in self.daemons}
        for ns in [self.ns[node]] if node else self.ns.values():
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    comm = open(f"/proc/{pid}/comm").read().strip()
                    if comm not in ("sshd", "unshare") and pid not in keep:
                        os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
