"""Per-layer rules for the structured engine (the BackPACK-extension / Opacus-grad-sampler pattern).

A rule knows how one layer type uses its parameters. During the forward it captures what it needs
from the layer's input (:meth:`LayerRule.capture`); given the gradients of k output cotangents with
respect to the layer's output, it returns each parameter's per-sample gradients in factored form
(:meth:`LayerRule.factors`). A rule may instead tap several points inside the layer
(:meth:`LayerRule.tap_shapes`, :meth:`LayerRule.tapped`: :class:`MultiheadAttentionRule` taps its input and
output projections). Rules are looked up by *exact* type, so a subclass that overrides
``forward`` is never mistaken for its parent; anything without a rule is computed by the reference
engine. Register your own with :func:`register_layer_rule`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _walk
from ..op_fixes import same_padding_amounts
from .factors import ConvFactor, DirectFactor, IndexOuterFactor, OuterFactor

class Factor(Protocol):
    """One parameter's per-sample gradients in factored form (see :mod:`mgs_torch.engines.factors`)."""

    def row_sq_norms(self) -> Tensor:
        """‖G_ki‖² for every cotangent k and sample i: (k, n)."""

    def kernel(self, outputs: str) -> Tensor:
        """Σ over the parameter of G_ki·G_lj: (n·k)² rows ordered (sample, cotangent), or n² summed over k."""


def _layer_input(args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
    return args if args else tuple(kwargs.values())


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
    #: child modules whose parameters the layer's own forward uses directly (never calling the child), covered
    #: by this rule under the names ``"child.param"`` (MultiheadAttention's ``out_proj``)
    children: tuple[str, ...] = ()

    def unsupported(self, module: nn.Module) -> str | None:
        return None

    def tap_shapes(self, module: nn.Module, args: tuple, kwargs: dict, output) -> tuple[tuple[int, ...], ...] | str:
        """The shapes of the zero taps the engine adds in one call of the layer (one sample), or why this call
        is not covered. Default: one tap, on the output tensor."""
        x = _layer_input(args, kwargs)
        if not isinstance(output, Tensor) or not x or not isinstance(x[0], Tensor):
            return "its input or output is not a tensor"
        return (tuple(output.shape),)

    def tapped(self, module: nn.Module, args: tuple, kwargs: dict, output, taps: Sequence[Tensor]) -> tuple[object, tuple]:
        """(the layer's output with the zero ``taps`` added where :meth:`factors` expects its gradients, the tensors
        :meth:`factors` needs). Default: ``output(...) + taps[0]`` and :meth:`capture`. A rule with several taps
        gets their gradients as a tuple in :meth:`factors`."""
        xs = _layer_input(args, kwargs)
        return self.output(module, xs, output) + taps[0], self.capture(module, xs)

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


def _linear_factors(a: Tensor, grad: Tensor, names: set[str], weight: str = "weight", bias: str = "bias") -> dict:
    """Factors of y = a Wᵀ + b (or y = a W + b: the Grams do not see the layout) for a (n, *, I), grad (k, n, *, O)."""
    k, n = grad.shape[:2]
    g = grad.reshape(k, n, 1, -1, grad.shape[-1])
    a = a.reshape(n, 1, -1, a.shape[-1])
    if {weight, bias} <= names:  # [W b] acts on [a 1]: one factor, one Gram instead of two
        return {f"{weight}+{bias}": OuterFactor(torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1), g)}
    out = {}
    if weight in names:
        out[weight] = OuterFactor(a, g)
    if bias in names:
        out[bias] = DirectFactor(g.sum(3).squeeze(2))
    return out


class LinearRule(LayerRule):
    """y = x Wᵀ + b on (n, *, I): grad W = Σ_t g_t a_tᵀ over the * positions, grad b = Σ_t g_t;
    together, grad [W b] = Σ_t g_t [a_t 1]ᵀ. Also Hugging Face's ``Conv1D`` (GPT-2), y = x W + b."""

    leading_dims_are_positions = True

    def factors(self, module, saved, grad, names):
        (a,) = saved
        return _linear_factors(a, grad, names)


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


_MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _mha_call(args: tuple, kwargs: dict) -> dict:
    """The arguments of one ``nn.MultiheadAttention.forward`` call by name, defaults filled in."""
    call = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True, "is_causal": False}
    call.update(zip(_MHA_ARGUMENTS, args))
    call.update(kwargs)
    return call


