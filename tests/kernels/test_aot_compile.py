"""The kernels compile for NVIDIA GPUs and fit their shared memory, checked on a CPU-only machine: Triton's
compiler (down to cubin, with the ptxas in the triton wheel) runs without a GPU. See aot_compile_check.py."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed                      # each test runs aot_compile_check.py as a subprocess
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_compile_check.py")


def _run(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout


def test_kernels_compile_for_sm90_bf16():
    _run("--arch", "90", "--dtypes", "bf16")


@pytest.mark.slow
def test_kernels_compile_for_sm80_sm90_all_dtypes_and_autotune_configs():
    _run("--arch", "90", "80", "--dtypes", "bf16", "fp16", "fp32", "--all-configs")
