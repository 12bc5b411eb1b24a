"""The route of :func:`~mgs_torch.mgs_penalty`, :func:`~mgs_torch.mgs_trace` and :func:`~mgs_torch.mgs_kernel`
while ``torch.compile`` traces them (``torch.compiler.is_compiling()``).

Dynamo turns the Python it traces into one graph, so this route holds only what a graph can hold: the
reference engine (:mod:`~mgs_torch.engines.jacobian`: ``vmap`` of ``vjp``/``jacrev`` of the model on one
sample, which Dynamo traces as tensor ops), the same op replacements (:mod:`~mgs_torch.op_fixes`), the
same BatchNorm policy. What needs a value on the host or state outside the graph is left out, and the
eager call does it: the validation forward's NaN check (non-finite outputs give a non-finite value instead
of an error), the check that samples do not interact, the self-check against the autograd loop, the forks
of the random state (a compiled step draws its Dropout masks from the compiler's random stream), and the
structured engine (its forward hooks are registered per call). The output shape comes from the traced
forward's shape alone; the compiler removes that forward from the graph, since no value of it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Iterator

import torch
from torch import nn

from ._guards import BATCH_NORM_TYPES, has_backward_hooks
from ._problem import KernelProblem, draft_problem
from ._validation import check_outputs

__all__ = ["compiling", "eager_reason", "run_eagerly", "traced_state", "traced_problem"]


def compiling() -> bool:
    """True while ``torch.compile`` (Dynamo) traces the calling code."""
    return torch.compiler.is_compiling()


def eager_reason(model: nn.Module, batch_norm: str, strategy: str = "auto") -> str | None:
    """Why this call must run eagerly inside a compiled function (a graph break), or None.

    ``strategy="structured"``, asked for explicitly: its forward hooks are registered per call, which Dynamo
    cannot trace, so the call runs eagerly, where it is often faster than the traced reference engine (it never
    holds per-sample gradients; benchmarks/RESULTS.md). Module backward hooks (per module or global): torch.func
    cannot run the autograd.Function behind them, and setting them aside is a side effect the eager route's
    :func:`~mgs_torch._guards.preserved_state` undoes after the call. A BatchNorm in training mode read with its running statistics (``batch_norm="eval"``): the model's own forward
    in the same compiled step updates those statistics, and Inductor (PyTorch 2.13) then gets the gradient of
    anything computed from the updated statistics wrong, 6–8 % off with the right value (pinned in
    ``tests/test_upstream_bugs.py``, without mgs_torch). The penalty gradient was 3 % off; eager it is exact.
    """
    if strategy == "structured":
        return "strategy='structured' was asked for, and its per-call forward hooks cannot be traced"
    if has_backward_hooks(model):  # set aside eagerly (preserved_state), which a traced graph cannot do
        return "backward hooks are registered, which torch.func cannot run and only the eager route sets aside"
    for m in model.modules():
        if isinstance(m, BATCH_NORM_TYPES) and m.training and batch_norm == "eval" and m.running_var is not None:
            return (
                f"{type(m).__name__} in training mode read with its running statistics (batch_norm='eval'), which "
                f"Inductor differentiates wrongly after the step's own forward updates them"
            )
    return None


@torch.compiler.disable
def _eagerly(function, *args, **kwargs):
    return function(*args, **kwargs)


def run_eagerly(function):
    """``function`` run outside the traced graph (Dynamo breaks the graph around the call): the eager route, with
    every check."""
    return functools.partial(_eagerly, function)


@contextlib.contextmanager
def traced_state(model: nn.Module, batch_norm: str) -> Iterator[None]:
    """:func:`~mgs_torch._guards.preserved_state` as a traced graph can hold it: BatchNorm in eval mode under
    ``batch_norm="eval"`` (its flags restored after), autocast off; no random-state fork."""
    flags = [(m, m.training) for m in model.modules() if isinstance(m, BATCH_NORM_TYPES)]
    try:
        if batch_norm == "eval":
            for m, _ in flags:
                m.training = False
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def traced_problem(model: nn.Module, inputs, *, params, dtype, create_graph: bool, batch_norm: str, logits) -> KernelProblem:
    """The problem of one traced call: :func:`~mgs_torch._problem.draft_problem` and the per-sample output shape of a
    gradient-free forward (shapes only; every buffer starts from a fresh copy in every forward)."""
    draft = draft_problem(model, inputs, params=params, dtype=dtype, create_graph=create_graph, batch_norm=batch_norm,
                          logits=logits)
    with torch.no_grad():
        out = check_outputs(draft.raw_forward(fresh_buffers=True), draft.n)
    shape = tuple(out.shape[1:])
    return dataclasses.replace(draft, q=max(1, math.prod(shape)), output_shape=shape, mutated_buffers=draft.buffer_names)