def _self_attention(module: nn.MultiheadAttention, call: dict, taps: Sequence[Tensor]):
    """``module(x, x, x, ...)`` with zero taps added to its packed input projection z = x W_inᵀ + b_in (L, N, 3E)
    and to its output projection y = o W_outᵀ + b_out (L·N, E); returns (output, attention weights or None,
    (x, o)). Step for step what ``nn.MultiheadAttention.forward`` and ``F.multi_head_attention_forward`` compute
    on its explicit route (``need_weights=True``, where mgs_torch runs it anyway: op_fixes), the masks
    canonicalised and merged by PyTorch's own helpers."""
    x, attn_mask, key_padding_mask, is_causal = call["query"], call["attn_mask"], call["key_padding_mask"], call["is_causal"]
    # nn.MultiheadAttention.forward
    is_batched = x.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=x.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=x.dtype, check_other=False
    )
    if module.batch_first and is_batched:
        x = x.transpose(1, 0)
    # F.multi_head_attention_forward
    if not is_batched:
        x = x.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = x.shape
    H = module.num_heads
    head = E // H
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=x.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=x.dtype, check_other=False
    )
    z = F.linear(x, module.in_proj_weight, module.in_proj_bias) + taps[0]
    q, k, v = (t.reshape(L, N * H, head).transpose(0, 1) for t in z.chunk(3, -1))
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if key_padding_mask is not None:
        merged = key_padding_mask.view(N, 1, 1, L).expand(-1, H, -1, -1).reshape(N * H, 1, L)
        attn_mask = merged if attn_mask is None else attn_mask + merged
    q = q * math.sqrt(1.0 / float(head))
    scores = torch.bmm(q, k.transpose(-2, -1)) if attn_mask is None else torch.baddbmm(attn_mask, q, k.transpose(-2, -1))
    weights = F.softmax(scores, dim=-1)
    if module.training and module.dropout > 0.0:
        weights = F.dropout(weights, p=module.dropout)
    o = torch.bmm(weights, v).transpose(0, 1).reshape(L * N, E)
    y = (F.linear(o, module.out_proj.weight, module.out_proj.bias) + taps[1]).view(L, N, E)
    averaged = None
    if call["need_weights"]:
        averaged = weights.view(N, H, L, L)
        if call["average_attn_weights"]:
            averaged = averaged.mean(dim=1)
        if not is_batched:
            averaged = averaged.squeeze(0)
    if not is_batched:
        y = y.squeeze(1)
    elif module.batch_first:
        y = y.transpose(1, 0)
    return y, averaged, (x, o)


class MultiheadAttentionRule(LayerRule):
    """``nn.MultiheadAttention`` as self-attention (query, key and value one tensor x): its packed input projection
    z = x W_inᵀ + b_in (3·E outputs per position) and its output projection y = o W_outᵀ + b_out are linear maps
    shared over the positions, so each parameter's per-sample gradient is that of a Linear layer (Σ_t g_t ⊗ [a_t 1])
    with a = x, g = ∂/∂z and a = o (the heads' outputs), g = ∂/∂y. Both are tapped where they are computed, in a
    recomputation of the attention between them (:func:`_self_attention`) that replaces the module's output.
    Separate query/key/value weights (kdim, vdim), ``add_bias_kv`` and ``add_zero_attn`` are not covered, nor is
    cross-attention: their parameters get their per-sample gradients from autograd directly."""

    params = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    leading_dims_are_positions = True
    children = ("out_proj",)

    def unsupported(self, module):
        if not module._qkv_same_embed_dim:
            return "separate query, key and value projections (kdim, vdim) are not covered by its rule"
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv is not covered by its rule"
        if module.add_zero_attn:
            return "add_zero_attn is not covered by its rule"
        if type(module.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return f"its out_proj is a {type(module.out_proj).__name__}"
        return None

    def tap_shapes(self, module, args, kwargs, output):
        call = _mha_call(args, kwargs)
        x = call["query"]
        if not (isinstance(x, Tensor) and call["key"] is x and call["value"] is x) or x.dim() not in (2, 3):
            return "query, key and value are not one tensor (its rule covers self-attention)"
        if x.dim() == 2:
            L, N = x.shape[0], 1
        else:
            L, N = (x.shape[1], x.shape[0]) if module.batch_first else x.shape[:2]
        return ((L, N, 3 * module.embed_dim), (L * N, module.embed_dim))

    def tapped(self, module, args, kwargs, output, taps):
        y, weights, saved = _self_attention(module, _mha_call(args, kwargs), taps)
        return (y, weights), saved

    def factors(self, module, saved, grad, names):
        x, o = saved
        g_in, g_out = grad
        return {
            **_linear_factors(x, g_in, names, "in_proj_weight", "in_proj_bias"),
            **_linear_factors(o, g_out, names, "out_proj.weight", "out_proj.bias"),
        }


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
    nn.MultiheadAttention: MultiheadAttentionRule(),
})


#: Rules for types of packages the core never imports, by (module, qualified name), registered for the exact type
#: the first time a model holding it is planned (:func:`adopt_named_rules`); unregistering one then works as for any
_RULES_BY_NAME: dict[tuple[str, str], LayerRule] = {("transformers.pytorch_utils", "Conv1D"): LinearRule()}
_ADOPTED: set[type] = set()


def adopt_named_rules(model: nn.Module) -> None:
    """Register the rules of :data:`_RULES_BY_NAME` for the types ``model`` holds (once per type and process)."""
    for kind in {type(m) for m in _walk.modules(model)} - _ADOPTED:
        rule = _RULES_BY_NAME.get((kind.__module__, kind.__qualname__))
        if rule is not None:
            _ADOPTED.add(kind)
            if kind not in LAYER_RULES:
                LAYER_RULES[kind] = rule


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
