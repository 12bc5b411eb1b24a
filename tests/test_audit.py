"""The audit matrix: every layer family × every strategy, against the per-sample autograd loop.

For each model of :mod:`model_zoo` and each strategy, K (both output modes), tr K and the gradients
of the trace and log-det penalties must match the plain-autograd reference in float64 to 1e-9
relative error (where PyTorch has no double backward for an op, the loop differentiates an exact
formula of the same function, itself checked against finite differences of the model over every
parameter entry), and the call
must leave parameters, ``.grad``, buffers, train/eval flags and the global RNG as they were.
Models mgs_torch refuses must raise the documented error and change nothing either.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from model_zoo import CASES, Case, build
from reference import kernel_loop, penalty_grad_fd, penalty_grad_loop, relative_error, trainable
from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace
from mgs_torch.engines import factors
from mgs_torch.op_fixes import use_transposed_convolution_backward

STRATEGIES = ("jacobian", "structured", "auto")
TOL = 1e-9
FD_TOL = 1e-7  # central differences (eps 1e-6) of the loop against its exact gradient: truncation and rounding


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    case = next(c for c in CASES if c.name == name)
    model, x = build(case)
    ref_model = case.reference_model(model) if case.reference_model else model
    wb = case.whole_batch
    out = {
        "K": kernel_loop(ref_model, x, whole_batch=wb).detach(),
        "Ksum": kernel_loop(ref_model, x, outputs="sum", whole_batch=wb).detach(),
    }
    kinds = ("trace", "logdet") if case.logdet else ("trace",)
    for kind in kinds:
        out[kind] = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(penalty_grad_loop(ref_model, x, kind, whole_batch=wb), trainable(ref_model))]
    return out


def snapshot(model: torch.nn.Module) -> dict:
    return {
        # the objects themselves, under every name (a module registered twice included): an optimizer holds these
        "identities": [(k, id(t)) for k, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]],
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["identities"] == before["identities"], "a parameter or buffer object was replaced"
    for a, b in zip(after["params"], before["params"]):
        assert torch.equal(a, b), "a parameter changed"
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b), ".grad changed"
    for a, b in zip(after["buffers"], before["buffers"]):
        assert torch.equal(a, b), "a buffer changed"
    assert after["modes"] == before["modes"], "train/eval flags changed"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG was consumed"


def penalty_gradient(model, x, kind, strategy, kwargs):
    value = mgs_penalty(model, x, kind=kind, strategy=strategy, reduction="sum", **kwargs)
    grads = torch.autograd.grad(value, trainable(model), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable(model))]
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_the_autograd_loop(case: Case, strategy: str):
    audit(case, strategy)


def audit(case: Case, strategy: str) -> None:
    model, x = build(case)
    kw = case.kernel_kwargs
    # the reference first: its plain forwards draw from the global RNG when the model has random ops
    ref = reference(case.name) if case.refused is None else None
    before = snapshot(model)
    if case.refused is not None:
        with pytest.raises(case.refused):
            mgs_kernel(model, x, strategy=strategy, **kw)
        with pytest.raises(case.refused):
            mgs_penalty(model, x, strategy=strategy, **kw)
        assert_unchanged(model, before)
        return
    errors = {
        "K": relative_error(mgs_kernel(model, x, strategy=strategy, **kw), ref["K"]),
        "K (outputs='sum')": relative_error(mgs_kernel(model, x, strategy=strategy, outputs="sum", **kw), ref["Ksum"]),
        "tr K": relative_error(mgs_trace(model, x, strategy=strategy, **kw), ref["K"].trace()),
    }
    tol = {key: TOL for key in errors}
    for kind in ("trace", "logdet"):
        if kind in ref:
            expected = torch.cat([g.reshape(-1) for g in ref[kind]])
            key = f"∂{kind} penalty"
            errors[key] = relative_error(penalty_gradient(model, x, kind, strategy, kw), expected)
            tol[key] = TOL
    assert_unchanged(model, before)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol[k]}
    assert not bad, f"{case.name} with strategy={strategy!r}: relative errors {bad}"


@pytest.mark.parametrize("case", [c for c in CASES if c.grad_by_fd], ids=lambda c: c.name)
def test_exact_references_match_finite_differences_of_the_model(case: Case):
    """The cases whose op has no double backward: the exact reference the audit compares with (a
    formula in reference.py or ``reference_model``) against central differences of the model itself,
    on every entry of every parameter (not a prefix: issue 25 found rows never checked)."""
    model, x = build(case)
    if any(getattr(m, "sparse", False) for m in model.modules()):  # no first derivative in the loop either (sparse
        model = case.reference_model(model)  # gradients): the dense copy of the same function and weights
    for kind in ("trace", "logdet") if case.logdet else ("trace",):
        fd = torch.cat([g.reshape(-1) for g in penalty_grad_fd(model, x, kind, whole_batch=case.whole_batch)])
        exact = torch.cat([g.reshape(-1) for g in reference(case.name)[kind]])
        assert fd.numel() == exact.numel() == sum(p.numel() for p in trainable(model))
        assert relative_error(fd, exact) <= FD_TOL, f"{case.name}: {kind} reference off by {relative_error(fd, exact):.1e}"


def _has_convolution(case: Case) -> bool:
    return case.refused is None and any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in build(case)[0].modules())


@pytest.mark.parametrize("case", [c for c in CASES if _has_convolution(c)], ids=lambda c: c.name)
def test_unfolded_convolution_gradients_match_the_loop(case: Case, monkeypatch):
    """The CUDA route for materialised per-sample convolution gradients (unfolded patches and a
    batched matmul), forced on the CPU so that every convolution case checks it here too."""
    monkeypatch.setattr(factors.ConvFactor, "ghost_is_cheaper", lambda self, quantity: False)
    monkeypatch.setattr(
        factors.ConvFactor, "materialize",
        lambda self: self.materialize_unfolded() if len(self.kernel_size) <= 2 else self.materialize_grouped(),
    )
    audit(case, "structured")


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("case", [c for c in CASES if _has_convolution(c)], ids=lambda c: c.name)
def test_transposed_convolution_backward_matches_the_loop(case: Case, strategy: str):
    """The opt-in convolution replacement (a transposed convolution as input-gradient) on every
    convolution case, both strategies: K, tr K and both penalty gradients against the loop."""
    use_transposed_convolution_backward(True)
    try:
        audit(case, strategy)
    finally:
        use_transposed_convolution_backward(False)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("selected", ["first convolution", "second convolution's bias"])
def test_transposed_convolution_backward_with_frozen_weights(selected: str, strategy: str):
    """The opt-in replacement returns an input-gradient exactly when its input needs one, whether or not its own
    weight is differentiated: params= leaves the second convolution's weight frozen (no gradient) while the first
    convolution's J passes through it, and a first convolution whose input needs no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    params = [model[0].weight, model[0].bias] if selected == "first convolution" else [model[2].bias]
    use_transposed_convolution_backward(True)
    try:
        K = mgs_kernel(model, x, params=params, strategy=strategy)
        value = mgs_penalty(model, x, params=params, strategy=strategy, reduction="sum")
        grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    finally:
        use_transposed_convolution_backward(False)
    expected = kernel_loop(model, x, params, create_graph=True)
    assert relative_error(K, expected.detach()) <= TOL
    theirs = torch.autograd.grad(expected.trace(), list(model.parameters()), allow_unused=True)
    for g, e, p in zip(grads, theirs, model.parameters()):  # ∂ tr K reaches the frozen weights too
        g, e = (torch.zeros_like(p) if t is None else t for t in (g, e))
        assert float((g - e).norm()) <= TOL * max(float(e.norm()), 1.0)


