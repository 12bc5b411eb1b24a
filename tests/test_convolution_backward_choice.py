"""The automatic choice of the transposed-convolution backward (``use_transposed_convolution_backward(None)``).

On an H200 the replacement made the exact trace penalty step 14–31 % faster and the one-probe Hutchinson step 53 %
slower; on the CPU it was slower. So by default it is used inside the exact trace penalty of the structured engine
on CUDA only, and an explicit True/False wins. These tests check the wiring on the CPU by declaring the CPU a device
where it pays (``TRANSPOSED_CONVOLUTION_DEVICES``), and that the values stay those of the float64 per-sample autograd
loop; ``tests/test_cuda.py`` checks the real CUDA case where a GPU is lent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mgs_torch import mgs_penalty, mgs_trace
from mgs_torch import penalty as penalty_module
from mgs_torch.engines import jacobian, structured
from mgs_torch.op_fixes import (
    _CONVOLUTIONS, REPLACED_OPS, ExactOps, recording_replacements, transposed_convolutions_where_automatic,
    use_transposed_convolution_backward,
)
from reference import flat_gradients, kernel_loop, penalty_grad_loop, relative_error, trainable

TOL = 1e-9


@pytest.fixture(autouse=True)
def automatic_state():
    """Every test starts and ends in the process's default state (automatic)."""
    use_transposed_convolution_backward(None)
    yield
    use_transposed_convolution_backward(None)


def _conv_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(27, 3)
    ).double()
    return model, torch.randn(4, 2, 8, 8, dtype=torch.float64)


def _replaced(**kwargs) -> tuple[set, torch.Tensor]:
    """The op replacements one penalty call ran, and its value."""
    model, x = _conv_net()
    with recording_replacements() as names:
        value = mgs_penalty(model, x, reduction="sum", **kwargs)
    return names, value


def test_the_automatic_state_adds_the_convolutions_only_inside_a_block_that_wants_them():
    assert not any(op in ExactOps().replacements for op in _CONVOLUTIONS)
    with transposed_convolutions_where_automatic(False):
        assert not any(op in ExactOps().replacements for op in _CONVOLUTIONS)
    with transposed_convolutions_where_automatic(True):
        assert all(ExactOps().replacements[op] is fix for op, fix in _CONVOLUTIONS.items())
        with transposed_convolutions_where_automatic(True):  # nested blocks
            pass
        assert all(op in ExactOps().replacements for op in _CONVOLUTIONS)
    assert not any(op in ExactOps().replacements for op in _CONVOLUTIONS)
    assert not any(op in REPLACED_OPS for op in _CONVOLUTIONS)  # the shared table is never changed by a block


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_wins_over_the_automatic_choice(setting):
    use_transposed_convolution_backward(setting)
    for wanted in (False, True):
        with transposed_convolutions_where_automatic(wanted):
            assert all((op in ExactOps().replacements) is setting for op in _CONVOLUTIONS)


def test_the_setting_refuses_what_is_not_true_false_or_none():
    with pytest.raises(TypeError, match="True, False or None"):
        use_transposed_convolution_backward("auto")


@pytest.mark.parametrize(
    "kind, estimator, engine, device, expected",
    [
        ("trace", "exact", structured, "cuda", True),
        ("trace", "hutchinson", structured, "cuda", False),  # measured 53 % slower on the H200
        ("logdet", "exact", structured, "cuda", False),  # not measured
        ("trace", "exact", jacobian, "cuda", False),  # per-sample weight gradients: the Hutchinson case's loop
        ("trace", "exact", structured, "cpu", False),  # measured slower on the CPU
    ],
)
def test_where_the_penalty_asks_for_it(kind, estimator, engine, device, expected):
    problem = SimpleNamespace(params={"w": SimpleNamespace(device=torch.device(device))})
    assert penalty_module._transposed_convolutions_pay(kind, estimator, engine, problem) is expected


def test_on_the_cpu_the_default_penalty_keeps_atens_convolution():
    names, _ = _replaced(strategy="structured")
    assert "conv2d" not in names


def test_where_it_pays_the_exact_trace_penalty_uses_it_and_keeps_the_loops_values(monkeypatch):
    monkeypatch.setattr(penalty_module, "TRANSPOSED_CONVOLUTION_DEVICES", ("cpu",))
    model, x = _conv_net()
    with recording_replacements() as names:
        value = mgs_penalty(model, x, reduction="sum", strategy="structured")
        grads = torch.autograd.grad(value, trainable(model), allow_unused=True)  # the last bias: ∂ tr K = 0
    assert "conv2d" in names
    assert relative_error(value.detach(), kernel_loop(model, x).trace()) <= TOL
    expected = penalty_grad_loop(model, x, "trace")
    assert relative_error(flat_gradients(grads, trainable(model)), flat_gradients(expected, trainable(model))) <= TOL
    # the block ends with the call: the metrics after it run aten's convolution again
    with recording_replacements() as after:
        mgs_trace(model, x, strategy="structured")
    assert "conv2d" not in after


@pytest.mark.parametrize(
    "kwargs", [dict(estimator="hutchinson", strategy="structured"), dict(kind="logdet", strategy="structured"),
               dict(strategy="jacobian")], ids=["hutchinson", "logdet", "reference engine"],
)
def test_where_it_pays_the_other_penalties_do_not_use_it(monkeypatch, kwargs):
    monkeypatch.setattr(penalty_module, "TRANSPOSED_CONVOLUTION_DEVICES", ("cpu",))
    names, _ = _replaced(**kwargs)
    assert "conv2d" not in names


def test_where_it_pays_an_explicit_false_keeps_atens_convolution(monkeypatch):
    monkeypatch.setattr(penalty_module, "TRANSPOSED_CONVOLUTION_DEVICES", ("cpu",))
    use_transposed_convolution_backward(False)
    names, _ = _replaced(strategy="structured")
    assert "conv2d" not in names
