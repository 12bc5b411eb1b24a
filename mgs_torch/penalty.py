"""The differentiable MGS penalty g(K) for ``loss = task_loss + alpha * mgs_penalty(model, x)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._linalg import logdet_psd
from ._problem import OUTPUT_MODES, Inputs, ParamFilter, build_problem, preserved_state
from .kernel import _check_choice, _check_chunk, engine_for, trace_from_rows

__all__ = ["mgs_penalty", "default_generator", "KINDS", "ESTIMATORS", "REDUCTIONS"]

KINDS = ("trace", "logdet")
ESTIMATORS = ("exact", "hutchinson")
REDUCTIONS = ("mean", "sum")

_default_generator: torch.Generator | None = None


def default_generator() -> torch.Generator:
    """mgs_torch's own CPU generator for Hutchinson probes (seeded with 0 on first use).

    Probes never come from the global RNG, so adding a penalty does not change a seeded run's data
    order or Dropout masks. Pass ``generator=`` for your own stream.
    """
    global _default_generator
    if _default_generator is None:
        _default_generator = torch.Generator().manual_seed(0)
    return _default_generator


def _check_estimator(kind: str, estimator: str, num_probes: int) -> None:
    _check_choice("kind", kind, KINDS)
    _check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "hutchinson" and kind != "trace":
        raise ValueError("estimator='hutchinson' estimates the trace only; use kind='trace' or estimator='exact'")
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")


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

    The other arguments are those of :func:`mgs_torch.mgs_kernel`. The model's parameters, ``.grad``,
    train/eval flags, buffers and the global RNG are left untouched. Cost (structured engine, exact
    trace): one forward + one backward at batch q·n, and about twice that again for the double
    backward of ``loss.backward()`` — about a plain training step at batch q·n.
    """
    _check_estimator(kind, estimator, num_probes)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("outputs", outputs, OUTPUT_MODES)
    _check_chunk(chunk_size)
    engine = engine_for(strategy)
    with preserved_state(model, batch_norm):
        problem = build_problem(model, inputs, params=params, dtype=dtype, create_graph=True, batch_norm=batch_norm)
        if kind == "trace":
            value = trace_from_rows(
                problem, engine, estimator=estimator, num_probes=num_probes,
                generator=generator if generator is not None else default_generator(), chunk_size=chunk_size,
            )
        else:
            K = engine.kernel(problem, outputs=outputs, chunk_size=chunk_size)
            value = logdet_psd(K, jitter)
    if reduction == "mean":
        value = value / (problem.n * problem.q if outputs == "full" else problem.n)
    return value
