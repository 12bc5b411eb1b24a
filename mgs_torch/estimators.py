"""tr K from the squared norms of J's rows: exact (one-hot cotangents) or Hutchinson (random probes).

tr K = Σ_i Σ_a ‖∇θ f_a(x_i)‖². Hutchinson with per-sample Rademacher probes v ∈ {±1}^{n×q}:
tr K = E_v Σ_i ‖Σ_a v_ia ∇θ f_a(x_i)‖², unbiased since E[v_ia v_ib] = δ_ab. Probes come from a
``torch.Generator`` (mgs_torch's own by default), never from the global random state.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._guards import capturing_cuda_graph
from ._problem import KernelProblem, one_hot_cotangents

__all__ = ["KINDS", "ESTIMATORS", "default_generator", "rademacher_probes", "trace_cotangents", "trace_from_rows"]

KINDS = ("trace", "logdet")
ESTIMATORS = ("exact", "hutchinson")

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


def rademacher_probes(num_probes: int, n: int, q: int, generator: torch.Generator | None, device) -> Tensor:
    """Independent ±1 entries, shape (num_probes, n, q), drawn on the generator's device; without a generator (a call
    traced by torch.compile, see :mod:`mgs_torch._compiled`) from the global random stream, on ``device``."""
    gen_device = generator.device if generator is not None else torch.device(device)
    if gen_device.type != "cuda" and capturing_cuda_graph(device):
        raise RuntimeError(
            "Hutchinson probes from a CPU generator cannot be captured into a CUDA graph (a replay would "
            "not draw new ones): pass generator=torch.Generator(device='cuda') to mgs_penalty and the same "
            "generator to mgs_torch.capture_step(step, generators=[generator]) (or register it yourself "
            "with graph.register_generator_state before capturing)"
        )
    bits = torch.randint(0, 2, (num_probes, n, q), generator=generator, device=gen_device)
    return (2.0 * bits - 1.0).to(device)


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
    """tr K, exactly (Σ of K's diagonal) or by Hutchinson's estimator averaged over ``num_probes``.

    Cost: one backward at batch q·n (exact) or num_probes·n (Hutchinson).
    """
    cotangents = trace_cotangents(estimator, num_probes, generator)
    total = engine.row_sq_norms(problem, cotangents, chunk_size=chunk_size).sum()
    return total / num_probes if estimator == "hutchinson" else total
