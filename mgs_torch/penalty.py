"""The differentiable MGS penalty g(K) for ``loss = task_loss + alpha * mgs_penalty(model, x)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._linalg import logdet_psd
from ._guards import preserved_state, restore_rng_states, rng_states
from ._problem import KernelProblem, build_problem
from ._io import OutputSelector
from ._validation import Inputs, ParamFilter, functional_model
from .engines import engine_for
from .estimators import ESTIMATORS, KINDS, default_generator, trace_cotangents, trace_from_rows
from .op_fixes import explained_failures
from .kernel import on_problem
from .options import REDUCTIONS, PenaltyOptions

__all__ = ["mgs_penalty", "default_generator", "KINDS", "ESTIMATORS", "REDUCTIONS"]


class _RecomputedChunks(torch.autograd.Function):
    """Σ_c value_c(θ) whose backward rebuilds one chunk's graph at a time (activation checkpointing).

    ``value_of(start, values)`` returns the chunk starting at ``start`` as a function of the parameter
    tensors ``values`` (name -> tensor); the forward's total is passed in already computed.
    """

    @staticmethod
    def forward(ctx, total, value_of, starts, names, *params):
        ctx.value_of, ctx.starts, ctx.names = value_of, starts, names
        ctx.save_for_backward(*params)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total):
        params = ctx.saved_tensors
        grads = [torch.zeros_like(p) for p in params]
        for start in ctx.starts:
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_() for p in params]
                value = ctx.value_of(start, dict(zip(ctx.names, leaves)))
                if not value.requires_grad:  # this chunk does not depend on θ (a linear model): no contribution
                    continue
                for acc, g in zip(grads, torch.autograd.grad(value, leaves, allow_unused=True)):
                    if g is not None:
                        acc += g
        return (None, None, None, None, *(grad_total * g for g in grads))


def _trace_in_chunks(
    model: nn.Module, inputs: Inputs, strategy: str, *, estimator: str, num_probes: int, generator, chunk_size: int,
    batch_norm: str, build: dict,
) -> tuple[Tensor, KernelProblem]:
    """tr K (or its Hutchinson estimate, not yet divided by the probes) with memory bounded by
    ``chunk_size`` cotangents: the forward computes the value chunk by chunk without a graph; the
    backward recomputes each chunk's graph under the same random state (Dropout masks match).
    Returns the value and the (graph-free) problem it was computed on."""
    model = functional_model(model)
    rng = rng_states(model)

    def problem_for(values: dict[str, Tensor] | None, revalidate: bool = False) -> KernelProblem:
        restore_rng_states(rng)
        return build_problem(
            model, inputs, create_graph=values is not None, batch_norm=batch_norm, values=values, revalidate=revalidate, **build
        )

    with preserved_state(model, batch_norm), explained_failures(model, "chunked"):
        problem = problem_for(None, revalidate=True)  # its q sizes the cotangents of every chunk
        # drawn once: every chunk and its recomputation slice the same probes
        cotangents = trace_cotangents(estimator, num_probes, generator)(problem)

    def value_of(start: int, values: dict[str, Tensor] | None) -> Tensor:
        with preserved_state(model, batch_norm), explained_failures(model, "chunked"):
            chunk_problem = problem if values is None else problem_for(values)
            restore_rng_states(rng)
            engine = engine_for(strategy, chunk_problem)
            return engine.row_sq_norms(chunk_problem, cotangents[start : start + chunk_size]).sum()

    starts = list(range(0, cotangents.shape[0], chunk_size))
    total = sum((value_of(s, None) for s in starts[1:]), value_of(0, None))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    value = _RecomputedChunks.apply(total, value_of, starts, [name for name, _ in named], *(p for _, p in named))
    return value, problem


def mgs_penalty(
    model: nn.Module,
    inputs: Inputs,
    *,
    kind: str = "trace",
    estimator: str = "exact",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    outputs: str = "full",
    params: ParamFilter = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    batch_norm: str = "eval",
    jitter: float = 0.0,
    logits: OutputSelector = None,
) -> Tensor:
    """g(K) as a scalar differentiable with respect to the model's parameters (double backward).

    ``kind="trace"``: g = tr K = Σ_i Σ_a ‖∇θ f_a(x_i)‖², from J's row norms only (K is never formed);
    ``estimator="hutchinson"`` replaces the exact sum by its unbiased Rademacher estimate with
    ``num_probes`` per-sample probes (see :func:`mgs_torch.mgs_trace`), cheaper by a factor ≈ q/num_probes.
    ``kind="logdet"``: g = log det(K + εI) via Cholesky (ε = ``jitter``, raised automatically with a
    one-time warning if K is numerically singular, so training never sees −∞).

    ``reduction="mean"`` (default) divides by N, the number of rows of K (n·q, or n with
    ``outputs="sum"``): the value is a per-row average, so the same α works across batch sizes and
    output counts. ``reduction="sum"`` returns g(K) itself (the paper's penalty; its α is α_mean/N).

    ``chunk_size`` bounds memory: for the trace, the graph of only ``chunk_size`` outputs (or probes)
    is alive at a time and is recomputed during ``backward`` (activation checkpointing: one extra
    forward and backward per chunk); for the log-determinant it bounds the kernel computation only.

    The other arguments are those of :func:`mgs_torch.mgs_kernel` (``inputs`` may be a mapping of keyword
    arguments, ``logits`` selects the raw outputs of a ``ModelOutput``/dict/tuple). The model's parameters, ``.grad``,
    train/eval flags, buffers and the global RNG are left untouched. Cost (structured engine, exact
    trace): one forward + one backward at batch q·n, and about twice that again for the double
    backward of ``loss.backward()`` — about a plain training step at batch q·n.

    On a GPU a whole training step with this penalty can be captured into a CUDA graph and replayed
    (:func:`mgs_torch.capture_step`): no host sync happens inside, the output NaN check is skipped while capturing,
    ``kind="logdet"`` then keeps ε = ``jitter`` and yields NaN where K + εI is not positive definite,
    and Hutchinson probes need ``generator=torch.Generator(device="cuda")``, passed to capture_step too.
    """
    opts = PenaltyOptions(outputs, params, strategy, chunk_size, dtype, batch_norm, kind, estimator, num_probes, reduction, jitter)
    dtype = opts.dtype
    generator = generator if generator is not None else default_generator()
    if kind == "trace" and chunk_size is not None:
        value, problem = _trace_in_chunks(
            model, inputs, strategy, estimator=estimator, num_probes=num_probes, generator=generator,
            chunk_size=chunk_size, batch_norm=batch_norm, build={"params": params, "dtype": dtype, "logits": logits},
        )
        if estimator == "hutchinson":
            value = value / num_probes
    else:

        def compute(problem: KernelProblem, engine) -> tuple[Tensor, KernelProblem]:
            if kind == "trace":
                return trace_from_rows(
                    problem, engine, estimator=estimator, num_probes=num_probes, generator=generator, chunk_size=chunk_size,
                ), problem
            return logdet_psd(engine.kernel(problem, outputs=outputs, chunk_size=chunk_size), jitter), problem

        value, problem = on_problem(model, inputs, opts, True, compute, logits=logits)
    if reduction == "mean":
        value = value / (problem.n * problem.q if outputs == "full" else problem.n)
    if not value.requires_grad and torch.is_grad_enabled():
        # g(K) does not depend on θ (a linear model: K = X Xᵀ ⊗ I + 1): its gradient is zero, and
        # value.backward() or autograd.grad(value, params) must say so rather than raise
        live = [t for t in problem.params.values() if t.requires_grad]
        if live:
            value = value + sum(t.reshape(-1)[0] for t in live) * 0.0
    return value
