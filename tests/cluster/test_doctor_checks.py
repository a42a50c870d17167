"""The doctor's judgements on node answers that this CPU machine cannot produce: GPUs (count, busy memory, bf16 on
V100), mixed CPU/GPU nodes, version skew, NCCL interface names. The answers are the probe's own JSON shape, built
from `nvidia-smi` output in its real CSV format; the two-host tests cover the answers of real (CPU) nodes.
"""
import json

import pytest

from ofa_ds.cluster.doctor import (Options, Report, _check_gpus, _check_launcher, _check_network,
                                   _check_versions, _ifname_ok)
from ofa_ds.cluster.launch_setup import Hostfile
from ofa_ds.cluster.probe import parse_nvidia_smi_csv

A100 = "0, NVIDIA A100-SXM4-80GB, 81920, 81050, 8.0\n1, NVIDIA A100-SXM4-80GB, 81920, 81050, 8.0\n"
V100 = "0, Tesla V100-SXM2-32GB, 32768, 32200, 7.0\n1, Tesla V100-SXM2-32GB, 32768, 32200, 7.0\n"
BUSY = "0, NVIDIA A100-SXM4-80GB, 81920, 81050, 8.0\n1, NVIDIA A100-SXM4-80GB, 81920, 20480, 8.0\n"
OLD_DRIVER = "0, Tesla V100-PCIE-16GB, 16384, 16000\n"


def node(smi_csv=None, ds="0.19.8", commit="abc", interfaces=("lo", "eth0", "ib0"), route="eth0"):
    return {"hostname": "n", "python": "3.11.7", "executable": "/venv/bin/python", "cwd": "/work", "torch": "2.13.0",
            "deepspeed": ds, "mpi4py": None, "ofa_ds": {"path": "/work/ofa_ds", "version": "0.1.0", "commit": commit},
            "gpus": None if smi_csv is None else parse_nvidia_smi_csv(smi_csv), "gpu_error": None,
            "interfaces": list(interfaces), "route_ifname": route, "connect": "ok", "data": {}}


def report(slots):
    return Report(Hostfile("hf", hosts=list(slots), slots=dict(slots)))


def test_nvidia_smi_csv_parsing():
    gpus = parse_nvidia_smi_csv(A100)
    assert gpus[1] == {"index": 1, "name": "NVIDIA A100-SXM4-80GB", "mem_total_mib": 81920, "mem_free_mib": 81050,
                       "capability": "8.0"}
    assert parse_nvidia_smi_csv(OLD_DRIVER)[0]["capability"] is None
    assert parse_nvidia_smi_csv("0, NVIDIA H100 80GB HBM3, 81559, 81000, [N/A]\n")[0]["capability"] is None


def test_good_gpu_nodes_pass():
    rep = report({"a": 2, "b": 2})
    _check_gpus(Options("hf"), rep, {"a": node(A100), "b": node(A100)})
    assert rep.problems == [] and rep.notes == []


def test_fewer_gpus_than_slots_and_busy_gpu():
    rep = report({"a": 4, "b": 2})
    _check_gpus(Options("hf"), rep, {"a": node(A100), "b": node(BUSY)})
    assert rep.problems == ["a: slots=4 but only 2 GPU(s); lower slots in the hostfile",
                            "b: GPU 1 (NVIDIA A100-SXM4-80GB) has only 20.0 of 80.0 GiB free: another process is "
                            "using it (nvidia-smi on b)"]


def test_bf16_config_on_v100_is_a_problem(tmp_path):
    cfg = tmp_path / "zero3_bf16.json"
    cfg.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    rep = report({"a": 2, "b": 1})
    _check_gpus(Options("hf", ds_config=str(cfg)), rep, {"a": node(A100), "b": node(OLD_DRIVER)})
    assert len(rep.problems) == 1
    assert "trains in bf16 but Tesla V100-PCIE-16GB on b has no bf16" in rep.problems[0]
    fp16 = tmp_path / "zero3_fp16.json"
    fp16.write_text(json.dumps({"fp16": {"enabled": "true"}}))
    rep = report({"a": 2, "b": 1})
    _check_gpus(Options("hf", ds_config=str(fp16)), rep, {"a": node(A100), "b": node(OLD_DRIVER)})
    assert rep.problems == [] and "mixed GPU generations" in rep.notes[0]


def test_cpu_and_gpu_nodes_mixed():
    rep = report({"a": 1, "b": 1})
    _check_gpus(Options("hf"), rep, {"a": node(None), "b": node(A100)})
    assert "GPU checks skipped on a" in rep.notes[0]
    assert rep.problems == ["some nodes have GPUs (b) and some none (a)"]


