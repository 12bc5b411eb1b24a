"""mgs_torch.capture_step on a machine without CUDA: every argument is checked first, with a message
that says what to pass; the capture itself is tested on a GPU in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from mgs_torch import capture_step


def test_capture_step_checks_its_arguments_before_touching_cuda():
    with pytest.raises(TypeError, match="callable"):
        capture_step(None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup must be an int >= 1"):
            capture_step(lambda: None, warmup=bad)
    with pytest.raises(ValueError, match=r"torch.Generator\(device='cuda'\)"):
        capture_step(lambda: None, generators=[torch.Generator()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the capture runs (tests/test_cuda.py)")
def test_capture_step_without_cuda_says_so_and_runs_nothing():
    calls = []
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        capture_step(lambda: calls.append(1))
    assert calls == []