OPTION_CASES = ["folded_sequence", "permuted_batch", "lstm_tm_tagger", "encoder_layer_default", "batchnorm2d_batch", "layernorm_twice", "tied_weights"]


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("name", OPTION_CASES)
def test_chunked_and_filtered_computations_match_the_loop(name: str, strategy: str):
    """chunk_size (kernel, trace and the recomputed penalty), a parameter filter and dtype on the same models."""
    case = next(c for c in CASES if c.name == name)
    model, x = build(case)
    kw = dict(case.kernel_kwargs, strategy=strategy)
    ref = reference(name)
    assert relative_error(mgs_kernel(model, x, chunk_size=2, **kw), ref["K"]) <= TOL
    assert relative_error(mgs_trace(model, x, chunk_size=1, **kw), ref["K"].trace()) <= TOL
    value = mgs_penalty(model, x, reduction="sum", chunk_size=1, **kw)
    grads = torch.autograd.grad(value, trainable(model), allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, trainable(model))])
    assert relative_error(flat, torch.cat([g.reshape(-1) for g in ref["trace"]])) <= TOL
    # a filter: the last parameter only (J's columns restricted), against the loop over that parameter
    last = trainable(model)[-1]
    expected = kernel_loop(model, x, [last], whole_batch=case.whole_batch)
    assert relative_error(mgs_kernel(model, x, params=[last], **kw), expected) <= TOL
    # a float32 copy computed in float64 is the float64 kernel of the rounded weights
    model32 = copy.deepcopy(model).float()
    K64 = mgs_kernel(model32, tuple(t.float() if t.is_floating_point() else t for t in x), dtype=torch.float64, **kw)
    assert K64.dtype == torch.float64
    assert relative_error(K64, kernel_loop(copy.deepcopy(model32).double(), x, whole_batch=case.whole_batch)) <= 1e-7
