"""Faults a user can cause or meet end with ONE line `error: <cause> ... <path>`, a non-zero exit status, no
traceback, and the last complete checkpoint as it was: a full disk while saving, a missing or unreadable file (data,
--init checkpoint, ds_config), a run folder that is not writable, a --resume into a checkpoint of another model size,
a master port in use, more bad data rows than data.bad_row_threshold (the run stops before it saves again, and the
log counts the skipped rows by reason), and launch/evaluate.py with a missing file.

Runs use the `debug` recipe without held-out sets (seconds each). Unreadable files and folders: the tests run as
root, which reads anything, so the training process is started without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
(dropped from the capability bounding set before exec); the full disk is a small tmpfs mounted for the test. Both
are skipped, with the reason, where the machine does not allow them."""
import ctypes
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from ofa_ds.training.checkpoints import find_resume_tag, tag_for
from ofa_ds.training.faults import RunFault, describe, write_failure

from .conftest import ROOT, launch

BASE = ["--recipe", "debug"]
QUIET = ["eval.data={}", "train.export_final=false"]       # no held-out sets, no final/ folder


def _drop_dac_caps() -> None:                              # preexec_fn: runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):                                     # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:              # PR_CAPBSET_DROP
            os._exit(97)


def _can_drop_caps() -> bool:
    if os.geteuid() != 0:
        return True                                        # file modes already apply to this user
    p = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_caps)
    return p.returncode == 0


def run(args: list[str], synthetic: str, sets=(), script="launch/pretrain.py", env=None, no_dac=False,
        cmd=None) -> subprocess.CompletedProcess:
    """Start `script` (plain python, one rank) and return the finished process, whatever its status."""
    cmd = cmd or [sys.executable, script]
    cmd = cmd + list(args)
    for s in sets:
        cmd += ["--set", s]
    full_env = dict(os.environ, OFA_DS_SYNTHETIC=synthetic, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600,
                          preexec_fn=_drop_dac_caps if no_dac and os.geteuid() == 0 else None)


