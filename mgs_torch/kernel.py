"""The MGS kernel K = J Jᵀ of a mini-batch and its trace.

J is the Jacobian of all n·q raw outputs (logits) of the batch with respect to the trainable
parameters (p columns); K[(i,a),(j,b)] = ∇θ f_a(x_i) · ∇θ f_b(x_j), rows ordered sample-major.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ._problem import OUTPUT_MODES, Inputs, KernelProblem, ParamFilter, build_problem, one_hot_cotangents, preserved_state
from .engines import ENGINES, STRATEGIES
from .op_fixes import explained_failures

__all__ = ["mgs_kernel", "mgs_trace", "rademacher_probes"]


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def engine_for(strategy: str):
    """The engine module for ``strategy``; ``"auto"`` is the structured engine.

    Why auto needs no run-time estimate: the structured engine costs one forward, one backward at
    batch q·n and per-layer Gram products of cost ≤ the layer's share of the reference's (n·q)²·p
    contraction, while the reference needs n·q per-sample backward passes *and* that contraction;
    and the structured engine hands each parameter it cannot cover exactly to the reference.
    """
    _check_choice("strategy", strategy, STRATEGIES)
    return ENGINES["structured" if strategy == "auto" else strategy]


def rademacher_probes(num_probes: int, n: int, q: int, generator: torch.Generator | None, device) -> Tensor:
    """Independent ±1 entries, shape (num_probes, n, q), drawn on the generator's device."""
    gen_device = generator.device if generator is not None else "cpu"
    bits = torch.randint(0, 2, (num_probes, n, q), generator=generator, device=gen_device)
    return (2.0 * bits - 1.0).to(device)


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
) -> Tensor:
    """The MGS kernel of one mini-batch: K = J Jᵀ with J = ∂ f(X) / ∂θ.

    ``outputs="full"``: K[(i,a),(j,b)] = ∇θ f_a(x_i)·∇θ f_b(x_j), shape (n·q, n·q), row i·q + a.
    ``outputs="sum"``: Σ_a K[(i,a),(j,a)], shape (n, n) — neural-tangents' ``trace_axes=(-1,)``;
    it has the same trace as the full kernel.

    Args:
        model: any ``nn.Module`` returning raw outputs of shape (n,), (n, q) or (n, *shape) (flattened).
        inputs: a tensor or a tuple of tensors (``model(*inputs)``), batch on dim 0; moved to the
            model's device.
        params: restrict J's columns: parameter names, name prefixes, submodules, parameter objects,
            or a callable ``(name, param) -> bool``. Default: every parameter with ``requires_grad``.
        strategy: ``"structured"`` (per-layer Gram products, falling back per parameter to the
            reference), ``"jacobian"`` (the reference: ``vmap(jacrev)`` contraction) or ``"auto"``.
        chunk_size: bound memory: samples (reference) or output cotangents (structured) processed at once.
        dtype: compute in this dtype (e.g. ``torch.float64`` for stable log-determinants).
        batch_norm: ``"eval"`` (default) evaluates BatchNorm with its running statistics, so every
            sample has its own well-defined Jacobian; ``"batch"`` keeps train-mode BatchNorm on batch
            statistics and returns the Jacobian of the whole-batch function (samples interact; the
            reference's whole-batch route, n times costlier). Running statistics never move.
        create_graph: return K differentiable with respect to the parameters (for penalties).

    Dropout in train mode draws an independent mask per sample from a fork of the global RNG (which
    is left as it was); call ``model.eval()`` first for the kernel of the deterministic network.

    Cost: structured ≈ one forward + one backward at batch q·n + per-layer Grams; reference:
    n·q per-sample backward passes, n·q·p memory for J, (n·q)²·p for the contraction.
    """
    _check_choice("outputs", outputs, OUTPUT_MODES)
    _check_chunk(chunk_size)
    engine = engine_for(strategy)
    with preserved_state(model, batch_norm), explained_failures(model, strategy):
        problem = build_problem(model, inputs, params=params, dtype=dtype, create_graph=create_graph, batch_norm=batch_norm)
        return engine.kernel(problem, outputs=outputs, chunk_size=chunk_size)


def trace_cotangents(estimator: str, num_probes: int, generator: torch.Generator | None) -> Callable[[KernelProblem], Tensor]:
    """The cotangents whose row norms sum to tr K: one-hot outputs (exact, k = q) or ``num_probes``
    per-sample Rademacher probes (Hutchinson), built once the problem's q is known."""
    if estimator == "exact":
        return one_hot_cotangents

    def probes(problem: KernelProblem) -> Tensor:
        return rademacher_probes(num_probes, problem.n, problem.q, generator, problem.inputs[0].device)

    return probes


def trace_from_rows(
    problem: KernelProblem,
    engine,
    *,
    estimator: str,
    num_probes: int,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> Tensor:
    """tr K, exactly (Σ of K's diagonal) or by Hutchinson's estimator.

    Hutchinson (per-sample Rademacher probes v ∈ {±1}^{n×q}): tr K = E_v Σ_i ‖Σ_a v_ia ∇θ f_a(x_i)‖²,
    unbiased since E[v_ia v_ib] = δ_ab; averaged over ``num_probes`` probes. Costs one backward at
    batch num_probes·n instead of q·n.
    """
    cotangents = trace_cotangents(estimator, num_probes, generator)
    total = engine.row_sq_norms(problem, cotangents, chunk_size=chunk_size).sum()
    return total / num_probes if estimator == "hutchinson" else total


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
) -> Tensor:
    """tr K = Σ_i Σ_a ‖∇θ f_a(x_i)‖² without forming K (only the squared norms of J's rows).

    ``estimator="hutchinson"`` uses ``num_probes`` Rademacher probes drawn from ``generator``
    (default: :func:`mgs_torch.penalty.default_generator`, never the global RNG). Other arguments
    as in :func:`mgs_kernel`. Cost (structured): one forward and one backward at batch q·n
    (exact) or num_probes·n (Hutchinson), plus per-layer norms.
    """
    from .penalty import _check_estimator, default_generator

    _check_estimator("trace", estimator, num_probes)
    _check_chunk(chunk_size)
    engine = engine_for(strategy)
    with preserved_state(model, batch_norm), explained_failures(model, strategy):
        problem = build_problem(model, inputs, params=params, dtype=dtype, create_graph=create_graph, batch_norm=batch_norm)
        return trace_from_rows(
            problem, engine, estimator=estimator, num_probes=num_probes,
            generator=generator if generator is not None else default_generator(), chunk_size=chunk_size,
        )
