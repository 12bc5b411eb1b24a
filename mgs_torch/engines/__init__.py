"""Kernel engines, chosen by :class:`Strategy`. Each satisfies the :class:`Engine` protocol:

* ``kernel(problem, *, outputs, chunk_size) -> Tensor`` — K, (n·q)² or n² with ``outputs="sum"``;
* ``row_sq_norms(problem, cotangents, *, chunk_size) -> Tensor`` — ‖Σ_a c[k,i,a] ∇θ f_a(x_i)‖², (k, n).

``jacobian`` is the reference (torch.func Jacobian contraction, any module); ``structured`` sums
per-layer Gram products; the parameters no rule covers get their per-sample gradients from autograd in the
same pass ("parameter taps"). ``auto`` looks at the structured plan: when layer rules cover at least half of
the selected parameters' entries it uses the structured engine, otherwise the reference (per-sample
gradients of most of the parameters cost what the reference costs, without the layers' Gram shortcuts).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from torch import Tensor

from .._problem import Cotangents, KernelProblem
from . import jacobian, structured
from .layers import LAYER_RULES, LayerRule, layer_rule, register_layer_rule, unregister_layer_rule


class Strategy(str, Enum):
    AUTO = "auto"
    JACOBIAN = "jacobian"
    STRUCTURED = "structured"


class Engine(Protocol):
    def kernel(self, problem: KernelProblem, *, outputs: str = "full", chunk_size: int | None = None) -> Tensor: ...

    def row_sq_norms(self, problem: KernelProblem, cotangents: Cotangents, *, chunk_size: int | None = None) -> Tensor: ...


ENGINES: dict[str, Engine] = {Strategy.JACOBIAN.value: jacobian, Strategy.STRUCTURED.value: structured}
STRATEGIES = tuple(s.value for s in Strategy)

#: ``auto`` uses the structured engine when its rules cover at least this share of the parameter entries
AUTO_MIN_COVERED = 0.5


def engine_for(strategy: str | Strategy, problem: KernelProblem | None = None) -> Engine:
    """The engine for ``strategy``; ``"auto"`` decides from ``problem``'s structured plan (see module doc)."""
    strategy = Strategy(strategy).value if isinstance(strategy, Strategy) else strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != Strategy.AUTO.value:
        return ENGINES[strategy]
    if problem is None or not problem.per_sample:
        return structured
    plan = structured.cached_plan(problem)[0]
    total = sum(t.numel() for t in problem.params.values())
    covered = total - sum(problem.params[k].numel() for k in plan.fallback)
    return structured if covered >= AUTO_MIN_COVERED * total else jacobian


__all__ = [
    "ENGINES", "STRATEGIES", "Strategy", "Engine", "engine_for", "AUTO_MIN_COVERED", "LAYER_RULES", "LayerRule",
    "register_layer_rule", "unregister_layer_rule", "layer_rule", "jacobian", "structured",
]
