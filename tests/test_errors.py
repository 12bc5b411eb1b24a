"""Every bad input gets an error that names the problem and what to do."""

import pytest
import torch
from torch import nn

from helpers import assert_close, mlp
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
        # a dict is read by its "logits" entry (issue 21); one without it says how to select the outputs
        (lambda y: {"scores": y}, TypeError, r"returned dict with keys \['scores'\].*logits="),
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


@pytest.mark.parametrize("call", [mgs_kernel, mgs_trace, mgs_penalty], ids=["kernel", "trace", "penalty"])
@pytest.mark.parametrize("running_stats", [True, False])
def test_a_batch_of_one_under_batch_statistics_raises_as_the_model_does(call, running_stats):
    """BatchNorm on batch statistics has none for one value per channel: model(x[:1]) raises, and so does MGS
    (it used to return tr K / N = 1 from the normalised zeros)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=running_stats), nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(X[:1])
    with pytest.raises(ValueError, match="batch_norm='batch' on a batch of one sample.*at least two samples"):
        call(model, X[:1], batch_norm="batch")
    assert call(model, X[:2], batch_norm="batch").isfinite().all()


def test_a_batch_of_one_with_several_values_per_channel_is_fine():
    """BatchNorm2d over a 4×4 map has 16 values per channel in a batch of one: model(x) runs, and so does MGS,
    exactly (the whole-batch loop's K); in eval mode a batch of one is a batch like any other."""
    from reference import kernel_loop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    assert_close(mgs_kernel(model, x, batch_norm="batch"), kernel_loop(model, x, whole_batch=True))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().eval()
    assert mgs_kernel(bn, X[:1], batch_norm="batch").shape == (2, 2)


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


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "auto"])
def test_batch_norm_whose_flag_was_turned_off_later_keeps_its_running_statistics_in_eval(strategy):
    """PyTorch's rule: in eval mode a BatchNorm normalises with batch statistics only when it has no running
    statistics. Setting track_running_stats = False after construction leaves them there, eval mode still uses
    them, and the per-sample kernel is defined (it used to be refused as if they were missing)."""
    from reference import kernel_loop, relative_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)).double()
    model.train()(torch.randn(16, 4, dtype=torch.float64))  # running statistics that are not 0 and 1
    model.eval()
    model[1].track_running_stats = False
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(model(x)[:1], model(x[:1]))  # a sample alone as in the batch: no batch statistics
    assert relative_error(mgs_kernel(model, x, strategy=strategy), kernel_loop(model, x)) < 1e-12
