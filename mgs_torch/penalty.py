"""The differentiable MGS penalty g(K) for ``loss = task_loss + alpha * mgs_penalty(model, x)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._compiled import compiling, run_eagerly
from ._costs import announced, warn_if_idle_chunk
from ._linalg import logdet_psd
from ._guards import preserved_state, restore_rng_states, rng_states
from ._problem import KernelProblem, build_problem
from ._io import OutputSelector
from ._validation import Inputs, ParamFilter, functional_model
from .engines import engine_for, structured
from .estimators import ESTIMATORS, KINDS, default_generator, trace_cotangents, trace_from_rows
from .op_fixes import explained_failures, transposed_convolutions_where_automatic
from .kernel import on_problem
from .options import REDUCTIONS, PenaltyOptions
from .self_check import checked_engine

__all__ = ["mgs_penalty", "default_generator", "KINDS", "ESTIMATORS", "REDUCTIONS"]


class _RecomputedChunks(torch.autograd.Function):
    """Σ_c value_c(t) whose backward rebuilds one chunk's graph at a time (activation checkpointing).

    ``value_of(start, leaves)`` returns the chunk starting at ``start`` as a function of ``leaves``,
    tensors standing for ``tensors`` (the parameters, then the inputs that carry a graph: the features
    of a backbone the penalised head sits on); the forward's total is passed in already computed.
    """

    @staticmethod
    def forward(ctx, total, value_of, starts, *tensors):
        ctx.value_of, ctx.starts = value_of, starts
        ctx.save_for_backward(*tensors)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total):
        tensors = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in tensors]
        for start in ctx.starts:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in tensors]
                value = ctx.value_of(start, leaves)
                if not value.requires_grad:  # this chunk does not depend on θ (a linear model): no contribution
                    continue
                for acc, g in zip(grads, torch.autograd.grad(value, leaves, allow_unused=True)):
                    if g is not None:
                        acc += g
        return (None, None, None, *(grad_total * g for g in grads))


def _tensors_in(inputs) -> list[Tensor]:
    """The tensors of ``inputs`` (a tensor, or a tuple, list or mapping of them), in order."""
    if isinstance(inputs, Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return [t for t in values if isinstance(t, Tensor)]


def _with_tensors(inputs, replace: dict[int, Tensor]):
    """``inputs`` with each tensor whose id is in ``replace`` swapped for its replacement."""
    swap = lambda t: replace.get(id(t), t) if isinstance(t, Tensor) else t  # noqa: E731
    if isinstance(inputs, Tensor):
        return swap(inputs)
    if isinstance(inputs, dict):
        return type(inputs)({k: swap(v) for k, v in inputs.items()})
    return type(inputs)(swap(t) for t in inputs) if isinstance(inputs, (tuple, list)) else inputs


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
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # inputs that carry a graph (features of a backbone): their gradient is recomputed chunk by chunk too
    live = list({id(t): t for t in _tensors_in(inputs) if t.requires_grad}.values())
    detached = _with_tensors(inputs, {id(t): t.detach() for t in live})

    def problem_for(leaves: list[Tensor] | None, revalidate: bool = False) -> KernelProblem:
        restore_rng_states(rng)
        if leaves is None:  # the graph-free pass: nothing may keep a graph alive (that is what chunking bounds)
            return build_problem(model, detached, batch_norm=batch_norm, revalidate=revalidate, **build)
        values = {name: leaf for (name, _), leaf in zip(named, leaves)}
        xs = _with_tensors(inputs, {id(t): leaf for t, leaf in zip(live, leaves[len(named):])})
        return build_problem(model, xs, create_graph=True, batch_norm=batch_norm, values=values, revalidate=revalidate, **build)

    with preserved_state(model, batch_norm), explained_failures(model, "chunked"):
        problem = problem_for(None, revalidate=True)  # its q sizes the cotangents of every chunk
        # one route for every chunk and its recomputation (all share the problem's signature), self-checked once
        engine = checked_engine(problem, engine_for(strategy, problem), kernel=False, gradient=True)
        restore_rng_states(rng)
        # drawn once: every chunk and its recomputation slice the same probes
        cotangents = trace_cotangents(estimator, num_probes, generator)(problem)
    warn_if_idle_chunk(chunk_size, cotangents.shape[0], "outputs" if estimator == "exact" else "probes")

    def value_of(start: int, leaves: list[Tensor] | None) -> Tensor:
        with preserved_state(model, batch_norm), explained_failures(model, "chunked"):
            chunk_problem = problem if leaves is None else problem_for(leaves)
            restore_rng_states(rng)
            return engine.row_sq_norms(chunk_problem, cotangents[start : start + chunk_size]).sum()

    starts = list(range(0, cotangents.shape[0], chunk_size))
    total = sum((value_of(s, None) for s in starts[1:]), value_of(0, None))
    value = _RecomputedChunks.apply(total, value_of, starts, *(p for _, p in named), *live)
    return value, problem


def _check_logdet_precision(model: nn.Module, dtype: torch.dtype | None) -> None:
    """log det K needs a Cholesky factor of K, which half precision neither offers nor resolves."""
    computed_in = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if computed_in in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"kind='logdet' needs K in float32 or float64, but it would be computed in {computed_in} (the model's "
            f"parameters): pass dtype=torch.float32 to compute K and its log-determinant in float32 from the "
            f"half-precision model (the gradient still reaches its parameters)"
        )


#: devices where the automatic state of :func:`~mgs_torch.op_fixes.use_transposed_convolution_backward` uses it
TRANSPOSED_CONVOLUTION_DEVICES: tuple[str, ...] = ("cuda",)


def _transposed_convolutions_pay(kind: str, estimator: str, engine, problem: KernelProblem) -> bool:
    """Where :func:`~mgs_torch.op_fixes.use_transposed_convolution_backward`'s automatic state switches it on: the
    exact trace penalty of the structured engine on a CUDA device, the only place it was measured faster
    (benchmarks/RESULTS.md, the H200 section of issue #22)."""
    return (
        kind == "trace" and estimator == "exact" and engine is structured
        and any(t.device.type in TRANSPOSED_CONVOLUTION_DEVICES for t in problem.params.values())
    )


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
    forward and backward per chunk); for the log-determinant it is :func:`mgs_torch.mgs_kernel`'s
    ``chunk_size`` (K, and on the jacobian route J, are held whole). A log-det of a K with more than
    4096 rows is announced once with its cost.

    The other arguments are those of :func:`mgs_torch.mgs_kernel` (``inputs`` may be a mapping of keyword
    arguments, ``logits`` selects the raw outputs of a ``ModelOutput``/dict/tuple). The model's parameters, ``.grad``,
    train/eval flags, buffers and the global RNG are left untouched. Cost (structured engine, exact
    trace): one forward + one backward at batch q·n, and about twice that again for the double
    backward of ``loss.backward()`` — about a plain training step at batch q·n.

    On a GPU a whole training step with this penalty can be captured into a CUDA graph and replayed
    (:func:`mgs_torch.capture_step`): no host sync happens inside, the output NaN check is skipped while capturing,
    ``kind="logdet"`` then keeps ε = ``jitter`` and yields NaN where K + εI is not positive definite,
    and Hutchinson probes need ``generator=torch.Generator(device="cuda")``, passed to capture_step too.
    Inside ``torch.compile`` it is traced into the step's graph on the reference engine (docs/costs.md, "A compiled
    training step"; :mod:`mgs_torch._compiled`).
    """
    opts = PenaltyOptions(outputs, params, strategy, chunk_size, dtype, batch_norm, kind, estimator, num_probes, reduction, jitter)
    dtype = opts.dtype
    if kind == "logdet":
        _check_logdet_precision(model, dtype)
    if generator is None and estimator == "hutchinson" and not compiling():  # traced: the graph's own random stream
        generator = default_generator()
    if kind == "trace" and chunk_size is not None:
        if compiling():  # each chunk's graph is rebuilt during backward (a Python callback): outside the traced graph
            return run_eagerly(mgs_penalty)(
                model, inputs, kind=kind, estimator=estimator, num_probes=num_probes, generator=generator,
                reduction=reduction, outputs=outputs, params=params, strategy=strategy, chunk_size=chunk_size, dtype=dtype,
                batch_norm=batch_norm, jitter=jitter, logits=logits,
            )
        value, problem = _trace_in_chunks(
            model, inputs, strategy, estimator=estimator, num_probes=num_probes, generator=generator,
            chunk_size=chunk_size, batch_norm=batch_norm, build={"params": params, "dtype": dtype, "logits": logits},
        )
        if estimator == "hutchinson":
            value = value / num_probes
    else:

        def compute(problem: KernelProblem, engine) -> tuple[Tensor, KernelProblem]:
            automatic = transposed_convolutions_where_automatic(_transposed_convolutions_pay(kind, estimator, engine, problem))
            with announced(problem, engine, what=kind, outputs=outputs, chunk_size=chunk_size), automatic:
                if kind == "trace":
                    return trace_from_rows(
                        problem, engine, estimator=estimator, num_probes=num_probes, generator=generator, chunk_size=chunk_size,
                    ), problem
                return logdet_psd(engine.kernel(problem, outputs=outputs, chunk_size=chunk_size), jitter), problem

        value, problem = on_problem(model, inputs, opts, True, compute, kernel=kind == "logdet", logits=logits)
    if reduction == "mean":
        value = value / (problem.n * problem.q if outputs == "full" else problem.n)
    if not value.requires_grad and torch.is_grad_enabled():
        # g(K) does not depend on θ (a linear model: K = X Xᵀ ⊗ I + 1): its gradient is zero, and
        # value.backward() or autograd.grad(value, params) must say so rather than raise
        live = [t for t in problem.params.values() if t.requires_grad]
        if live:
            value = value + sum(t.reshape(-1)[0] for t in live) * 0.0
    return value
