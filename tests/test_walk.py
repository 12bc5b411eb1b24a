"""mgs_torch._walk: one module walk per call gives what nn.Module's own methods give, and never outlives the call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgs_torch import _walk, mgs_penalty, mgs_trace
from mgs_torch._guards import preserved_state

from reference import kernel_loop, penalty_grad_loop


def _tied_and_shared() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    model = nn.Sequential(nn.Embedding(7, 4), block, block, nn.BatchNorm1d(4), nn.Linear(4, 7, bias=False))
    model[4].weight = model[0].weight  # tied, as a language model's decoder
    model.register_buffer("unused", None)
    return model


def _same(model: nn.Module) -> None:
    assert _walk.named_modules(model) == tuple(model.named_modules())
    assert _walk.modules(model) == list(model.modules())
    assert [(k, id(p)) for k, p in _walk.named_parameters(model)] == [(k, id(p)) for k, p in model.named_parameters()]
    assert [id(p) for p in _walk.parameters(model)] == [id(p) for p in model.parameters()]
    assert [(k, id(b)) for k, b in _walk.named_buffers(model)] == [(k, id(b)) for k, b in model.named_buffers()]


def test_helpers_equal_the_module_methods_inside_and_outside_a_walk():
    model = _tied_and_shared()
    _same(model)
    with _walk.one_walk(model):
        assert id(model) in _walk._WALKS
        _same(model)
        with _walk.one_walk(model):  # nested: the same walk
            _same(model)
        assert id(model) in _walk._WALKS
    assert id(model) not in _walk._WALKS


def test_parameters_are_read_live_inside_a_walk():
    """functional_call swaps tensors into modules during a call: the held tree must not hold the old tensors."""
    model = _tied_and_shared()
    with _walk.one_walk(model):
        replacement = nn.Parameter(torch.zeros(4, 4))
        old = model[1][0].weight
        model[1][0].weight = replacement
        names = dict(_walk.named_parameters(model))
        assert names["1.0.weight"] is replacement and all(p is not old for p in names.values())
        _same(model)


def test_a_class_that_overrides_the_walk_gets_its_own_method():
    class OnlyHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def named_parameters(self, *args, **kwargs):
            return self.head.named_parameters(*args, **kwargs)

    model = OnlyHead()
    with _walk.one_walk(model):
        assert [k for k, _ in _walk.named_parameters(model)] == ["weight", "bias"]


def test_the_walk_is_released_when_the_call_fails():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        with preserved_state(model, "eval"):
            assert id(model) in _walk._WALKS
            raise RuntimeError("inside")
    assert id(model) not in _walk._WALKS
    with pytest.raises(Exception):
        mgs_trace(model, torch.randn(4, 5))  # wrong input width: the forward fails
    assert not _walk._WALKS


def test_a_module_added_between_calls_is_seen():
    """The tree is held for one call only: a layer appended after a call is in the next call's K."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    mgs_trace(model, x)
    model.append(nn.Linear(4, 2).double())
    assert torch.allclose(mgs_trace(model, x), kernel_loop(model, x).trace(), rtol=1e-10)
    mgs_penalty(model, x, reduction="sum").backward()
    expected = penalty_grad_loop(model, x, "trace")
    for p, g in zip(model.parameters(), expected):  # the last bias's rows are constant: no gradient on either side
        assert (p.grad is None) == (g is None) and (g is None or torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12))
    assert model[2].weight.grad is not None
    assert not _walk._WALKS


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
def test_a_call_walks_the_module_tree_a_few_times(monkeypatch, strategy, estimator):
    """Before one_walk a penalty call walked this model's tree 23–27 times (on LeNet-5 ≈ 1.6 ms under cProfile)."""
    from helpers import small_cnn

    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    original = nn.Module.named_modules
    walks = []

    def counting(self, *args, **kwargs):
        if self is model:
            walks.append(1)
        return original(self, *args, **kwargs)

    mgs_penalty(model, x, strategy=strategy, estimator=estimator)  # the first call plans and self-checks
    monkeypatch.setattr(nn.Module, "named_modules", counting)
    mgs_penalty(model, x, strategy=strategy, estimator=estimator).backward()
    assert 1 <= len(walks) <= 6, len(walks)


def test_a_class_with_its_own_module_walk_is_never_held():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 2)

        def named_modules(self, *args, **kwargs):
            yield from self.inner.named_modules(*args, **kwargs)  # not itself first: a walk of its own

    model = Flat()
    with _walk.one_walk(model):
        assert id(model) not in _walk._WALKS
        assert _walk.named_modules(model) == tuple(model.named_modules())