def test_version_and_commit_skew():
    rep = report({"a": 1, "b": 1, "c": 1})
    _check_versions(Options("hf"), rep, {"a": node(), "b": node(ds="0.18.0"), "c": node(commit="def")})
    assert any(p.startswith("deepspeed differs between nodes: 0.19.8 on a, c; 0.18.0 on b.") for p in rep.problems)
    assert any(p.startswith("ofa_ds git commit differs between nodes: abc on a, b; def on c.") for p in rep.problems)
    missing = node(ds=None)
    rep = report({"a": 1})
    _check_versions(Options("hf"), rep, {"a": missing})
    assert rep.problems == ["a: deepspeed is not installed for /venv/bin/python"]


def test_nccl_interface_names(tmp_path):
    assert _ifname_ok("eth", ["lo", "eth0"]) and _ifname_ok("ib0,eth0", ["lo", "eth0"])
    assert not _ifname_ok("=eth", ["lo", "eth0"]) and _ifname_ok("=eth0", ["eth0"])
    assert _ifname_ok("^docker,lo", ["lo"]) and not _ifname_ok("ib", ["lo", "eth0"])
    env = tmp_path / "env"
    env.write_text("NCCL_SOCKET_IFNAME=ib\n")
    rep = report({"a": 1, "b": 1})
    _check_network(Options("hf", env_file=str(env)), rep, {"a": node(), "b": node(interfaces=("lo", "eth0"))},
                   "a", True)
    assert rep.problems == ["b: NCCL_SOCKET_IFNAME=ib matches no interface there (it has lo, eth0; the master is "
                            "reached through eth0)"]


def test_launcher_tools_are_required_only_for_several_hosts(monkeypatch):
    """DeepSpeed's runner uses pdsh / mpirun only with more than one host: a missing pdsh is a problem for a two-host
    hostfile and not for a one-host one (which it starts locally)."""
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for launcher, word in (("pdsh", "pdsh"), ("openmpi", "OpenMPI")):
        two, one = report({"a": 2, "b": 2}), report({"a": 2})
        _check_launcher(Options("hf", launcher=launcher), two, ["a", "b"])
        _check_launcher(Options("hf", launcher=launcher), one, ["a"])
        assert len(two.problems) == 1 and word in two.problems[0]
        assert one.problems == []
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    ok = report({"a": 2, "b": 2})
    _check_launcher(Options("hf"), ok, ["a", "b"])
    assert ok.problems == []


@pytest.mark.distributed
def test_doctor_end_to_end_on_a_one_host_hostfile(tmp_path):
    """A one-host hostfile needs no ssh (DeepSpeed starts it locally): the doctor probes this machine for real."""
    import os
    import socket
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    hf = tmp_path / "hostfile"
    hf.write_text("# this machine\nlocalhost slots=2\n")
    with socket.socket() as s:  # a free port for the master check
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "launch/doctor.py", "--hostfile", str(hf), "--master-port", str(port),
           "--data", os.path.join(repo, "setup.py"), "--json", str(tmp_path / "doctor.json")]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "doctor: OK" in p.stdout and "via local" in p.stdout
    answers = json.load(open(tmp_path / "doctor.json"))["nodes"]["localhost"]
    import deepspeed
    import torch
    assert answers["deepspeed"] == deepspeed.__version__ and answers["torch"] == torch.__version__
    assert answers["connect"] == "ok" and answers["ofa_ds"]["path"] == os.path.join(repo, "ofa_ds")
    p = subprocess.run(cmd[:-2] + ["--data", str(tmp_path / "missing.tsv")], cwd=repo, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert f"localhost: data path {tmp_path / 'missing.tsv'} is not readable there (No such file or directory)" \
        in p.stdout


def test_master_name_on_loopback_is_a_problem_without_an_interface(tmp_path, monkeypatch):
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    a, b = node(), node()
    a["master_ip"], b["master_ip"] = "127.0.1.1", "10.0.0.1"
    rep = report({"a": 1, "b": 1})
    _check_network(Options("hf", env_file=str(tmp_path / "none")), rep, {"a": a, "b": b}, "a", True)
    assert len(rep.problems) == 1 and rep.problems[0].startswith("a resolves to a loopback address on a (")
    env = tmp_path / "env"
    env.write_text("GLOO_SOCKET_IFNAME=eth0\n")
    rep = report({"a": 1, "b": 1})
    _check_network(Options("hf", env_file=str(env)), rep, {"a": a, "b": b}, "a", True)
    assert rep.problems == []
