"""The MGS kernel K = J Jᵀ of a mini-batch and its trace.

J is the Jacobian of all n·q raw outputs (logits) of the batch with respect to the trainable
parameters (p columns); K[(i,a),(j,b)] = ∇θ f_a(x_i) · ∇θ f_b(x_j), rows ordered sample-major.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._compiled import compiling, eager_reason, run_eagerly, traced_problem, traced_state
from ._costs import announced
from ._guards import preserved_state
from ._problem import build_problem, with_fresh_outputs

from ._io import OutputSelector
from ._validation import Inputs, ParamFilter, functional_model
from .engines import engine_for, jacobian
from .estimators import default_generator, trace_from_rows
from .op_fixes import explained_failures
from .options import KernelOptions, PenaltyOptions
from .self_check import checked_engine

__all__ = ["mgs_kernel", "mgs_trace"]


def mgs_kernel(
    model: nn.Module,
    inputs: Inputs,
    *,
    outputs: str = "full",
    params: ParamFilter = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    batch_norm: str = "eval",
    create_graph: bool = False,
    logits: OutputSelector = None,
) -> Tensor:
    """The MGS kernel of one mini-batch: K = J Jᵀ with J = ∂ f(X) / ∂θ.

    ``outputs="full"``: K[(i,a),(j,b)] = ∇θ f_a(x_i)·∇θ f_b(x_j), shape (n·q, n·q), row i·q + a.
    ``outputs="sum"``: Σ_a K[(i,a),(j,a)], shape (n, n) — neural-tangents' ``trace_axes=(-1,)``;
    it has the same trace as the full kernel.

    Args:
        model: any ``nn.Module`` returning raw outputs of shape (n,), (n, q) or (n, *shape) (flattened),
            or a ``ModelOutput``/dict/tuple holding them (see ``logits``).
        inputs: a tensor, a tuple of tensors (``model(*inputs)``) or a mapping of keyword arguments
            (``model(**inputs)``: a tokenizer's or data collator's dict; its tensors need the batch on
            dim 0, other values are passed unchanged), batch on dim 0; moved to the model's device.
        params: restrict J's columns: parameter names, name prefixes, submodules, parameter objects,
            or a callable ``(name, param) -> bool``. Default: every parameter with ``requires_grad``.
        strategy: ``"structured"`` (per-layer Gram products, falling back per parameter to the
            reference), ``"jacobian"`` (the reference: ``vmap(jacrev)`` contraction) or ``"auto"``.
        chunk_size: how many output cotangents (structured) or samples (reference; rows of J on its
            whole-batch route) are processed at once: it bounds the working memory of the backward
            passes. K itself (N² numbers) is always formed, and the reference also holds all of J
            (n·q·p numbers); a value that splits nothing is reported once.
        dtype: compute in this dtype (e.g. ``torch.float64`` for stable log-determinants).
        batch_norm: ``"eval"`` (default) evaluates BatchNorm with its running statistics, so every
            sample has its own well-defined Jacobian; ``"batch"`` keeps train-mode BatchNorm on batch
            statistics and returns the Jacobian of the whole-batch function (samples interact; the
            reference's whole-batch route, n times costlier). Running statistics never move.
            The same holds for any model whose samples interact (an op over the batch dimension):
            the first call compares ``model(X)`` with each sample run alone and warns under
            ``"eval"``; under ``"batch"`` such models get the whole-batch Jacobian.
        create_graph: return K differentiable with respect to the parameters (for penalties).
        logits: where the raw outputs are in what the model returns. ``None``: a tensor as it is, or
            the ``"logits"`` entry of a Hugging Face ``ModelOutput`` or dict. A key or attribute name
            (``"start_logits"``), a tuple index (``0``), or a callable ``out -> Tensor`` or ``(out,
            inputs) -> Tensor`` (called per sample on the same inputs; e.g.
            :func:`mgs_torch.hf.next_token_logits` for language models).

    Dropout in train mode draws an independent mask per sample from a fork of the global RNG (which
    is left as it was); call ``model.eval()`` first for the kernel of the deterministic network.

    Cost: structured ≈ one forward + one backward at batch q·n + per-layer Grams; reference:
    n·q per-sample backward passes, n·q·p memory for J, (n·q)²·p for the contraction. A K of more
    than ``mgs_torch._costs.LARGE_KERNEL_ROWS`` (4096) rows is announced once with its cost, and
    running out of memory raises ``torch.OutOfMemoryError`` saying what the call holds and what to set.
    """
    opts = KernelOptions(outputs, params, strategy, chunk_size, dtype, batch_norm)

    def compute(problem, engine):
        with announced(problem, engine, what="kernel", outputs=outputs, chunk_size=chunk_size):
            return engine.kernel(problem, outputs=outputs, chunk_size=chunk_size)

    return on_problem(model, inputs, opts, create_graph, compute, kernel=True, logits=logits)


def mgs_trace(
    model: nn.Module,
    inputs: Inputs,
    *,
    estimator: str = "exact",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    params: ParamFilter = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    batch_norm: str = "eval",
    create_graph: bool = False,
    logits: OutputSelector = None,
) -> Tensor:
    """tr K = Σ_i Σ_a ‖∇θ f_a(x_i)‖² without forming K (only the squared norms of J's rows).

    ``estimator="hutchinson"`` uses ``num_probes`` Rademacher probes drawn from ``generator``
    (default: :func:`mgs_torch.estimators.default_generator`, never the global RNG). Other arguments
    as in :func:`mgs_kernel` (``logits`` included). Cost (structured): one forward and one backward at batch q·n
    (exact) or num_probes·n (Hutchinson), plus per-layer norms.
    """
    opts = PenaltyOptions(params=params, strategy=strategy, chunk_size=chunk_size, dtype=dtype, batch_norm=batch_norm,
                          estimator=estimator, num_probes=num_probes)
    if generator is None and estimator == "hutchinson" and not compiling():  # traced: the graph's own random stream
        generator = default_generator()

    def compute(problem, engine):
        cotangents = problem.q if estimator == "exact" else num_probes
        with announced(problem, engine, what="trace", chunk_size=chunk_size, cotangents=cotangents):
            return trace_from_rows(
                problem, engine, estimator=estimator, num_probes=num_probes, generator=generator, chunk_size=chunk_size
            )

    return on_problem(model, inputs, opts, create_graph, compute, logits=logits)


def on_problem(
    model: nn.Module, inputs: Inputs, opts: KernelOptions, create_graph: bool, compute, *, kernel: bool = False,
    logits: OutputSelector = None,
):
    """``compute(problem, engine)`` on the validated problem of one call, without side effects.

    The shared shape of every entry point: guards (:func:`~mgs_torch._guards.preserved_state`),
    raw torch.func failures explained, a rebuild with a fresh validation forward if an engine
    finds the cached output shape stale, and the engine's route self-checked on first use
    (:mod:`mgs_torch.self_check`; ``kernel``: the computation forms K, so its cross-sample entries are checked
    too; ``create_graph``: the penalty gradient as well).
    """

    model = functional_model(model)
    if compiling() and eager_reason(model, opts.batch_norm, opts.strategy) is not None:
        return run_eagerly(on_problem)(model, inputs, opts, create_graph, compute, kernel=kernel, logits=logits)
    if compiling():  # torch.compile traces this call: the route a graph can hold (see mgs_torch._compiled)
        with traced_state(model, opts.batch_norm):
            problem = traced_problem(model, inputs, params=opts.params, dtype=opts.dtype, create_graph=create_graph,
                                     batch_norm=opts.batch_norm, logits=logits)
            return compute(problem, jacobian)

    def attempt(revalidate: bool):
        problem = build_problem(
            model, inputs, params=opts.params, dtype=opts.dtype, create_graph=create_graph, batch_norm=opts.batch_norm,
            revalidate=revalidate, logits=logits,
        )
        engine = checked_engine(problem, engine_for(opts.strategy, problem), kernel=kernel, gradient=create_graph)
        return compute(problem, engine)

    with preserved_state(model, opts.batch_norm), explained_failures(model, opts.strategy):
        return with_fresh_outputs(model, attempt)
