"""The CPU allocator settings the trainer applies: after `cpu_malloc.tune()` a freed 64 MB tensor's pages are reused
by the next one (almost no new page faults); without it every allocation faults in fresh pages."""
import os
import subprocess
import sys

import pytest

CODE = """
import resource, sys, torch
from ofa_ds.training import cpu_malloc
tuned = cpu_malloc.tune() if sys.argv[1] == "1" else False
def once():
    x = torch.ones(16 << 20)          # 64 MB, every page written
    del x
for _ in range(12):                   # glibc settles its free lists after a few rounds
    once()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    once()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(tune: bool) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CODE, "1" if tune else "0"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_reuses_freed_pages():
    tuned, faults = _faults(True)
    assert tuned == "True"
    assert faults < 2000                       # 5 x 64 MB = 81,920 pages if each were fresh
    untuned, faults_before = _faults(False)
    assert untuned == "False" and faults_before > 40000
