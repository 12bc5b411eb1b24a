"""Kernel engines. Each exposes the same two functions over a :class:`~mgs_torch._problem.KernelProblem`:

* ``kernel(problem, *, outputs, chunk_size) -> Tensor`` — K, (n·q)² or n² with ``outputs="sum"``;
* ``row_sq_norms(problem, cotangents, *, chunk_size) -> Tensor`` — ‖Σ_a c[k,i,a] ∇θ f_a(x_i)‖², (k, n).

``jacobian`` is the reference (torch.func Jacobian contraction, any module); ``structured`` sums
per-layer Gram products and falls back to the reference per parameter.
"""

from . import jacobian, structured
from .layers import LAYER_RULES, LayerRule, layer_rule, register_layer_rule, unregister_layer_rule

ENGINES = {"jacobian": jacobian, "structured": structured}
STRATEGIES = ("auto", *ENGINES)

__all__ = [
    "ENGINES", "STRATEGIES", "LAYER_RULES", "LayerRule", "register_layer_rule", "unregister_layer_rule", "layer_rule",
    "jacobian", "structured",
]
