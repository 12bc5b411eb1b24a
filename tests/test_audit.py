"""The audit matrix: every layer family × every strategy, against the per-sample autograd loop.

For each model of :mod:`model_zoo` and each strategy, K (both output modes), tr K and the gradients
of the trace and log-det penalties must match the plain-autograd reference in float64 to 1e-9
relative error (finite differences where PyTorch has no double backward for an op), and the call
must leave parameters, ``.grad``, buffers, train/eval flags and the global RNG as they were.
Models mgs_torch refuses must raise the documented error and change nothing either.
"""

from __future__ import annotations

import functools

import pytest
import torch

from model_zoo import CASES, Case, build
from reference import kernel_loop, penalty_grad_fd, penalty_grad_loop, relative_error, trainable
from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace

STRATEGIES = ("jacobian", "structured", "auto")
TOL = 1e-9
FD_TOL = 1e-6
FD_ENTRIES = 8


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
        if case.grad_by_fd:
            out[kind] = [g.detach() for g in penalty_grad_fd(ref_model, x, kind, whole_batch=wb, max_entries=FD_ENTRIES)]
        else:
            out[kind] = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(penalty_grad_loop(ref_model, x, kind, whole_batch=wb), trainable(ref_model))]
    return out


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    for a, b in zip(after["params"], before["params"]):
        assert torch.equal(a, b), "a parameter changed"
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b), ".grad changed"
    for a, b in zip(after["buffers"], before["buffers"]):
        assert torch.equal(a, b), "a buffer changed"
    assert after["modes"] == before["modes"], "train/eval flags changed"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG was consumed"


def penalty_gradient(model, x, kind, strategy, kwargs, fd: bool):
    value = mgs_penalty(model, x, kind=kind, strategy=strategy, reduction="sum", **kwargs)
    grads = torch.autograd.grad(value, trainable(model), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable(model))]
    if fd:  # the finite-difference reference covers the first FD_ENTRIES entries of each parameter
        grads = [g.reshape(-1)[:FD_ENTRIES] for g in grads]
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_the_autograd_loop(case: Case, strategy: str):
    model, x = build(case)
    kw = case.kernel_kwargs
    before = snapshot(model)
    if case.refused is not None:
        with pytest.raises(case.refused):
            mgs_kernel(model, x, strategy=strategy, **kw)
        with pytest.raises(case.refused):
            mgs_penalty(model, x, strategy=strategy, **kw)
        assert_unchanged(model, before)
        return
    ref = reference(case.name)
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
            errors[key] = relative_error(penalty_gradient(model, x, kind, strategy, kw, case.grad_by_fd), expected)
            tol[key] = FD_TOL if case.grad_by_fd else TOL
    assert_unchanged(model, before)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol[k]}
    assert not bad, f"{case.name} with strategy={strategy!r}: relative errors {bad}"
