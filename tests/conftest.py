"""Shared fixtures (the small models and references live in helpers.py and reference.py).

The one place that sets the test suite's threads: every test runs with one torch thread, and
subprocesses (the DDP script) inherit OMP_NUM_THREADS=1. The models here are tiny, so extra threads
only contend for the cores; with the default thread count on a busy 2-core machine the suite took
about 10 minutes instead of under one (issue 11).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tiny training runs are faster so), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_self_check():
    """Without mgs_torch's self-check on first use: for tests that make mgs_torch wrong on purpose (a deliberately
    wrong layer rule) to see another mechanism at work."""
    from mgs_torch.self_check import self_check_disabled

    with self_check_disabled():
        yield
