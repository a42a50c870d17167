"""Real two-host tests on one machine: the launchers and the doctor against two network-namespace hosts.

The hosts (tests/cluster/cluster.py) are network namespaces joined by a veth pair, each with its own sshd, so
`launch/multinode.sh` goes through the same path as on a cluster: DeepSpeed's runner, pdsh over ssh to both hosts
(the launch host included), `.deepspeed_env` exported on each, rendezvous at the master over the veth interface.
The losses of a few ZeRO-3 steps on two hosts (one rank each) must equal those of the same job on one host with
two ranks. The doctor must pass on this setup and name the problem in broken ones (malformed hostfile,
unreachable host, a node with another deepspeed version, a busy master port, a wrong NCCL interface).

Skipped, with the reason, unless root with `ip netns`, sshd, ssh and pdsh (`.ci/install_multinode.sh`).
"""
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.cluster.cluster import NODES, TwoHostCluster, requirements

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHY_NOT = requirements()
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(WHY_NOT is not None, reason=f"two-host test: {WHY_NOT}")]

HOST_A, HOST_B = NODES["a"][0], NODES["b"][0]
STEPS = 3
JOB_TIMEOUT = 170


# ------------------------------------------------------------------------------------------------------- the jobs

def pretrain(out: str) -> list[str]:
    """The real thing, kept short: OFA-Tiny pretraining on the synthetic mixture, a few ZeRO-3 fp32 steps with a
    learning rate large enough (no warmup) that every step after the first depends on the previous update."""
    sets = ["data.batch_size=2", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1",
            "train.save_final=false", "train.export_final=false", "train.progress=false", "eval.data={}"]
    return ["launch/pretrain.py", "--out", out, "--steps", str(STEPS)] + [a for kv in sets for a in ("--set", kv)]


def tiny(out: str) -> list[str]:
    """A few ZeRO-3 steps of a tiny MLP (tests/cluster/tiny_zero3.py): the other launch paths, in seconds."""
    return ["tests/cluster/tiny_zero3.py", "--out", out, "--steps", str(STEPS)]


def read_losses(out: str) -> list[float]:
    """Per-step losses: pretrain's metrics.jsonl (train records) or tiny_zero3's losses.jsonl."""
    name = "metrics.jsonl" if os.path.exists(os.path.join(out, "metrics.jsonl")) else "losses.jsonl"
    with open(os.path.join(out, name)) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r["loss"] for r in recs if "loss" in r and "eval" not in r]


def assert_same_losses(two: list[float], one: list[float]) -> None:
    assert len(two) == len(one) == STEPS, (two, one)
    assert len(set(one)) == STEPS  # the steps differ: the comparison is not of a constant
    for a, b in zip(two, one):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), f"two hosts {two} vs one host {one}"


