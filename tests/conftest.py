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
def assets_dir() -> str:
    return ASSETS
