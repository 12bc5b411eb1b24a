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


@pytest.fixture(autouse=True)
def _layer_rules_are_never_rescued(request, monkeypatch):
    """A layer rule that disagrees with the autograd loop is rescued by the self-check on first use: mgs_torch
    switches that model to the reference engine and warns once per model class. Right for users, but in the
    suite a broken rule would then pass every test (the mutation pass found rule mutants surviving so). Here a
    switch fails the test, unless the test provokes one on purpose (marked ``self_check_switch``)."""
    from mgs_torch import self_check

    switched = []
    record = self_check._record

    def recording(model, report):
        if report.outcome == "switched to the reference engine":
            switched.append(str(report))
        record(model, report)

    monkeypatch.setattr(self_check, "_record", recording)
    yield
    if switched and request.node.get_closest_marker("self_check_switch") is None:
        pytest.fail("the self-check switched a model to the reference engine (a layer rule disagrees with the "
                    f"autograd loop):\n{switched[0]}")


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
