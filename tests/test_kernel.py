"""mgs_kernel / mgs_trace against the brute-force reference, in float64."""

import pytest
import torch
from torch import nn

from helpers import SmallCNN, assert_close, mlp, reference_kernel, small_cnn
from reference import kernel_loop
from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace

STRATEGIES = ["jacobian", "structured", "auto"]


def _cases():
    torch.manual_seed(0)
    return {
        "mlp_q3": (mlp(3), torch.randn(5, 4, dtype=torch.float64)),
        "mlp_q1": (mlp(1), torch.randn(4, 4, dtype=torch.float64)),
        "cnn_q3": (small_cnn(3), torch.randn(4, 2, 5, 5, dtype=torch.float64)),
        "cnn_q1": (small_cnn(1), torch.randn(3, 2, 5, 5, dtype=torch.float64)),
    }


@pytest.mark.parametrize("case", ["mlp_q3", "mlp_q1", "cnn_q3", "cnn_q1"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("outputs", ["full", "sum"])
def test_kernel_matches_reference(case, strategy, outputs):
    model, x = _cases()[case]
    expected = reference_kernel(model, x, outputs=outputs)
    K = mgs_kernel(model, x, strategy=strategy, outputs=outputs)
    n = x.shape[0]
    assert K.shape == expected.shape
    assert K.shape[0] == (n * model(x[:1]).numel() if outputs == "full" else n)
    assert_close(K, expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_chunking_gives_the_same_kernel(strategy, chunk_size):
    model, x = _cases()["cnn_q3"]
    assert_close(mgs_kernel(model, x, strategy=strategy, chunk_size=chunk_size), reference_kernel(model, x))
    assert_close(mgs_trace(model, x, strategy=strategy, chunk_size=chunk_size), reference_kernel(model, x).trace())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parameter_filters(strategy):
    model, x = _cases()["cnn_q3"]
    by_name = mgs_kernel(model, x, params=["conv1", "head.bias"], strategy=strategy)
    chosen = [model.conv1.weight, model.conv1.bias, model.head.bias]
    expected = reference_kernel(model, x, params=chosen)
    assert_close(by_name, expected)
    assert_close(mgs_kernel(model, x, params=[model.conv1, model.head.bias], strategy=strategy), expected)
    assert_close(mgs_kernel(model, x, params=lambda name, p: name.startswith("conv1") or name == "head.bias", strategy=strategy), expected)
    assert_close(mgs_trace(model, x, params=["conv1", "head.bias"], strategy=strategy), expected.trace())


def test_frozen_parameters_are_excluded():
    model, x = _cases()["mlp_q3"]
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert_close(mgs_kernel(model, x), reference_kernel(model, x, params=trainable))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trace_is_the_trace_of_the_kernel(strategy):
    for model, x in _cases().values():
        trace = mgs_trace(model, x, strategy=strategy)
        assert_close(trace, reference_kernel(model, x).trace())
        assert not trace.requires_grad  # create_graph=False by default: a value, not a graph


def test_train_mode_batchnorm_uses_running_statistics_by_default():
    """batch_norm="eval" is the default of every entry point: a train-mode BatchNorm model gets the
    kernel of its eval-mode function (running statistics) and stays in train mode."""
    model, x = _cases()["cnn_q3"]
    expected = reference_kernel(model, x)  # small_cnn is in eval mode
    model.train()
    assert_close(mgs_kernel(model, x), expected)
    assert_close(mgs_trace(model, x), expected.trace())
    assert_close(mgs_penalty(model, x, reduction="sum"), expected.trace())
    assert model.training and model.bn.training


def test_summed_and_full_kernels_share_their_trace():
    model, x = _cases()["mlp_q3"]
    assert_close(mgs_kernel(model, x, outputs="sum").trace(), mgs_kernel(model, x).trace())


class MultiDimOutput(nn.Module):
    """Output of shape (n, 2, 3): flattened per sample, q = 6."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return self.lin(x).reshape(-1, 2, 3)


class VectorOutput(nn.Module):
    """Output of shape (n,): q = 1."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return torch.tanh(self.lin(x)).squeeze(-1)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x, y):
        return self.a(x) * self.b(y)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_shapes_and_multiple_inputs(strategy):
    x = torch.randn(3, 4, dtype=torch.float64)
    for model in (MultiDimOutput().double(), VectorOutput().double()):
        assert_close(mgs_kernel(model, x, strategy=strategy), reference_kernel(model, x))
    model = TwoInputs().double()
    inputs = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))
    assert_close(mgs_kernel(model, inputs, strategy=strategy), reference_kernel(model, inputs))


def test_dtype_option_computes_in_float64():
    torch.manual_seed(0)
    model = SmallCNN(3).eval()  # float32
    x = torch.randn(3, 2, 5, 5)
    K = mgs_kernel(model, x, dtype=torch.float64)
    assert K.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    assert_close(K, reference_kernel(model.double(), x.double()))
    assert mgs_kernel(model.float(), x).dtype == torch.float32


def test_kernel_is_symmetric_positive_semidefinite():
    model, x = _cases()["cnn_q3"]
    K = mgs_kernel(model, x)
    assert_close(K, K.T)
    assert torch.linalg.eigvalsh(K).min() > -1e-8 * K.diagonal().max()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_create_graph_makes_the_kernel_differentiable(strategy):
    model, x = _cases()["mlp_q3"]
    K = mgs_kernel(model, x, strategy=strategy, create_graph=True)
    assert K.requires_grad
    (g,) = torch.autograd.grad(K.sum(), [model[0].weight])
    expected = torch.autograd.grad(reference_kernel_graph(model, x).sum(), [model[0].weight])[0]
    assert_close(g, expected, rtol=1e-7, atol=1e-9)
    assert not mgs_kernel(model, x, strategy=strategy).requires_grad


def reference_kernel_graph(model, x):
    """The brute-force kernel with create_graph, for gradient comparisons."""
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, create_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_whole_batch_route_notices_a_changed_output_size(strategy):
    """batch_norm="batch" (one batched forward): after a hook narrows the outputs, K is that of the new
    function (the engines' output check sends a stale problem back for a rebuild)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double().train()
    x = torch.randn(4, 3, dtype=torch.float64)
    first = mgs_kernel(model, x, strategy=strategy, batch_norm="batch")
    assert first.shape == (12, 12)
    model.register_forward_hook(lambda module, args, out: out[:, :2])
    expected = kernel_loop(model, x, whole_batch=True).detach()
    assert_close(mgs_kernel(model, x, strategy=strategy, batch_norm="batch"), expected)


class _Narrowed(nn.Module):
    """Outputs the first ``width`` of its linear layer's: a plain attribute, no hook, so the forward's
    structure (and the cached problem's key) stays the same when ``width`` changes."""

    def __init__(self, batch_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), *([nn.BatchNorm1d(4)] if batch_norm else []), nn.Tanh(),
                                  *([nn.Dropout(dropout)] if dropout else []), nn.Linear(4, 3))
        self.width = 3

    def forward(self, x):
        return self.body(x)[:, : self.width]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("route", ["per-sample", "whole-batch"])
def test_a_changed_output_size_under_the_same_key_is_noticed(strategy, route):
    """The cached output shape is reused while the problem's key is unchanged; an engine whose forward
    returns another q must send the problem back for a rebuild, not compute K of the old size."""
    torch.manual_seed(0)
    whole = route == "whole-batch"
    model = _Narrowed(batch_norm=whole).double().train()
    x = torch.randn(4, 3, dtype=torch.float64)
    options = {"batch_norm": "batch"} if whole else {}
    assert mgs_kernel(model, x, strategy=strategy, **options).shape == (12, 12)
    model.width = 2
    expected = kernel_loop(model, x, whole_batch=whole).detach()
    assert expected.shape == (8, 8)
    assert_close(mgs_kernel(model, x, strategy=strategy, **options), expected)
    assert_close(mgs_trace(model, x, strategy=strategy, **options), expected.trace())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_rebuild_after_a_changed_output_size_keeps_the_dropout_masks_model_x_would_draw(strategy):
    """The rebuild computes again from the random state the call started with: the same masks as a call
    that found nothing stale (both from one seed), not the masks after the failed attempt's draws."""
    torch.manual_seed(0)
    model = _Narrowed(batch_norm=False, dropout=0.5).double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    mgs_kernel(model, x, strategy=strategy)
    model.width = 2
    torch.manual_seed(1)
    rebuilt = mgs_kernel(model, x, strategy=strategy)  # the cached shape is stale: computed twice
    torch.manual_seed(1)
    assert_close(rebuilt, mgs_kernel(model, x, strategy=strategy))  # nothing stale now: computed once


class _PooledSequence(nn.Module):
    """Position-wise layers over (n, length, features), averaged over the positions: the output shape does not
    depend on the sequence length (a sample's second dimension)."""

    def __init__(self, pooled: bool = True):
        super().__init__()
        self.embed, self.head, self.pooled = nn.Linear(2, 3), nn.Linear(3, 2), pooled

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(h.mean(1) if self.pooled else h)  # unpooled: q = 2 outputs per position


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("pooled", [True, False])
def test_inputs_of_another_length_get_their_own_kernel(strategy, pooled):
    """Cached output shapes and plans are keyed by every dimension of a sample: a batch of longer
    sequences (the same features, the same outputs) must not reuse what the shorter ones measured."""
    torch.manual_seed(0)
    model = _PooledSequence(pooled).double()
    for length in (4, 7, 4):
        x = torch.randn(3, length, 2, dtype=torch.float64)
        assert_close(mgs_kernel(model, x, strategy=strategy), kernel_loop(model, x).detach())
        assert_close(mgs_trace(model, x, strategy=strategy), kernel_loop(model, x).detach().trace())
