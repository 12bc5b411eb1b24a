"""Bad inputs that used to surface torch's or Python's raw errors (issue 11, items 10 and 12's dtype rule).

Each raises an error that names the problem and what to do, and changes nothing (weights, .grad,
train/eval flags, the global random state)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import mlp
from mgs_torch import ModelForwardError, UnsupportedLayerError, mgs_kernel, mgs_penalty, mgs_trace, verify

X = torch.randn(3, 4, dtype=torch.float64)
FUNCTIONS = [mgs_kernel, mgs_trace, mgs_penalty]


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            torch.get_rng_state())


def _unchanged(model, before):
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and torch.equal(before[2], after[2])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_integer_input_into_an_mlp(fn, strategy):
    model, x = mlp(3), torch.randint(0, 5, (3, 4))
    before = _state(model)
    with pytest.raises(TypeError, match=r"input 0 has the integer dtype torch.int64.*x\.float\(\).*nn.Embedding"):
        fn(model, x, strategy=strategy)
    _unchanged(model, before)


def test_integer_input_into_an_embedding_still_works():
    model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    assert mgs_kernel(model, torch.randint(0, 10, (4, 2))).shape == (8, 8)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_float32_input_into_a_float64_model_fails_like_model_x(fn):
    model = mlp(3)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError):
        model(x)  # what PyTorch itself does
    before = _state(model)
    with pytest.raises(TypeError, match=r"input 0 has dtype torch.float32 but the model's parameters are torch.float64.*dtype="):
        fn(model, x)
    _unchanged(model, before)
    # the documented way to mix: ask for a compute dtype, which casts inputs and parameters alike
    assert fn(model, x, dtype=torch.float64) is not None


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_inputs_and_targets_passed_together(fn):
    model = mlp(3)
    y = torch.randint(0, 3, (3,))
    before = _state(model)
    with pytest.raises(TypeError, match=r"Sequential.forward takes 1 input.*2 tensors.*pass only the inputs"):
        fn(model, (X, y))
    _unchanged(model, before)


def test_a_model_with_two_inputs_takes_a_tuple():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2).double(), nn.Linear(4, 2).double()

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    assert mgs_kernel(Two(), (X, X)).shape == (6, 6)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_unbatched_input(fn):
    model = mlp(3)
    before = _state(model)
    with pytest.raises(ValueError, match=r"unbatched sample.*x\.unsqueeze\(0\)"):
        fn(model, X[0])  # 4 features, no batch dimension
    _unchanged(model, before)


@pytest.mark.parametrize("name", ["float64", "torch.float64"])
def test_dtype_names_are_accepted_everywhere(name):
    from mgs_torch.lightning import MGSMonitor

    model = mlp(3)
    torch.testing.assert_close(mgs_kernel(model, X.float(), dtype=name), mgs_kernel(model, X.float(), dtype=torch.float64))
    assert MGSMonitor(dtype=name).dtype is torch.float64


@pytest.mark.parametrize("bad", ["int64", "float65", torch.int32, float])
def test_non_floating_dtypes_are_refused_everywhere_with_one_message(bad):
    from lightning_helpers import RegNet
    from mgs_torch.lightning import MGSMonitor

    messages = []
    for make in (lambda: mgs_kernel(mlp(3), X, dtype=bad), lambda: mgs_penalty(mlp(3), X, dtype=bad),
                 lambda: MGSMonitor(dtype=bad), lambda: RegNet(mgs_dtype=bad)):
        with pytest.raises(TypeError, match="must be a floating torch.dtype") as info:
            make()
        messages.append(str(info.value).split(" must be ")[1])
    assert len(set(messages)) == 1


def test_a_dtype_error_inside_an_embedding_model_is_not_blamed_on_its_indices():
    class Mixed(nn.Module):  # float64 embedding, float32 head: the model's own dtype bug
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 3).double(), nn.Linear(6, 2)

        def forward(self, idx):
            return self.head(self.emb(idx).flatten(1))

    with pytest.raises(ModelForwardError, match=r"fails on these inputs.*as model\(x\) would.*same dtype") as caught:
        mgs_kernel(Mixed(), torch.randint(0, 10, (4, 2)))
    assert "x.float()" not in str(caught.value)


def test_a_compiled_model_is_differentiated_as_its_original_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    compiled = torch.compile(model)
    assert torch.equal(mgs_kernel(compiled, x), mgs_kernel(model, x))
    grads = torch.autograd.grad(mgs_penalty(compiled, x), list(model.parameters())[:-1])  # the last bias: constant ∂f
    expected = torch.autograd.grad(mgs_penalty(model, x), list(model.parameters())[:-1])
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


def test_a_torchscript_submodule_is_refused_with_advice():
    model = nn.Sequential(nn.Linear(3, 4), torch.jit.script(nn.PReLU()), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    before = _state(model)
    for fn in FUNCTIONS:
        with pytest.raises(TypeError, match=r"contains TorchScript submodules \(1\).*silently off.*original nn.Module"):
            fn(model, x)
    _unchanged(model, before)


def test_data_parallel_is_unwrapped_and_torchscript_is_refused_with_advice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = mgs_kernel(model, x)
    assert torch.allclose(mgs_kernel(nn.DataParallel(model), x), expected)  # the same function and Parameters
    value = mgs_penalty(nn.DataParallel(model), x, chunk_size=1)
    assert value.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream; users still have such modules
        scripted_models = (torch.jit.script(model), torch.jit.trace(model, x))
    for scripted in scripted_models:
        with pytest.raises(TypeError, match="TorchScript.*pass the nn.Module you scripted or traced"):
            mgs_kernel(scripted, x)


class _ComplexWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
        self.head = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.head((x.to(torch.complex128) @ self.w).abs())


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_complex_parameters_are_refused_with_the_real_form_to_use(fn):
    model = _ComplexWeight()
    before = _state(model)
    with pytest.raises(TypeError, match=r"complex parameters \(w\).*real Parameter.*view_as_complex.*params="):
        fn(model, X)
    _unchanged(model, before)
    assert mgs_kernel(model, X, params=["head"]).shape == (6, 6)  # leaving it out works


class _OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("strategy", ["auto", "jacobian"])
def test_an_old_style_autograd_function_gets_the_torch_func_form_to_use(strategy):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model[1].register_forward_hook(lambda m, i, out: _OldStyle.apply(out))
    with pytest.raises(UnsupportedLayerError, match=r"(?s)custom torch.autograd.Function.*setup_context.*generate_vmap_rule"):
        mgs_kernel(model, X, strategy=strategy)


class _PackedGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x, lengths):
        _, h = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return self.head(h[-1])


def test_verify_reports_a_refused_model_instead_of_raising():
    """A packed sequence once escaped as an IndexError from inside the RNN replacement, and verify,
    which promises never to raise for a model mgs_torch cannot handle, raised it."""
    model = _PackedGRU().double()
    x, lengths = torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([5, 2, 3])
    for strategy in ("auto", "jacobian"):
        report = verify(model, (x, lengths), samples=3, strategy=strategy)
        assert not report.ok
        assert report.failure.startswith("UnsupportedLayerError: GRU on a PackedSequence")
        assert "out[torch.arange(n), lengths - 1]" in report.failure


class _RunningMean(nn.Module):
    """Updates a buffer in place in its forward (as running statistics and quantisation observers do)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.register_buffer("run", torch.zeros(4))

    def forward(self, x):
        self.run.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.a(x - self.run)


