"""Evaluator tests run many tiny ops: each gets one intra-op thread (tests/conftest.py's `one_thread`)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
