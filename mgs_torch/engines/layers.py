"""Per-layer rules for the structured engine (the BackPACK-extension / Opacus-grad-sampler pattern).

A rule knows how one layer type uses its parameters. During the forward it captures what it needs
from the layer's input (:meth:`LayerRule.capture`); given the gradients of k output cotangents with
respect to the layer's output, it returns each parameter's per-sample gradients in factored form
(:meth:`LayerRule.factors`). Rules are looked up by *exact* type, so a subclass that overrides
``forward`` is never mistaken for its parent; anything without a rule is computed by the reference
engine. Register your own with :func:`register_layer_rule`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..op_fixes import same_padding_amounts
from .factors import ConvFactor, DirectFactor, IndexOuterFactor, OuterFactor

class Factor(Protocol):
    """One parameter's per-sample gradients in factored form (see :mod:`mgs_torch.engines.factors`)."""

    def row_sq_norms(self) -> Tensor:
        """‖G_ki‖² for every cotangent k and sample i: (k, n)."""

    def kernel(self, outputs: str) -> Tensor:
        """Σ over the parameter of G_ki·G_lj: (n·k)² rows ordered (sample, cotangent), or n² summed over k."""


class LayerRule:
    """Base class: how a layer type's parameters enter its output.

    Subclasses set ``params`` (the parameter names they cover) and implement ``capture`` and
    ``factors``; ``unsupported`` returns a reason when a particular module's configuration is not
    covered (its parameters then go to the reference engine).
    """

    params: tuple[str, ...] = ("weight", "bias")
    #: True when the rule treats every leading dimension of the layer's input as a position sharing
    #: the parameters (Linear, LayerNorm, Embedding): a sample may then reach the layer as several
    #: rows. False (the default): the rule needs each sample as exactly one row, shaped (n, *per_sample).
    leading_dims_are_positions: bool = False

    def unsupported(self, module: nn.Module) -> str | None:
        return None

    def capture(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Tensors to keep from the forward (called inside the layer's forward hook)."""
        return (inputs[0],)

    def output(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """The layer's output as the engine differentiates it; override with an equivalent
        expression whose (double) backward is cheaper than the module's own."""
        return output

    def factors(self, module: nn.Module, saved: tuple[Tensor, ...], grad: Tensor, names: set[str]) -> dict[str, Factor]:
        """Per-sample gradient factors for ``names`` given ``grad`` = ∂(c·f)/∂output, shape (k, n, *out)."""
        raise NotImplementedError


def _sum_positions(t: Tensor) -> Tensor:
    """(k, n, C, *positions) -> (k, n, C): sum over the positions sharing a per-channel parameter."""
    return t.reshape(*t.shape[:3], -1).sum(-1)


class LinearRule(LayerRule):
    """y = x Wᵀ + b on (n, *, I): grad W = Σ_t g_t a_tᵀ over the * positions, grad b = Σ_t g_t;
    together, grad [W b] = Σ_t g_t [a_t 1]ᵀ."""

    leading_dims_are_positions = True

    def factors(self, module, saved, grad, names):
        (a,) = saved
        k, n = grad.shape[:2]
        g = grad.reshape(k, n, 1, -1, grad.shape[-1])
        a = a.reshape(n, 1, -1, a.shape[-1])
        if {"weight", "bias"} <= names:  # [W b] acts on [a 1]: one factor, one Gram instead of two
            return {"weight+bias": OuterFactor(torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1), g)}
        out = {}
        if "weight" in names:
            out["weight"] = OuterFactor(a, g)
        if "bias" in names:
            out["bias"] = DirectFactor(g.sum(3).squeeze(2))
        return out


def _conv_same_padding(module: nn.Module) -> list[int]:
    """F.pad amounts (last dim first) that reproduce padding='same'/'valid' for an unfold."""
    if module.padding == "same":
        return same_padding_amounts(module.dilation, module.kernel_size)
    return [0] * (2 * len(module.kernel_size))


class ConvRule(LayerRule):
    """Conv1d/2d/3d: the weight acts on input patches a_t as a linear map shared over positions t."""

    def capture(self, module, inputs):
        a = inputs[0]
        if module.padding_mode != "zeros":
            a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        elif isinstance(module.padding, str):
            a = F.pad(a, _conv_same_padding(module))
        return (a,)

    def factors(self, module, saved, grad, names):
        (a,) = saved
        out = {}
        if "weight" in names:
            explicit = module.padding_mode == "zeros" and not isinstance(module.padding, str)
            padding = tuple(module.padding) if explicit else (0,) * len(module.kernel_size)
            out["weight"] = ConvFactor(a, grad, module.kernel_size, module.stride, padding, module.dilation, module.groups)
        if "bias" in names:
            out["bias"] = DirectFactor(_sum_positions(grad))
        return out


class AffineNormRule(LayerRule):
    """Base of the normalisation rules: y = γ ⊙ x̂ + β with x̂ captured by ``capture``.

    The per-sample gradients are ∂/∂γ = Σ_t g_t ⊙ x̂_t and ∂/∂β = Σ_t g_t over the positions t that
    share an affine entry; subclasses say how a gradient is reduced to the parameter's shape.
    """

    def per_parameter(self, module, t: Tensor) -> Tensor:
        """(k, n, *out) -> (k, n, P): sum over the positions that share each affine entry."""
        return _sum_positions(t)  # channels on dim 2 (BatchNorm, GroupNorm)

    def factors(self, module, saved, grad, names):
        (xhat,) = saved
        out = {}
        if "weight" in names:
            out["weight"] = DirectFactor(self.per_parameter(module, grad * xhat))
        if "bias" in names:
            out["bias"] = DirectFactor(self.per_parameter(module, grad))
        return out


class BatchNormRule(AffineNormRule):
    """BatchNorm with running statistics (eval mode): y = γ x̂ + β, x̂ = (x − μ)/√(σ² + ε) per channel."""

    def unsupported(self, module):
        if module.training or module.running_mean is None:
            return "batch statistics couple the samples"
        return None

    @staticmethod
    def _scale_shift(module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv_std = torch.rsqrt(module.running_var + module.eps)
        return shape, inv_std, module.running_mean

    def capture(self, module, inputs):
        x = inputs[0]
        shape, inv_std, mean = self._scale_shift(module, x)
        return ((x - mean.view(shape)) * inv_std.view(shape),)

    def output(self, module, inputs, output):
        # y = x·s + b with s = γ/√(σ²+ε), b = β − μ·s: the same values as the module's eval forward,
        # but its backward is a multiply instead of native_batch_norm_backward (several times slower)
        x = inputs[0]
        shape, inv_std, mean = self._scale_shift(module, x)
        scale = inv_std if module.weight is None else module.weight * inv_std
        shift = -mean * scale if module.bias is None else module.bias - mean * scale
        return x * scale.view(shape) + shift.view(shape)


class LayerNormRule(AffineNormRule):
    """LayerNorm: y = γ ⊙ x̂ + β over the normalised trailing dims, summed over leading positions."""

    leading_dims_are_positions = True

    def capture(self, module, inputs):
        return (F.layer_norm(inputs[0], module.normalized_shape, None, None, module.eps),)

    def per_parameter(self, module, t):
        k, n = t.shape[:2]
        return t.reshape(k, n, -1, math.prod(module.normalized_shape)).sum(2)


class GroupNormRule(AffineNormRule):
    """GroupNorm: y = γ_c x̂ + β_c, x̂ normalised per sample and group; summed over spatial positions."""

    def capture(self, module, inputs):
        return (F.group_norm(inputs[0], module.num_groups, None, None, module.eps),)


class EmbeddingRule(LayerRule):
    """Embedding: row idx_t of W gets g_t, so ⟨G_i, G_j⟩ = Σ_{t,s} [idx_it = idx_js] g_it·g_js."""

    params = ("weight",)
    leading_dims_are_positions = True

    def unsupported(self, module):
        if module.max_norm is not None:
            return "max_norm renormalises the weight in place during forward"
        return None

    def capture(self, module, inputs):
        return (inputs[0],)

    def factors(self, module, saved, grad, names):
        (idx,) = saved
        k, n = grad.shape[:2]
        D = grad.shape[-1]
        idx = idx.reshape(n, 1, -1)
        g = grad.reshape(k, n, 1, -1, D)
        if module.padding_idx is not None:  # the padding row receives no gradient
            g = g * (idx != module.padding_idx).unsqueeze(0).unsqueeze(-1).to(g.dtype)
        return {"weight": IndexOuterFactor(idx, g, module.num_embeddings)}


class RuleRegistry(dict):
    """Module type -> :class:`LayerRule`, with a version that changes whenever an entry does, so
    that cached structured plans are rebuilt at once after a registration or removal."""

    version = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        type(self).version += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        type(self).version += 1

    def pop(self, key, *default):
        out = super().pop(key, *default)
        type(self).version += 1
        return out


LAYER_RULES: RuleRegistry = RuleRegistry({
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.Embedding: EmbeddingRule(),
})


def _check_type(module_type) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")


def register_layer_rule(module_type: type, rule: LayerRule | None = None):
    """Teach the structured engine a layer type (matched exactly, not by subclass); takes effect at once.

    The rule must be exact for the way the type's ``forward`` uses its parameters; the engine checks
    that they are used nowhere else, that the layer runs once per sample, and ``mgs_torch.verify``
    compares the result with the per-sample reference. Used as a decorator on a rule class,
    ``@register_layer_rule(MyLayer)`` registers an instance of it. Remove with
    :func:`unregister_layer_rule`, or register for a block only with :func:`layer_rule`.
    """
    _check_type(module_type)
    if rule is None:
        def decorate(rule_cls):
            register_layer_rule(module_type, rule_cls())
            return rule_cls
        return decorate
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a LayerRule instance, got {type(rule).__name__}")
    LAYER_RULES[module_type] = rule
    return rule


def unregister_layer_rule(module_type: type) -> LayerRule:
    """Remove the rule for ``module_type`` (its parameters then go to the reference engine); returns it."""
    _check_type(module_type)
    if module_type not in LAYER_RULES:
        raise KeyError(f"no layer rule is registered for {module_type.__name__}")
    return LAYER_RULES.pop(module_type)


@contextlib.contextmanager
def layer_rule(module_type: type, rule: LayerRule | None) -> Iterator[None]:
    """Use ``rule`` for ``module_type`` inside the block (``None``: no rule), restoring the registry after."""
    _check_type(module_type)
    missing = object()
    old = LAYER_RULES.get(module_type, missing)
    try:
        if rule is None:
            if old is not missing:
                LAYER_RULES.pop(module_type)
        else:
            register_layer_rule(module_type, rule)
        yield
    finally:
        if old is missing:
            if module_type in LAYER_RULES:
                LAYER_RULES.pop(module_type)
        else:
            LAYER_RULES[module_type] = old
