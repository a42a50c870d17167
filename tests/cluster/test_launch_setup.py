"""The launcher helpers without any network: hostfile parsing against DeepSpeed's own parser, precision and config
picks, the env file against DeepSpeed's reader, and `launch/multinode.sh --dry-run` for each launcher.

These run everywhere (no root, no ssh); the real launches are in test_two_hosts.py.
"""
import json
import os
import shlex
import subprocess

import pytest
from deepspeed.launcher.runner import _parse_hostfile

from ofa_ds.cluster.launch_setup import (ds_env_lines, parse_hostfile, pick_ds_config, precision_for,
                                         read_ds_env, write_ds_env)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(tmp_path, text, name="hostfile"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_hostfile_agrees_with_deepspeed_on_good_files(tmp_path):
    text = "# cluster\nnode-1 slots=8\n\n  node-2 slots=4\nnode-3 slots=8   \n"
    hf = parse_hostfile(_write(tmp_path, text))
    assert hf.problems == []
    assert dict(_parse_hostfile(text.splitlines())) == hf.slots
    assert hf.hosts == ["node-1", "node-2", "node-3"] and hf.world_size == 20


@pytest.mark.parametrize("text, message", [
    ("a slots=2\nb\n", "line 2: 'b' has no slots"),
    ("a slots=2\na slots=2\n", "line 2: a is listed twice (first on line 1)"),
    ("a slots=x\n", "line 1: 'slots=x' is not a whole number of slots"),
    ("a slots=0\n", "line 1: a has slots=0"),
    ("a gpus=2\n", "line 1: 'a gpus=2' is not 'host slots=N'"),
    ("# only a comment\n\n", "no hosts"),
])
def test_hostfile_problems_name_the_line(tmp_path, text, message):
    hf = parse_hostfile(_write(tmp_path, text))
    assert any(message in p for p in hf.problems), hf.problems
    if "no hosts" not in message and "slots=0" not in message:
        with pytest.raises(ValueError):  # DeepSpeed refuses these too (one at a time, without a line number)
            _parse_hostfile(text.splitlines())


def test_hostfile_reports_every_problem_at_once(tmp_path):
    hf = parse_hostfile(_write(tmp_path, "a slots=1\nb\na slots=1\nc slots=z\nd slots=2 # trailing comment\n"))
    assert len(hf.problems) == 3 and hf.hosts == ["a", "d"]
    assert parse_hostfile(str(tmp_path / "missing")).problems[0].endswith("cannot read it (No such file or directory)")


def test_precision_pick():
    assert precision_for([]) == "fp32"
    assert precision_for([(8, 0), (8, 0)]) == "bf16"  # A100
    assert precision_for([(9, 0)]) == "bf16"  # H100 / H200
    assert precision_for([(7, 0)]) == "fp16"  # V100: no bf16
    assert precision_for([(8, 0), (7, 0)]) == "fp16"  # a mixed node trains in what all GPUs support
    assert precision_for([None], ["Tesla V100-SXM2-32GB"]) == "fp16"  # driver without compute_cap
    assert precision_for([None], ["NVIDIA A100-SXM4-80GB"]) == "bf16"


def test_pick_ds_config(tmp_path):
    for name in ("zero1_bf16.json", "zero3_bf16.json", "zero3_fp16.json", "zero3_offload_bf16.json",
                 "zero3_nvme_bf16.json", "zero3_cpu_fp32.json", "zero2-fp16.json"):
        (tmp_path / name).write_text("{}")
    d = str(tmp_path)
    assert os.path.basename(pick_ds_config(3, "bf16", d)) == "zero3_bf16.json"
    assert os.path.basename(pick_ds_config(3, "fp16", d)) == "zero3_fp16.json"
    assert os.path.basename(pick_ds_config(3, "bf16", d, offload="offload")) == "zero3_offload_bf16.json"
    assert os.path.basename(pick_ds_config(3, "bf16", d, offload="nvme")) == "zero3_nvme_bf16.json"
    assert os.path.basename(pick_ds_config(2, "fp16", d)) == "zero2-fp16.json"
    assert os.path.basename(pick_ds_config(3, "fp32", d)) == "zero3_cpu_fp32.json"
    with pytest.raises(FileNotFoundError, match="no ZeRO-2 bf16 config"):
        pick_ds_config(2, "bf16", d)


def test_pick_from_the_shipped_configs():
    """Every stage x precision the launcher can ask for has a file in ds_configs/ with that precision enabled."""
    for zero in (1, 2, 3):
        for prec in ("bf16", "fp16", "fp32"):
            path = pick_ds_config(zero, prec, os.path.join(REPO, "ds_configs"))
            cfg = json.load(open(path))
            assert cfg["zero_optimization"]["stage"] == zero, path
            for p in ("bf16", "fp16"):
                assert cfg.get(p, {}).get("enabled") in ((True,) if p == prec else (False, "auto", None)), path
    for kind in ("offload", "nvme"):
        path = pick_ds_config(3, "bf16", os.path.join(REPO, "ds_configs"), offload=kind)
        assert kind in os.path.basename(path)


def test_env_file_is_what_deepspeed_reads(tmp_path):
    env = {"PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/other", "NCCL_DEBUG": "INFO", "CUDA_VISIBLE_DEVICES": "0",
           "HOME": "/root", "OFA_DATA": "/data/ofa"}
    values = ds_env_lines("ib0", {"NCCL_IB_DISABLE": "1"}, environ=env, repo="/repo")
    assert values["PYTHONPATH"] == "/repo:/other" and values["PATH"] == "/venv/bin:/usr/bin"
    assert values["NCCL_SOCKET_IFNAME"] == values["GLOO_SOCKET_IFNAME"] == "ib0"
    assert values["NCCL_DEBUG"] == "INFO" and values["OFA_DATA"] == "/data/ofa" and values["NCCL_IB_DISABLE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in values and "HOME" not in values  # per-node values stay per node
    path = write_ds_env(str(tmp_path / ".deepspeed_env"), values)
    for line in open(path):  # DeepSpeed's runner: `key, val = var.split('=', maxsplit=1)` on every line
        key, val = line.split("=", maxsplit=1)
        assert values[key] == val.strip()
    assert read_ds_env(path) == values
    with pytest.raises(ValueError):
        write_ds_env(str(tmp_path / "bad"), {"A": "two\nlines"})


def _dry_run(tmp_path, *args, env=None):
    hostfile = _write(tmp_path, "# test\nnode-a slots=2\nnode-b slots=2\n")
    cmd = ["bash", os.path.join(REPO, "launch/multinode.sh"), "--hostfile", hostfile, "--dry-run",
           "--env-file", str(tmp_path / "env"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.distributed
def test_multinode_dry_run_pdsh(tmp_path):
    p = _dry_run(tmp_path, "--ifname", "ib0", "--no-ib", "--ds-config", "ds_configs/x.json", "--",
                 "launch/pretrain.py", "--steps", "5")
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.split("--- command\n")[1]
    assert "-m deepspeed.launcher.runner --hostfile" in cmd and "--launcher pdsh" in cmd
    assert "--master_addr node-a --master_port 29500" in cmd
    assert cmd.rstrip().endswith("launch/pretrain.py --steps 5 --ds-config ds_configs/x.json")
    env = read_ds_env(str(tmp_path / "env"))
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["NCCL_IB_DISABLE"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == REPO
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.distributed
def test_multinode_dry_run_openmpi_and_no_ssh(tmp_path):
    p = _dry_run(tmp_path, "--launcher", "openmpi", "--ifname", "eth1", "--master-port", "29600", "--no-config",
                 "--", "launch/pretrain.py")
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout.split("--- command\n")[1])
    assert argv[argv.index("--launcher_args") + 1].startswith("--mca btl_tcp_if_include eth1")
    assert argv[argv.index("--no_python") + 2] == "--as-mpi-rank"
    env = read_ds_env(str(tmp_path / "env"))
    assert env["MASTER_ADDR"] == "node-a" and env["MASTER_PORT"] == "29600"
    p = _dry_run(tmp_path, "--launcher", "no_ssh", "--node-rank", "1", "--ifname", "eth1", "--no-config", "--",
                 "launch/pretrain.py")
    assert p.returncode == 0, p.stderr
    assert "--no_ssh --node_rank 1" in p.stdout
    p = _dry_run(tmp_path, "--launcher", "no_ssh", "--no-config", "--", "launch/pretrain.py",
                 env={"SLURM_NODEID": "2"})
    assert p.returncode == 2 and "--node-rank 2 is outside 0..1" in p.stderr


@pytest.mark.distributed
def test_multinode_refuses_bad_input(tmp_path):
    p = _dry_run(tmp_path)
    assert p.returncode == 2 and "no script given" in p.stderr
    bad = _write(tmp_path, "node-a slots=2\nnode-a slots=2\n", name="bad")
    p = subprocess.run(["bash", "launch/multinode.sh", "--hostfile", bad, "--dry-run", "--no-config", "--", "x.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "node-a is listed twice" in p.stderr and "fix the hostfile" in p.stderr


@pytest.mark.distributed
def test_shell_scripts_parse():
    for script in ("launch/multinode.sh", "launch/slurm.sbatch", ".ci/install_multinode.sh"):
        p = subprocess.run(["bash", "-n", os.path.join(REPO, script)], capture_output=True, text=True)
        assert p.returncode == 0, f"{script}: {p.stderr}"