def one_error(p: subprocess.CompletedProcess, *words: str, status: int | None = None) -> str:
    """The process failed with exactly one `error: ` line containing `words`, and no traceback."""
    out = p.stdout + p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert p.returncode != 0, out[-3000:]
    if status is not None:
        assert p.returncode == status, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def digest(folder: str) -> dict[str, str]:
    """sha1 of every file under `folder` (relative path -> digest)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, synthetic_root) -> str:
    """A finished 1-step debug run with its step-1 checkpoint and final/ export."""
    out = str(tmp_path_factory.mktemp("one_step"))
    launch(BASE + ["--steps", "1", "--out", out], synthetic_root, small=False, sets=["eval.data={}"])
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """A 400 MiB tmpfs at tmp_path/mnt (resized by the test with `mount -o remount,size=`), unmounted at the end."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); needs root in a machine or "
                    f"container that allows mount")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _resize(mnt: str, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", mnt], check=True)


# ---- full disk ------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_full_disk_while_saving_keeps_the_last_checkpoint(tmpfs, synthetic_root):
    """The second checkpoint does not fit: one line names the disk and both checkpoints, the first one is untouched
    and the run resumes from it once there is space again."""
    out = os.path.join(tmpfs, "run")
    ck = os.path.join(out, "checkpoints")
    p = run(BASE + ["--steps", "1", "--out", out], synthetic_root, sets=QUIET)
    assert p.returncode == 0, p.stderr[-3000:]
    first = digest(os.path.join(ck, tag_for(1)))
    st = os.statvfs(tmpfs)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    ckpt_bytes = sum(os.path.getsize(os.path.join(ck, tag_for(1), f)) for f in first)
    _resize(tmpfs, used + ckpt_bytes // 2)                 # room for half of the next checkpoint
    p = run(BASE + ["--steps", "2", "--out", out, "--resume"], synthetic_root, sets=QUIET)
    one_error(p, "no space left on device", os.path.join(ck, tag_for(2)), os.path.join(ck, tag_for(1)), status=1)
    assert "iostream" not in p.stderr and "unexpected pos" not in p.stderr
    assert find_resume_tag(ck) == tag_for(1)
    assert digest(os.path.join(ck, tag_for(1))) == first
    _resize(tmpfs, 1 << 30)
    p = run(BASE + ["--steps", "2", "--out", out, "--resume"], synthetic_root, sets=QUIET)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {os.path.join(ck, tag_for(1))} at step 1" in p.stdout
    assert find_resume_tag(ck) == tag_for(2)


# ---- missing / unreadable files -------------------------------------------------------------------------------------
FILE_CASES = {                  # what -> (option to pass with the path, words of the error line besides the path)
    "data": (["--set", "data.data={path}"], "data file"),
    "init": (["--init", "{path}"], "--init checkpoint"),
    "ds_config": (["--ds-config", "{path}"], "DeepSpeed config"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("what", sorted(FILE_CASES))
def test_missing_file(what, tmp_path, synthetic_root):
    path = str(tmp_path / f"no_such_{what}")
    opt, words = FILE_CASES[what]
    p = run(BASE + ["--steps", "1", "--out", str(tmp_path / "run")] + [o.format(path=path) for o in opt],
            synthetic_root, sets=QUIET)
    line = one_error(p, path, status=2)
    assert words.split()[-1] in line and ("not found" in line or "does not exist" in line)


@pytest.mark.distributed
@pytest.mark.parametrize("what", sorted(FILE_CASES))
def test_unreadable_file(what, tmp_path, synthetic_root, one_step_run):
    if not _can_drop_caps():
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here: root would read a mode-000 file anyway")
    src = {"data": os.path.join(synthetic_root, "pretrain", "vision_language_examples.tsv"),
           "init": os.path.join(one_step_run, "final", "model.safetensors"),
           "ds_config": os.path.join(ROOT, "ds_configs", "cpu_fp32.json")}[what]
    if what == "init":                                     # an exported folder whose weights cannot be read
        path = str(tmp_path / "final")
        shutil.copytree(os.path.dirname(src), path)
        os.chmod(path, 0o000)
    else:
        path = str(tmp_path / os.path.basename(src))
        shutil.copy(src, path)
        os.chmod(path, 0o000)
    opt, words = FILE_CASES[what]
    out = tmp_path / "run"
    out.mkdir()
    try:
        p = run(BASE + ["--steps", "1", "--out", str(out)] + [o.format(path=path) for o in opt], synthetic_root,
                sets=QUIET, no_dac=True)
    finally:
        os.chmod(path, 0o755)
    one_error(p, words, path, "permission denied", status=2)


@pytest.mark.distributed
@pytest.mark.parametrize("what", ["init", "ds_config"])
def test_file_that_is_not_what_it_should_be(what, tmp_path, synthetic_root):
    """A --init file that is no checkpoint, a ds_config that is no JSON."""
    path = tmp_path / ("weights.pt" if what == "init" else "ds.json")
    path.write_text("{not a checkpoint, not JSON\n")
    opt, _ = FILE_CASES[what]
    p = run(BASE + ["--steps", "1", "--out", str(tmp_path / "run")] + [o.format(path=path) for o in opt],
            synthetic_root, sets=QUIET)
    one_error(p, str(path), status=2)


@pytest.mark.distributed
def test_run_folder_not_writable(tmp_path, synthetic_root):
    if not _can_drop_caps():
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here: root would write into a mode-555 folder anyway")
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    out = str(parent / "run")
    try:
        p = run(BASE + ["--steps", "1", "--out", out], synthetic_root, sets=QUIET, no_dac=True)
    finally:
        os.chmod(parent, 0o755)
    one_error(p, "run folder", out, "not writable", "permission denied", status=2)
    assert not os.path.exists(out)


# ---- checkpoints of another model size ------------------------------------------------------------------------------
@pytest.mark.distributed
def test_resume_into_a_checkpoint_of_another_size(tmp_path, synthetic_root, one_step_run):
    out = str(tmp_path / "run")
    shutil.copytree(one_step_run, out)
    before = digest(out)
    p = run(BASE + ["--steps", "2", "--out", out, "--resume"], synthetic_root, sets=QUIET + ["model.ffn_dim=128"])
    one_error(p, "--resume", os.path.join(out, "checkpoints", tag_for(1)), "model.ffn_dim 256 in the checkpoint, "
              "128 in this run", status=2)
    assert digest(out) == before                           # config.json, checkpoints: nothing rewritten


@pytest.mark.distributed
def test_resume_from_a_corrupt_checkpoint(tmp_path, synthetic_root, one_step_run):
    out = str(tmp_path / "run")
    shutil.copytree(one_step_run, out)
    tag_dir = os.path.join(out, "checkpoints", tag_for(1))
    with open(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(1000)                                   # complete on paper, damaged since
    p = run(BASE + ["--steps", "2", "--out", out, "--resume"], synthetic_root, sets=QUIET)
    one_error(p, "--resume: cannot read the checkpoint", tag_dir, "delete that folder", status=2)


@pytest.mark.distributed
def test_init_from_a_checkpoint_of_another_size_takes_its_architecture(tmp_path, synthetic_root, one_step_run):
    out = str(tmp_path / "run")
    p = launch(BASE + ["--steps", "1", "--out", out, "--init", one_step_run], synthetic_root, small=False,
               sets=QUIET + ["model.ffn_dim=128", "model.d_model=128"])
    assert p.returncode == 0
    with open(os.path.join(one_step_run, "config.json")) as f:
        theirs = json.load(f)["model"]
    with open(os.path.join(out, "config.json")) as f:
        mine = json.load(f)["model"]
    assert mine["d_model"] == theirs["d_model"] == 64 and mine["ffn_dim"] == theirs["ffn_dim"] == 256


# ---- master port --------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_master_port_in_use(tmp_path, synthetic_root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = run(BASE + ["--steps", "1", "--out", str(tmp_path / "run")], synthetic_root, sets=QUIET,
                cmd=["deepspeed", "--num_gpus", "1", "--master_port", str(port), "launch/pretrain.py"])
    line = one_error(p, f"master port {port}", "already in use", "--master_port", status=1)
    assert line.count("error:") == 1


# ---- bad data rows ------------------------------------------------------------------------------------------------
def _bad_rows_file(synthetic: str, path: str, n: int = 160, bad_from: int = 120) -> None:
    """`n` vision-language rows (the synthetic ones repeated): row 5 and every row from `bad_from` on lack their
    last column (category "columns")."""
    with open(os.path.join(synthetic, "pretrain", "vision_language_examples.tsv")) as f:
        rows = [x.rstrip("\n") for x in f if x.strip()]
    with open(path, "w") as f:
        for i in range(n):
            row = rows[i % len(rows)]
            if i == 5 or i >= bad_from:
                row = row.rsplit("\t", 1)[0]
            f.write(row + "\n")


@pytest.mark.distributed
def test_too_many_bad_rows_stop_before_the_next_save(tmp_path, synthetic_root):
    """One bad row early is skipped and logged by reason; past data.bad_row_threshold (1%) the run stops with one
    line naming the file before it writes another checkpoint (DataLoader workers on, as in real runs)."""
    data = str(tmp_path / "vl.tsv")
    _bad_rows_file(synthetic_root, data)
    out = str(tmp_path / "run")
    p = run(BASE + ["--steps", "20", "--out", out], synthetic_root,
            sets=QUIET + [f"data.data={data}", "data.batch_size=16", "data.shuffle=false", "data.num_workers=1",
                          "train.save_every=4"])
    line = one_error(p, "too many bad rows", data, "bad_row_threshold", "columns", status=1)
    assert "Caught" not in line
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in recs if "loss" in r]
    assert steps and all(r["bad_rows"] == 1 and r["bad_rows_by_reason"] == {"columns": 1} for r in steps)
    assert "bad_rows 1 (columns 1)" in p.stdout
    last = steps[-1]["step"]
    assert last < 20
    ck = os.path.join(out, "checkpoints")
    assert find_resume_tag(ck) == tag_for(last // 4 * 4)                 # the last save before the data went bad
    assert sorted(os.listdir(ck)) == sorted(["latest"] + [tag_for(s) for s in range(4, last + 1, 4)][-2:])


@pytest.mark.distributed
def test_bad_rows_by_reason_in_tensorboard(tmp_path, synthetic_root):
    data = str(tmp_path / "vl.tsv")
    _bad_rows_file(synthetic_root, data, n=40, bad_from=40)
    out = str(tmp_path / "run")
    launch(BASE + ["--steps", "2", "--out", out], synthetic_root, small=False,
           sets=QUIET + [f"data.data={data}", "data.batch_size=8", "data.shuffle=false", "train.save_final=false"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("bad_rows/columns")] == [1.0, 1.0]


# ---- launch/evaluate.py ---------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("missing", ["data", "checkpoint"])
def test_evaluate_with_a_missing_file(missing, tmp_path, synthetic_root, one_step_run):
    paths = {"data": os.path.join(synthetic_root, "caption", "caption_val.tsv"),
             "checkpoint": os.path.join(one_step_run, "final")}
    paths[missing] = str(tmp_path / f"no_such_{missing}")
    p = run(["--task", "caption", "--checkpoint", paths["checkpoint"], "--data", paths["data"], "--out",
             str(tmp_path / "eval")], synthetic_root, script="launch/evaluate.py")
    one_error(p, paths[missing], "not found", status=2)


# ---- the classification itself (in-process) ------------------------------------------------------------------------
def test_a_worker_raised_bad_rows_error_keeps_its_message():
    """TooManyBadRows raised inside a DataLoader worker comes back as a RuntimeError carrying the worker's
    traceback; the line is the original message."""
    from collections import Counter

    from torch.utils.data import DataLoader, IterableDataset

    from ofa_ds.data.tsv import TooManyBadRows

    class Failing(IterableDataset):
        def __iter__(self):
            raise TooManyBadRows("too many bad rows: 3 of 100 (3.00%); last one a.tsv:7: x", "a.tsv:7", 0.03,
                                 Counter(columns=3))
            yield

    with pytest.raises(RuntimeError) as info:
        list(DataLoader(Failing(), batch_size=None, num_workers=1))
    fault = describe(info.value)
    assert fault is not None and fault.line() == "too many bad rows: 3 of 100 (3.00%); last one a.tsv:7: x"
    assert fault.status == 1


def test_torch_writer_errors_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save's errors carry no errno: a nearly full file system makes them a "no space left" line; with room
    left they stay a write error naming the file; anything else is not a fault (its traceback shows)."""
    import ofa_ds.training.faults as faults
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 66624640 vs 66624528")
    path = str(tmp_path / "step00000002")
    monkeypatch.setattr(faults, "free_bytes", lambda p: 4096)
    fault = write_failure(err, path, f"saving checkpoint {path}", "the last one is intact")
    assert isinstance(fault, RunFault)
    assert fault.line() == (f"no space left on device while saving checkpoint {path} (4.0 KiB free); "
                            f"the last one is intact")
    monkeypatch.setattr(faults, "free_bytes", lambda p: 1 << 40)
    fault = write_failure(RuntimeError("basic_ios::clear: iostream error"), path, "saving")
    assert "could not write" in fault.line() and path in fault.line() and "iostream error" in fault.line()
    bug = TypeError("unsupported operand")
    assert write_failure(bug, path, "saving") is bug
    assert describe(bug) is None