def one_host(cluster, job, out: str, port: int) -> list[float]:
    """The reference: the same job on host a alone, two ranks, plain `deepspeed --num_gpus 2` (no hostfile)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)] + job(out)
    if job is pretrain:
        cmd += ["--ds-config", "ds_configs/zero3_fp32.json"]
    p = cluster.run("a", cmd, env=dict(os.environ), cwd=REPO, timeout=JOB_TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return read_losses(out)


# ------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with TwoHostCluster(str(tmp_path_factory.mktemp("two_hosts"))) as c:
        yield c


@pytest.fixture(scope="module")
def one_host_pretrain(cluster, tmp_path_factory):
    return one_host(cluster, pretrain, str(tmp_path_factory.mktemp("one_host_pretrain")), 29731)


@pytest.fixture(scope="module")
def one_host_tiny(cluster, tmp_path_factory):
    return one_host(cluster, tiny, str(tmp_path_factory.mktemp("one_host_tiny")), 29732)


def doctor(cluster, hostfile, *args, env=None):
    cmd = [sys.executable, "launch/doctor.py", "--hostfile", hostfile, *args]
    p = cluster.run("a", cmd, env=env or cluster.ssh_env(), cwd=REPO, timeout=90)
    print(p.stdout, p.stderr)
    return p


def leftover_jobs(cluster) -> list[str]:
    """Processes other than the sshds still running in the namespaces."""
    left = []
    for ns in cluster.ns.values():
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                comm = open(f"/proc/{pid}/comm").read().strip()
            except OSError:
                continue
            if comm != "sshd":
                left.append(f"{pid}:{comm}")
    return left


# ------------------------------------------------------------------------------------------------------- doctor

def test_doctor_passes_on_two_good_hosts(cluster):
    p = doctor(cluster, cluster.hostfile(), "--master-port", "29701", "--data", os.path.join(REPO, "setup.py"))
    assert p.returncode == 0
    assert "doctor: OK" in p.stdout
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith(("ofa-node-a ", "ofa-node-b "))]
    assert [r[0] for r in rows] == [HOST_A, HOST_B]
    for r in rows:  # host slots reach python torch deepspeed ofa_ds (commit) gpus free master iface data
        assert r[2] == "ok" and r[8] == "cpu-only" and r[10] == "ok" and r[11] == "ofa0" and r[12] == "ok", r
    assert "GPU checks skipped" in p.stdout


def test_doctor_rejects_malformed_hostfile(cluster):
    hf = cluster.hostfile(["# broken on purpose", f"{HOST_A} slots=1", HOST_B, f"{HOST_A} slots=2",
                           f"{HOST_B} slots=two"], name="hostfile_bad")
    p = doctor(cluster, hf, "--master-port", "29702")
    assert p.returncode == 1
    assert f"line 3: '{HOST_B}' has no slots" in p.stdout
    assert f"line 4: {HOST_A} is listed twice (first on line 2)" in p.stdout
    assert "line 5: 'slots=two' is not a whole number of slots" in p.stdout
    assert "doctor: FAILED" in p.stdout


def test_doctor_reports_unreachable_host(cluster):
    hf = cluster.hostfile([f"{HOST_A} slots=1", f"{HOST_B} slots=1", "10.123.0.3 slots=1"], name="hostfile_3")
    p = doctor(cluster, hf, "--master-port", "29703", "--timeout", "2")
    assert p.returncode == 1
    assert "10.123.0.3: unreachable over ssh" in p.stdout
    assert sum("unreachable" in line for line in p.stdout.splitlines()) == 1  # the two good hosts are fine


def test_doctor_reports_version_mismatch(cluster, tmp_path):
    """Host b, reached as `ofa-node-b-skewed`, sees another deepspeed version (its dist-info is replaced by a bind
    mount for that sshd's sessions only): what a node with a different venv looks like."""
    real = str(importlib.metadata.distribution("deepspeed")._path)
    fake = str(tmp_path / os.path.basename(real))
    shutil.copytree(real, fake)
    meta = os.path.join(fake, "METADATA")
    text = open(meta).read()
    have = importlib.metadata.version("deepspeed")
    open(meta, "w").write(text.replace(f"\nVersion: {have}\n", "\nVersion: 0.9.0\n", 1))
    cluster.add_sshd("b", 2222, alias="ofa-node-b-skewed", bind_mounts=[(fake, real)])
    hf = cluster.hostfile([f"{HOST_A} slots=1", "ofa-node-b-skewed slots=1"], name="hostfile_skewed")
    p = doctor(cluster, hf, "--master-port", "29704")
    assert p.returncode == 1
    assert f"deepspeed differs between nodes: {have} on {HOST_A}; 0.9.0 on ofa-node-b-skewed" in p.stdout


def test_doctor_reports_busy_master_port_and_wrong_interface(cluster, tmp_path):
    holder = cluster.popen("a", [sys.executable, "-c", "import socket, time; s = socket.socket(); "
                                 "s.bind(('', 29705)); s.listen(); print('ready', flush=True); time.sleep(60)"])
    try:
        env_file = tmp_path / "ds_env"
        env_file.write_text("NCCL_SOCKET_IFNAME=ib0\n")
        p = doctor(cluster, cluster.hostfile(), "--master-port", "29705", "--env-file", str(env_file))
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 1
    assert f"master port 29705 cannot be opened on {HOST_A} (Address already in use)" in p.stdout
    for h in (HOST_A, HOST_B):
        assert f"{h}: NCCL_SOCKET_IFNAME=ib0 matches no interface there (it has lo, ofa0" in p.stdout


# ------------------------------------------------------------------------------------------------------- training

def test_pretrain_zero3_pdsh_two_hosts_matches_one_host(cluster, one_host_pretrain, tmp_path):
    """`launch/multinode.sh --zero 3` (config picked for CPU, doctor first, then DeepSpeed's runner through pdsh)
    started on host a for both hosts: launch/pretrain.py, one rank per host."""
    out = str(tmp_path / "run")
    cmd = ["bash", "launch/multinode.sh", "--hostfile", cluster.hostfile(), "--master-port", "29711",
           "--env-file", str(tmp_path / "ds_env"), "--zero", "3", "--"] + pretrain(out)
    p = cluster.run("a", cmd, env=cluster.ssh_env(), cwd=REPO, timeout=JOB_TIMEOUT)
    print(p.stdout[-4000:], p.stderr[-4000:])
    assert p.returncode == 0
    assert "doctor: OK" in p.stdout
    assert "interface ofa0" in p.stderr
    env_lines = (tmp_path / "ds_env").read_text().splitlines()
    assert "NCCL_SOCKET_IFNAME=ofa0" in env_lines and "GLOO_SOCKET_IFNAME=ofa0" in env_lines
    assert f"{HOST_B}:" in p.stdout  # pdsh prefixes the output of host b's launcher
    ds_cfg = json.load(open(os.path.join(out, "ds_config.json")))
    assert ds_cfg["zero_optimization"]["stage"] == 3
    two = read_losses(out)
    print("pretrain, two hosts (pdsh):", two, "\npretrain, one host:", one_host_pretrain)
    assert_same_losses(two, one_host_pretrain)
    report = json.loads([line for line in p.stdout.splitlines() if line.startswith(f"{HOST_A}: {{")][-1]
                        .split(": ", 1)[1])
    assert report["world_size"] == 2 and report["zero_stage"] == 3
    assert leftover_jobs(cluster) == []


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI (mpirun) not installed: .ci/install_multinode.sh")
def test_zero3_openmpi_two_hosts_matches_one_host(cluster, one_host_tiny, tmp_path):
    """`--launcher openmpi`: mpirun starts rank 1 on host b through ssh (its orted), ranks rendezvous at the master
    from the env file."""
    out = str(tmp_path / "run")
    cmd = ["bash", "launch/multinode.sh", "--launcher", "openmpi", "--hostfile", cluster.hostfile(),
           "--master-port", "29713", "--env-file", str(tmp_path / "ds_env"), "--no-config", "--"] + tiny(out)
    p = cluster.run("a", cmd, env=cluster.ssh_env(), cwd=REPO, timeout=JOB_TIMEOUT)
    print(p.stdout[-4000:], p.stderr[-4000:])
    assert p.returncode == 0
    assert "mpirun -n 2" in p.stdout + p.stderr
    two = read_losses(out)
    print("two hosts (openmpi):", two, "\none host:", one_host_tiny)
    assert_same_losses(two, one_host_tiny)
    world = json.load(open(os.path.join(out, "world.json")))
    assert world["ranks"][1]["host"] == HOST_B  # started on host b by an orted that came in over ssh
    assert leftover_jobs(cluster) == []


def test_zero3_per_node_launch_matches_one_host(cluster, one_host_tiny, tmp_path):
    """`--launcher no_ssh`: one launcher per host with its node rank (what srun does under SLURM)."""
    out = str(tmp_path / "run")
    logs = [str(tmp_path / f"node{r}.log") for r in (0, 1)]
    procs = []
    try:
        for rank, node in enumerate("ab"):
            cmd = ["bash", "launch/multinode.sh", "--launcher", "no_ssh", "--node-rank", str(rank),
                   "--hostfile", cluster.hostfile(), "--master-port", "29712",
                   "--env-file", str(tmp_path / f"ds_env{rank}"), "--no-config", "--"] + tiny(out)
            procs.append(cluster.popen(node, cmd, env=dict(os.environ), cwd=REPO, log=logs[rank]))
        codes = [p.wait(timeout=JOB_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        cluster.kill_jobs()
    for log in logs:
        print(open(log).read()[-3000:])
    assert codes == [0, 0]
    two = read_losses(out)
    print("two hosts (no_ssh):", two, "\none host:", one_host_tiny)
    assert_same_losses(two, one_host_tiny)
    world = json.load(open(os.path.join(out, "world.json")))
    assert [r["master"] for r in world["ranks"]] == [f"{HOST_A}:29712"] * 2
    assert [r["ifname"] for r in world["ranks"]] == ["ofa0"] * 2



@pytest.mark.slow
def test_pretrain_resumes_after_a_node_failure(cluster, one_host_pretrain, tmp_path):
    """docs/multinode.md's recovery procedure, for real: checkpoint every step, host b's processes die after the
    step-2 checkpoint (a node failure), the job must stop rather than hang, and the same command with --resume
    finishes with the losses of the uninterrupted one-host run."""
    out = str(tmp_path / "run")
    cmd = ["bash", "launch/multinode.sh", "--hostfile", cluster.hostfile(), "--master-port", "29714",
           "--env-file", str(tmp_path / "ds_env"), "--zero", "3", "--"] + pretrain(out) + [
           "--set", "train.save_every=1", "--set", "train.keep_checkpoints=3"]
    first = cluster.popen("a", cmd, env=cluster.ssh_env(), cwd=REPO, log=str(tmp_path / "first.log"))
    try:
        marker = os.path.join(out, "checkpoints", "step00000002", "COMPLETE")
        deadline = time.monotonic() + JOB_TIMEOUT
        while not os.path.exists(marker) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.path.exists(marker), open(tmp_path / "first.log").read()[-4000:]
        cluster.kill_jobs("b")  # host b fails
        rc = first.wait(timeout=120)  # the survivors must notice and stop, not hang
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
        cluster.kill_jobs()
    print(open(tmp_path / "first.log").read()[-3000:])
    assert rc != 0
    assert not os.path.exists(os.path.join(out, "checkpoints", "step00000003", "COMPLETE"))

    p = cluster.run("a", cmd + ["--resume"], env=cluster.ssh_env(), cwd=REPO, timeout=JOB_TIMEOUT)
    print(p.stdout[-4000:], p.stderr[-4000:])
    assert p.returncode == 0
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and "eval" not in r}
    resumed = [last[s] for s in sorted(last)]
    print("pretrain, two hosts, failure after step 2 + --resume:", resumed, "\none host:", one_host_pretrain)
    assert_same_losses(resumed, one_host_pretrain)
    assert leftover_jobs(cluster) == []
