"""Every bad input gets an error that names the problem and what to do."""

import pytest
import torch
from torch import nn

from helpers import mlp
from mgs_torch import NonFiniteOutputError, mgs_kernel, mgs_penalty, mgs_trace

X = torch.randn(3, 4, dtype=torch.float64)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.randn(0, 4, dtype=torch.float64), ValueError, "batch is empty"),
        ([1.0, 2.0], TypeError, "got list of float"),
        ({"x": X}, TypeError, "got dict"),
        ((), TypeError, "non-empty tuple"),
        ("data", TypeError, "got str"),
        (torch.tensor(1.0, dtype=torch.float64), ValueError, "0-dimensional"),
        ((X, torch.randn(2, 4)), ValueError, "disagree on the batch size"),
    ],
    ids=["empty", "list-of-floats", "dict", "empty-tuple", "string", "scalar", "batch-mismatch"],
)
def test_bad_inputs(strategy, inputs, error, match):
    with pytest.raises(error, match=match):
        mgs_kernel(mlp(3), inputs, strategy=strategy)


def test_batch_from_a_data_loader_gets_a_hint():
    with pytest.raises(TypeError, match="pass only the inputs"):
        mgs_kernel(mlp(3), [X, [0, 1, 2]])


def test_model_without_trainable_parameters():
    frozen = mlp(3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mgs_kernel(frozen, X)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mgs_penalty(nn.ReLU(), X)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mgs_kernel(lambda x: x, X)


class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin, self.fn = nn.Linear(4, 2).double(), fn

    def forward(self, x):
        return self.fn(self.lin(x))


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize(
    "fn, error, match",
    [
        (lambda y: y / 0.0, ValueError, "non-finite outputs"),
        (lambda y: y * float("nan"), ValueError, "non-finite outputs"),
        (lambda y: y.sum(), ValueError, "batch .3. on dim 0"),
        (lambda y: y.T, ValueError, "expected the batch"),
        (lambda y: (y, y), TypeError, "returned tuple"),
        (lambda y: {"logits": y}, TypeError, "returned dict"),
        (lambda y: y.argmax(1), TypeError, "floating-point"),
        (lambda y: y[:, :0], ValueError, "zero outputs per sample"),
    ],
    ids=["inf", "nan", "scalar", "transposed", "tuple", "dict", "integer", "empty-output"],
)
def test_bad_outputs(strategy, fn, error, match):
    with pytest.raises(error, match=match):
        mgs_kernel(Returns(fn), X, strategy=strategy)


@pytest.mark.parametrize("call", [mgs_kernel, mgs_trace, mgs_penalty])
def test_non_finite_outputs_have_their_own_error_type(call):
    with pytest.raises(NonFiniteOutputError, match="non-finite outputs") as info:
        call(Returns(lambda y: y / 0.0), X)
    assert isinstance(info.value, ValueError)  # still a ValueError for callers that catch those


def test_warnings_point_at_the_callers_line():
    import math

    from mgs_torch import _warnings

    _warnings._warned.discard("logdet-jitter")
    model = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 3)).double()  # singular K
    with pytest.warns(RuntimeWarning, match="jitter") as record:
        value = mgs_penalty(model, torch.randn(6, 2, dtype=torch.float64), kind="logdet")
    assert math.isfinite(value.item())
    assert record[0].filename == __file__


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "fast"}, "strategy must be one of"),
        ({"outputs": "mean"}, "outputs must be one of"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1 or None"),
        ({"chunk_size": 2.5}, "chunk_size must be an int >= 1 or None"),
        ({"batch_norm": "train"}, "batch_norm must be one of"),
        ({"params": ["nope"]}, "matches no trainable parameter"),
        ({"params": lambda name, p: False}, "selects no trainable parameter"),
    ],
)
def test_bad_kernel_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mgs_kernel(mlp(3), X, **kwargs)


def test_bad_dtype_and_param_entries():
    with pytest.raises(TypeError, match="floating torch.dtype"):
        mgs_kernel(mlp(3), X, dtype=torch.int64)
    with pytest.raises(TypeError, match="names, modules or parameters"):
        mgs_kernel(mlp(3), X, params=[3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "frobenius"}, "kind must be one of"),
        ({"estimator": "sketch"}, "estimator must be one of"),
        ({"kind": "logdet", "estimator": "hutchinson"}, "estimates the trace only"),
        ({"estimator": "hutchinson", "num_probes": 0}, "num_probes must be an int >= 1"),
        ({"reduction": "none"}, "reduction must be one of"),
        ({"jitter": -1.0}, "jitter must be a finite number >= 0.0"),
        ({"jitter": float("nan")}, "jitter must be a finite number"),
    ],
)
def test_bad_penalty_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mgs_penalty(mlp(3), X, **kwargs)


def test_bad_trace_options():
    with pytest.raises(ValueError, match="num_probes"):
        mgs_trace(mlp(3), X, estimator="hutchinson", num_probes=-1)


def test_batch_norm_without_running_statistics_needs_the_batch_policy():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    with pytest.raises(ValueError, match="batch_norm='batch'"):
        mgs_kernel(model, X)
    assert mgs_kernel(model, X, batch_norm="batch").shape == (9, 9)


@pytest.mark.parametrize("whole_batch", [False, True], ids=["per-sample", "whole-batch"])
@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("call", [mgs_kernel, mgs_trace, mgs_penalty])
def test_non_finite_outputs_after_a_cached_call_raise_too(call, strategy, whole_batch):
    """The second call reuses the validated problem (no validation forward): the engine's own forward
    must still refuse NaN outputs, here from a weight that became NaN, rather than return NaN; on the
    per-sample route and on the whole-batch one (train-mode BatchNorm, batch_norm="batch")."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3) if whole_batch else nn.Identity()
    model = nn.Sequential(nn.Linear(4, 3), norm, nn.Tanh(), nn.Linear(3, 2)).double().train()
    x = torch.randn(3, 4, dtype=torch.float64)
    kw = {"batch_norm": "batch"} if whole_batch else {}
    call(model, x, strategy=strategy, **kw)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="non-finite outputs"):
        call(model, x, strategy=strategy, **kw)
