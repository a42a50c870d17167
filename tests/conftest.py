"""Shared test setup. Triton kernels run on CPU through the interpreter, which must be chosen before triton is
imported anywhere, so it is set here when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread (restored afterwards): tests of many tiny ops otherwise spin on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def assets_dir() -> str:
    return ASSETS


_SESSION_START = __import__("time").time()


def pytest_sessionfinish(session, exitstatus):
    """DeepSpeed's CPU all-reduce leaves a shared-memory buffer (/dev/shm, ~66 MB) per rank and job; remove the
    ones this test session created so repeated runs do not fill the machine's RAM."""
    import glob

    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.path.getmtime(path) >= _SESSION_START - 1:
                os.remove(path)
        except OSError:
            pass
