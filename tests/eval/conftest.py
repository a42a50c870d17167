"""Evaluator tests run many tiny ops: one intra-op thread (restored afterwards) avoids spinning on shared cores."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