@pytest.mark.parametrize("strategy", ["auto", "jacobian", "structured"])
def test_a_buffer_written_in_place_in_forward_gets_advice(strategy):
    model = _RunningMean().double()
    before = _state(model)
    with pytest.raises(UnsupportedLayerError, match=r"(?s)writes in place into a tensor.*buffer.*disable_observer.*out of place"):
        mgs_kernel(model, X, strategy=strategy)
    _unchanged(model, before)


def test_fake_quantize_works_with_its_observer_off():
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, disable_observer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), FakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255),
                          nn.Linear(5, 2)).double()
    model(X)  # calibrate
    with pytest.raises(UnsupportedLayerError, match="disable_observer"):
        mgs_kernel(model, X)
    model.apply(disable_observer)
    report = verify(model, X, samples=3)
    assert report.ok, report


def test_a_failure_only_under_the_op_replacements_is_not_called_autograd_in_forward(monkeypatch):
    """The validation forward fails; model(x) runs with gradients on, but so must the forward under mgs_torch's
    op replacements before the error is put down to torch.autograd inside forward — here a replacement is what
    fails, and the original error is explained instead (never the force-field advice)."""
    import torch.nn.functional as F
    from mgs_torch.op_fixes import REPLACED_OPS

    def broken(*args, **kwargs):
        raise RuntimeError("the hardsigmoid replacement failed")

    monkeypatch.setitem(REPLACED_OPS, F.hardsigmoid, broken)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x)  # the model itself runs
    with pytest.raises(UnsupportedLayerError, match="the hardsigmoid replacement failed") as info:
        mgs_kernel(model, x, strategy="jacobian")
    assert "torch.func.grad" not in str(info.value) and "fails on these inputs" not in str(info.value)
