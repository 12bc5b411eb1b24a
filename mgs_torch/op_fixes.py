"""Ops whose torch.func or double-backward support is wrong or missing, replaced while MGS runs.

torch.func is not an oracle. Measured on torch 2.13 (CPU, float64) against a per-sample autograd
loop, these ops give wrong numbers or fail inside the kernel and penalty computations:

================================  ==============================================================
op                                what goes wrong upstream
================================  ==============================================================
``F.layer_norm`` (and             double backward through ``vmap`` over the cotangents of a
``torch.layer_norm``,
``torch.native_layer_norm``)
                                  ``vjp`` is 0.4–2 % off for the parameters upstream of the norm
``F.instance_norm``               same (a bias whose true gradient is 0 gets 3.5e-4)
``F.batch_norm`` (batch stats)    same, under ``batch_norm="batch"``
``F.prelu``                       ``vmap(jacrev)`` fails with a shape error (its batching rule)
``torch.lstm/gru/rnn_*``          the fused RNN ops and cells (``nn.LSTM``, ``nn.LSTMCell``, …) fail
and their ``*_cell`` ops          inside ``vmap`` ("output with shape [1, h] doesn't match the
                                  broadcast shape [n, 1, h]")
``F.scaled_dot_product_attention`` the fused CPU/CUDA kernels have no double backward
``F.hardsigmoid``                 no double backward (``hardsigmoid_backward``)
``F.rrelu``                       no ``vmap`` rule (``rrelu_with_noise``)
``F.embedding_bag``               no double backward (``_embedding_bag_backward``)
``torch.cdist``                   ``jacrev`` gives a wrong Jacobian for every p (the batching rule of its
                                  backward); no double backward
``fused_moving_avg_obs_fake_quant`` no batching rule (QAT's default fused FakeQuantize)
``F.conv_transpose1d/2d/3d``      ``vmap(jacrev)`` fails ("grad_weight needs to be contiguous") when a
                                  size-1 dimension of the input has a non-standard stride
``torch.roll`` without ``dims``    on a 0-d per-sample tensor, ``vmap``'s rule rolls the *batch*: the
                                  samples' values trade places (a scalar's roll is the identity)
``F.conv1d/2d/3d`` (automatic)    right, but slow on the GPU: the weight-derivative of its backward
                                  runs as a convolution with the whole feature map as kernel
                                  (:func:`use_transposed_convolution_backward`: by default only in
                                  the exact trace penalty on CUDA, where it was measured faster)
================================  ==============================================================

:class:`ExactOps` is a :class:`~torch.overrides.TorchFunctionMode` that is active whenever mgs_torch
runs the model's forward (never outside mgs_torch, nor around its own arithmetic): each op above is computed by an equivalent composition of
ops whose batching rules and derivatives are right (the same values, checked in the tests, which
also keep one regression test per upstream bug). It also refuses, before anything runs, what has no
well-defined Jacobian: ``Embedding(max_norm=...)`` renormalises the weight *in place* during the
forward, and RNNs on packed sequences. ``Embedding(scale_grad_by_freq=True)`` rescales what autograd
reports, not the function: MGS uses the function's true derivative (scale_grad_by_freq ignored).
``F.multi_head_attention_forward`` is run with ``need_weights=True`` (explicit softmax attention, the
same output) instead of its fused kernel, and an active mode keeps PyTorch off its fused "fast
paths" (``TransformerEncoderLayer``, ``MultiheadAttention`` in eval mode), which torch.func cannot
differentiate.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import _walk

__all__ = [
    "ExactOps", "UnsupportedLayerError", "ModelForwardError", "SelfCheckError", "REPLACED_OPS", "EXACT_FORWARDS", "exact_computation",
    "explained_failures", "autograd_in_forward_error",
]


class UnsupportedLayerError(ValueError):
    """A layer or op whose Jacobian mgs_torch cannot compute exactly; the message says what to do."""


class SelfCheckError(RuntimeError):
    """mgs_torch's answer on this model disagrees with a plain autograd loop of the model's own ops, and no exact
    route agrees either (:mod:`mgs_torch.self_check`). Its ``report`` says by how much."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ModelForwardError(RuntimeError):
    """The model's own forward fails on these inputs, with no torch.func transform involved (``model(x)``
    fails the same way): a bug or a wrong input of the model's, not a layer mgs_torch cannot handle."""


@contextlib.contextmanager
def explained_failures(model, strategy: str) -> Iterator[None]:
    """Turn a raw torch.func / autograd failure inside an MGS computation into an error that says what to do."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        if isinstance(error, (ModelForwardError, SelfCheckError)):
            raise
        if _from_the_compiler(error):  # torch.compile's own failure: never blamed on a layer
            error.add_note(
                "This failure comes from torch.compile (Dynamo/Inductor), not from a layer of the model: "
                "mgs_torch's computation runs eagerly when called outside the compiled function."
            )
            raise
        if _is_out_of_memory(error):  # not the layer's fault: keep the error (and its type) as it is
            error.add_note(
                "mgs_torch ran out of memory computing the MGS kernel or penalty. The exact trace penalty holds "
                "about a training step's memory at batch q·n; chunk_size=... bounds it (chunk_size=1: about 2-5x a "
                "plain step), estimator='hutchinson' needs about 3x a plain step, outputs='sum' makes K n×n "
                "instead of (n·q)×(n·q); or use a smaller batch."
            )
            raise
        second = re.search(r"derivative for '?(?:aten::)?(\w+?)_backward'? is not implemented", str(error))
        if second is not None:
            raise UnsupportedLayerError(
                f"{type(model).__name__} uses {second.group(1)}, whose derivative PyTorch cannot differentiate again. The "
                f"MGS penalty is differentiated twice (its gradient is a derivative of J), so it cannot be trained through "
                f"this op; the kernel, tr K and the metrics are exact (mgs_kernel, mgs_trace). Leave the parameters whose "
                f"gradient passes through it out with params=..., or write the op as a composition of standard ops."
            ) from error
        if "being transformed by a functorch transform" in str(error):  # torch.autograd.grad, requires_grad_(), autograd.functional
            raise autograd_in_forward_error(model, error) from error
        if "_nested_tensor_from_mask" in str(error):
            raise UnsupportedLayerError(
                f"{type(model).__name__} runs an nn.TransformerEncoder in eval mode with src_key_padding_mask, whose "
                f"PyTorch fast path turns the batch into a nested tensor, which torch.func cannot transform. Build the "
                f"encoder with enable_nested_tensor=False (then, as in training mode, outputs at padded positions are "
                f"computed rather than set to zero: pool over the unpadded positions), or compute MGS in train mode."
            ) from error
        if "saved tensor hooks" in str(error):
            raise UnsupportedLayerError(
                f"{type(model).__name__} uses activation checkpointing (torch.utils.checkpoint) or other saved-tensor "
                f"hooks, which torch.func cannot differentiate; switch it off while computing MGS (mgs_torch's own "
                f"chunk_size= bounds the memory of the kernel and the penalty instead)"
            ) from error
        text = str(error)
        if (
            "mutate a captured Tensor" in text
            or ("inplace arithmetic" in text and "more elements than `self`" in text)
            or "doesn't match the broadcast shape" in text  # an in-place op whose target lacks the vmapped dim
        ):
            raise UnsupportedLayerError(
                f"{type(model).__name__}'s forward writes in place into a tensor that is not computed from the "
                f"sample: a buffer it updates (a running statistic, a step counter, a quantisation observer such as "
                f"FakeQuantize's) or a tensor made without the batch dimension: {text.strip().splitlines()[0]}\n"
                f"torch.func cannot differentiate a forward with that side effect. Switch the update off while "
                f"MGS runs (FakeQuantize: model.apply(torch.ao.quantization.disable_observer); your own module: "
                f"skip it under a flag or when not self.training), or write it out of place (x = x + y)."
            ) from error
        if "must override the setup_context staticmethod" in text or "does not have vmap support" in text:
            raise UnsupportedLayerError(
                f"{type(model).__name__} calls a custom torch.autograd.Function that torch.func cannot transform: "
                f"{text.strip().splitlines()[0]}\nGive that Function a separate setup_context(ctx, inputs, "
                f"output) (forward then takes no ctx) and set generate_vmap_rule = True, as "
                f"https://pytorch.org/docs/stable/notes/extending.func.html shows; its backward must itself be "
                f"differentiable for the MGS penalty. Or leave the parameters it affects out with params=..."
            ) from error
        raise UnsupportedLayerError(
            f"mgs_torch could not differentiate {type(model).__name__} (strategy={strategy!r}): "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0]}\n"
            f"The failing op is not among those mgs_torch routes around (mgs_torch.op_fixes.REPLACED_OPS). "
            f"Run mgs_torch.verify(model, x) to see which layer fails, then replace that layer by an "
            f"equivalent composition of standard ops, leave its parameters out with params=..., or "
            f"register a LayerRule for it."
        ) from error


def autograd_in_forward_error(model, error: BaseException) -> "UnsupportedLayerError":
    """The forward differentiates with torch.autograd itself (a force field's F = −∂E/∂x): what to write instead."""
    return UnsupportedLayerError(
        f"{type(model).__name__}'s forward takes a derivative with torch.autograd (torch.autograd.grad, "
        f".backward() or requires_grad_(), as force fields F = −∂E/∂x often do). That cannot run inside the "
        f"torch.func transforms mgs_torch computes J with, nor in its gradient-free validation forward "
        f"({type(error).__name__}: {str(error).strip().splitlines()[0][:160]}). Write the derivative with torch.func, "
        f"which mgs_torch differentiates exactly in every strategy: e.g. "
        f"forces = -torch.func.grad(lambda pos: self.energy(pos).sum())(positions) "
        f"(torch.func.vjp or jacrev for other derivatives)."
    )


def _from_the_compiler(error: BaseException) -> bool:
    """An exception raised by torch.compile's machinery (Dynamo, AOTAutograd, Inductor)."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch._aot_autograd")) or (
        torch.compiler.is_compiling()
    )


def _is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, Python's MemoryError, or the CPU allocator's refusal (in either wording)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------------------------- normalisation


def _normalize(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _affine_channels(y: Tensor, weight, bias) -> Tensor:
    if weight is not None:
        y = y * _channel_view(weight, y)
    if bias is not None:
        y = y + _channel_view(bias, y)
    return y


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(input.dim() - len(tuple(normalized_shape)), input.dim()))
    y = _normalize(input, dims, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    # running statistics live in cloned buffers here: their update is skipped, never seen by the user
    if use_input_stats:
        y = _normalize(input, tuple(range(2, input.dim())), eps)
    else:
        y = (input - _channel_view(running_mean, input)) * torch.rsqrt(_channel_view(running_var, input) + eps)
    return _affine_channels(y, weight, bias)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not training and running_mean is not None:
        return torch.batch_norm(input, weight, bias, running_mean, running_var, False, momentum, eps, True)
    dims = (0,) + tuple(range(2, input.dim()))
    return _affine_channels(_normalize(input, dims, eps), weight, bias)


# the same kernels reached through torch.* (their own argument order): routed the same way
def torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return layer_norm(input, normalized_shape, weight, bias, eps)


def native_layer_norm(input, normalized_shape, weight, bias, eps):
    """``(y, mean, rstd)`` as ``torch.native_layer_norm`` returns them (statistics kept over the normalised dims)."""
    dims = tuple(range(input.dim() - len(tuple(normalized_shape)), input.dim()))
    mean = input.mean(dims, keepdim=True)
    rstd = torch.rsqrt(((input - mean) ** 2).mean(dims, keepdim=True) + eps)
    return layer_norm(input, normalized_shape, weight, bias, eps), mean, rstd


def torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    # called with the mode off (_CALL_THE_ORIGINAL): the eval branch of batch_norm calls torch.batch_norm itself
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


# ---------------------------------------------------------------------------------- activations


def prelu(input, weight):
    # one shared slope keeps the input's shape (a 0-d input stays 0-d, as in the public op); at an input of exactly
    # 0 the derivative is the slope, as PyTorch's (prelu_backward takes the identity branch for input > 0 only)
    w = weight.reshape(()) if weight.numel() == 1 else weight if input.dim() < 2 else _channel_view(weight, input)
    return torch.where(input > 0, input, w * input)


def _in_place(input: Tensor, result: Tensor, inplace: bool) -> Tensor:
    """``result`` written into ``input`` when the public op would work in place (``inplace=True``):
    a model may rely on the side effect and ignore the returned tensor."""
    return input.copy_(result) if inplace else result


def hardsigmoid(input, inplace=False):
    return _in_place(input, torch.clamp(input / 6.0 + 0.5, 0.0, 1.0), inplace)


def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    if not training:
        return F.leaky_relu(input, (lower + upper) / 2, inplace)
    slope = lower + (upper - lower) * torch.rand_like(input)  # drawn for inputs <= 0, as rrelu_with_noise does
    return _in_place(input, torch.where(input > 0, input, slope * input), inplace)


# ---------------------------------------------------------------------------------- embeddings


def _refuse_max_norm(max_norm) -> None:
    if max_norm is not None:
        raise UnsupportedLayerError(
            "Embedding(max_norm=...) renormalises its weight in place during every forward, so its "
            "Jacobian is not that of a fixed function and the model's weights would change; mgs_torch "
            "refuses it before running. Renormalise the weight yourself between steps (e.g. "
            "torch.nn.utils.clip_grad_norm_-style code or torch.renorm on the weight) and set max_norm=None"
        )


def _padding_index(padding_idx, weight: Tensor) -> int | None:
    """A negative ``padding_idx`` counts from the end, as in the public ops (-1 is the last row, not "none")."""
    if padding_idx is not None and padding_idx < 0:
        return weight.shape[0] + padding_idx
    return padding_idx


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    """The rows of ``weight``; those at ``padding_idx`` are constants (PyTorch's gradient of the padding row is zero).

    The padding entries are detached here rather than left to ``torch.embedding``'s padding argument: with the
    weight batched per sample (the structured engine's parameter taps) that argument gave the padding row a
    gradient (K 2-6 % off)."""
    _refuse_max_norm(max_norm)
    padding_idx = _padding_index(padding_idx, weight)
    rows = torch.embedding(weight, input, -1, False, False)
    if padding_idx is None:
        return rows
    return torch.where((input == padding_idx).unsqueeze(-1), rows.detach(), rows)


def embedding_bag(
    input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False, mode="mean", sparse=False,
    per_sample_weights=None, include_last_offset=False, padding_idx=None,
):
    _refuse_max_norm(max_norm)
    if input.dim() == 2 and offsets is not None:
        raise ValueError(  # the public op's own refusal
            f"if input is 2D, then offsets has to be None, as input is treated is a mini-batch of fixed length "
            f"sequences. However, found offsets of type {type(offsets)}"
        )
    if input.dim() != 2 or offsets is not None:
        raise UnsupportedLayerError(
            "EmbeddingBag with 1-D input and offsets packs several samples into one row, so the "
            "per-sample kernel is undefined; pass a 2-D (batch, bag) index tensor"
        )
    padding_idx = _padding_index(padding_idx, weight)
    rows = F.embedding(input, weight, padding_idx)  # (B, L, D)
    keep = torch.ones_like(input, dtype=rows.dtype) if padding_idx is None else (input != padding_idx).to(rows.dtype)
    if padding_idx is not None:  # a bag leaves its padding entries out, whatever the padding row holds
        rows = rows * keep.unsqueeze(-1)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    if mode == "sum":
        return rows.sum(1)
    if mode == "mean":
        return rows.sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
    masked = rows.masked_fill(keep.unsqueeze(-1) == 0, float("-inf"))
    out = masked.amax(1)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


# ---------------------------------------------------------------------------------- convolution (opt-in)


def same_padding_amounts(dilation, kernel_size) -> list[int]:
    """``F.pad`` amounts (last dim first) equal to ``padding="same"``: asymmetric for even spans, as PyTorch pads."""
    pads: list[int] = []
    for d, k in zip(reversed(dilation), reversed(kernel_size)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


class _Convolution(torch.autograd.Function):
    """N-d convolution whose input-gradient is a transposed convolution, an op with ordinary derivatives.

    aten's own backward (``convolution_backward``) is differentiable, but its derivative in the
    weight, which every penalty needs (the backward pass at q·n differentiated again), runs as a
    convolution whose kernel is the whole feature map: 14 % of a small ResNet's exact trace step on
    the CPU, and most likely the 26 ms kernel of the CIFAR CNN's 91 ms step on an H200. A transposed
    convolution's weight-derivative is a plain weight-gradient kernel. Same values; derivatives of any order.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            output_padding = [
                i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                for i, o, s, p, d, k in zip(input.shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:])
            ]
            grad_input = torch.ops.aten.convolution(grad, weight, None, stride, padding, dilation, True, output_padding, groups)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad, input, weight, None, stride, padding, dilation, False, [0] * len(stride), groups, [False, True, False]
            )[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum([0, *range(2, grad.dim())])
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _convolution(dims: int):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims  # noqa: E731
        stride, dilation = as_tuple(stride), as_tuple(dilation)
        if padding == "valid":
            padding = 0
        elif padding == "same":  # what PyTorch does: pad, then convolve unpadded
            input, padding = F.pad(input, same_padding_amounts(dilation, weight.shape[2:])), 0
        unbatched = input.dim() == dims + 1
        x = input.unsqueeze(0) if unbatched else input
        out = _Convolution.apply(x, weight, bias, stride, as_tuple(padding), dilation, groups)
        if torch._C._functorch.is_functorch_wrapped_tensor(out):
            # under vmap the generated rule returns a view of the Function's output, which autograd
            # forbids modifying in place (a residual ``out += x``): a copy, as a plain conv's output is
            out = out.clone()
        return out.squeeze(0) if unbatched else out

    return conv


# ---------------------------------------------------------------------------------- distances


def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """‖x1_i − x2_j‖_p for every pair (batched over leading dimensions), as a difference and a vector norm.

    torch.func's Jacobian of ``torch.cdist`` is wrong for every p and either argument (``jacrev`` alone, 120–134 %
    off; PyTorch 2.13), and PyTorch has no double backward for it. The difference costs P·R·M memory where the
    public op's matrix-product route for large inputs does not; its values agree to rounding (the public op's
    route is the less accurate one)."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


def pdist(input, p=2.0):
    """‖x_i − x_j‖_p for i < j in row-major order, as ``torch.pdist``: right under torch.func, but PyTorch has no
    double backward for it (the penalty's gradient needs one)."""
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return torch.linalg.vector_norm(input[i] - input[j], ord=p, dim=-1)


# ---------------------------------------------------------------------------------- quantisation-aware training


def fused_moving_avg_obs_fake_quant(
    input, observer_on, fake_quant_on, running_min, running_max, scale, zero_point, averaging_const, quant_min, quant_max,
    ch_axis, per_row_fake_quant=False, symmetric_quant=False,
):
    """The op of QAT's default (fused) FakeQuantize, which has no batching rule: with its observer off,
    it is the plain fake quantisation it applies (per tensor or per channel, the same values and the same
    straight-through derivative). With the observer on it would update the running range and the scale from
    the batch in place, which no per-sample Jacobian can do: refused with the switch that makes it exact."""
    if int(observer_on.item()) == 1:
        raise UnsupportedLayerError(
            "a FakeQuantize observer is on: it updates its running range and scale from the batch in place during the "
            "forward, so the forward is not a fixed function of the parameters. Switch the observers off while MGS "
            "runs (model.apply(torch.ao.quantization.disable_observer); enable_observer switches them back on)."
        )
    if int(fake_quant_on.item()) != 1:
        return input.clone()
    # PyTorch recomputes scale and zero point from the running range on every call (and writes them): they
    # depend on buffers only, so its own op computes them here, on a placeholder shaped like one sample
    placeholder = torch.zeros(input.shape, dtype=input.dtype, device=input.device)
    torch.fused_moving_avg_obs_fake_quant(
        placeholder, observer_on, fake_quant_on, running_min, running_max, scale, zero_point, averaging_const,
        quant_min, quant_max, ch_axis, per_row_fake_quant, symmetric_quant,
    )
    if per_row_fake_quant:
        return torch.fake_quantize_per_channel_affine(input, scale, zero_point, ch_axis, quant_min, quant_max)
    return torch.fake_quantize_per_tensor_affine(input, scale, zero_point, quant_min, quant_max)


# ---------------------------------------------------------------------------------- modules computed by old-style Functions


def _cross_map_window(channels: int, size: int) -> Tensor:
    """Which channels' squares enter channel c's scale in ``nn.CrossMapLRN2d``: the running window of
    PyTorch's own loop (it adds channel c + ⌈size/2⌉ − 1 and drops channel c − ⌈size/2⌉ as c advances)."""
    pre_pad = int((size - 1) / 2 + 1)
    member = torch.zeros(channels, channels, dtype=torch.bool)
    member[0, : min(pre_pad, channels)] = True
    for c in range(1, channels):
        member[c] = member[c - 1]
        if c < channels - pre_pad + 1:
            member[c, c + pre_pad - 1] = True
        if c > pre_pad:
            member[c, c - pre_pad] = False
    return member


def cross_map_lrn2d(module, input: Tensor) -> Tensor:
    """``nn.CrossMapLRN2d``: x_c · (k + α/size · Σ_{c' ∈ W(c)} x_c'²)^(−β), in standard ops. PyTorch computes it
    with an old-style autograd.Function, which torch.func cannot transform, and whose hand-written backward is
    not the derivative of its forward (2–14 % off where a window holds several channels, an error at size 1;
    tests/test_upstream_bugs.py): here autograd differentiates the forward itself."""
    if input.dim() != 4:
        raise ValueError(f"CrossMapLRN2d: Expected input to be 4D, got {input.dim()}D instead.")
    window = _cross_map_window(input.shape[1], module.size).to(input.dtype)
    scale = module.k + module.alpha / module.size * torch.einsum("dc,nchw->ndhw", window.to(input.device), input * input)
    return input * scale.pow(-module.beta)


#: Modules whose forward PyTorch computes in a way torch.func cannot transform (an old-style autograd
#: Function): while mgs_torch runs a model, their instances compute the same function by these forwards.
EXACT_FORWARDS: dict = {torch.nn.CrossMapLRN2d: cross_map_lrn2d}


@contextlib.contextmanager
def exact_forwards(model) -> Iterator[None]:
    """Instances of :data:`EXACT_FORWARDS` types in ``model`` forward through their exact equivalents while
    active (an instance attribute, removed after; nothing else about the modules changes)."""
    patched = [m for m in _walk.modules(model) if type(m) in EXACT_FORWARDS and "forward" not in vars(m)]

    def exact(module, *args, **kwargs):
        for record in _RECORDERS:
            record.add(type(module).__name__)
        return EXACT_FORWARDS[type(module)](module, *args, **kwargs)

    try:
        for m in patched:
            m.forward = functools.partial(exact, m)
        yield
    finally:
        for m in patched:
            vars(m).pop("forward", None)


@contextlib.contextmanager
def exact_computation(model, substitutes: dict[int, Tensor] | None = None) -> Iterator["ExactOps"]:
    """Everything mgs_torch changes while it runs ``model``'s forward: :class:`ExactOps` for ops (and the
    Parameters it ``substitutes``), :func:`exact_forwards` for modules. Yields the mode."""
    with exact_forwards(model), ExactOps(substitutes) as mode:
        yield mode


# ---------------------------------------------------------------------------------- attention


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """PyTorch's own math backend (a composition of matmul and softmax): twice differentiable.

    The public op turns a boolean mask (True = attend) into an additive one (0 or −∞) before it picks a
    backend; the math kernel adds whatever mask it gets, so a boolean one would be added as 1/0 and
    every key would be attended (the padding mask of Hugging Face BERT, GPT-2, …). Converted here, as
    the public op does; a row with no key left gives zeros, as there.
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(attn_mask.logical_not(), float("-inf"))
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


def multi_head_attention_forward(*args, **kwargs):
    """The same attention output through the explicit route (softmax of the scores), not SDPA."""
    import inspect

    bound = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    wanted = bound.arguments.get("need_weights", True)
    bound.arguments["need_weights"] = True
    out, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return out, (weights if wanted else None)


def _transposed_convolution(op):
    """``op`` (``F.conv_transpose1d/2d/3d``) on an input with standard strides.

    A size-1 dimension can carry any stride; when it does (a length-1 sequence transposed from
    (n, 1, C), a 1×1 latent map made by ``permute``), the op's backward under ``vmap(jacrev)`` fails
    with "grad_weight needs to be contiguous" (PyTorch 2.13). A copy with standard strides is the same
    tensor for every derivative."""

    def conv(input, weight, *args, **kwargs):
        return op(input.clone(memory_format=torch.contiguous_format), weight, *args, **kwargs)

    return conv


# ---------------------------------------------------------------------------------- recurrent layers


def _cell(kind: str, x_proj: Tensor, h, w_hh, b_hh, w_hr):
    """One time step given x W_ihᵀ + b_ih; returns the new state (h, c) or h."""
    if kind == "lstm":
        h, c = h
        gates = x_proj + F.linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, c
    if kind == "gru":
        gh = F.linear(h, w_hh, b_hh)
        xr, xz, xn = x_proj.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h
    pre = x_proj + F.linear(h, w_hh, b_hh)
    return torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)


def _roll(op):
    """``torch.roll`` / ``Tensor.roll``, with the 0-d case (the identity) kept away from ``vmap``'s rule."""

    def roll(input, shifts, dims=None):
        if input.dim() == 0:
            return input.clone()
        return op(input, shifts, dims) if dims is not None else op(input, shifts)

    return roll


def _make_rnn(kind: str):
    def rnn(input, hx, flat_weights, has_biases, num_layers, dropout, train, bidirectional, batch_first=False):
        # the PackedSequence overload is (data, batch_sizes, hx, flat_weights, has_biases, ...): its
        # fourth argument is the weight list where the padded overload has the has_biases flag
        if not isinstance(has_biases, bool):
            raise UnsupportedLayerError(
                f"{kind.upper()} on a PackedSequence (nn.utils.rnn.pack_padded_sequence) is not supported by "
                f"mgs_torch: packing sorts the samples of a batch by length and runs them as one sequence of "
                f"shrinking batches, which cannot be run one sample at a time. Run the RNN on the padded "
                f"batch instead and read each sample's output at its own last step (out[torch.arange(n), "
                f"lengths - 1] for a forward RNN) or mask the padded steps, or leave the RNN's parameters "
                f"out with params=..."
            )
        x = input.transpose(0, 1) if batch_first else input  # (T, B, I)
        dirs = 2 if bidirectional else 1
        per = len(flat_weights) // (num_layers * dirs)
        h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
        h_out, c_out = [], []
        for layer in range(num_layers):
            outs = []
            for d in range(dirs):
                idx = layer * dirs + d
                w = list(flat_weights[idx * per : (idx + 1) * per])
                w_ih, w_hh = w[0], w[1]
                b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
                w_hr = w[-1] if per == (5 if has_biases else 3) else None
                state = (h0[idx], c0[idx]) if kind == "lstm" else h0[idx]
                x_proj = F.linear(x, w_ih, b_ih)  # all steps at once
                steps = range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])
                ys = [None] * x.shape[0]
                for t in steps:
                    state = _cell(kind, x_proj[t], state, w_hh, b_hh, w_hr)
                    ys[t] = state[0] if kind == "lstm" else state
                outs.append(torch.stack(ys))
                h_out.append(state[0] if kind == "lstm" else state)
                if kind == "lstm":
                    c_out.append(state[1])
            x = torch.cat(outs, -1) if dirs == 2 else outs[0]
            if dropout > 0 and train and layer < num_layers - 1:
                x = F.dropout(x, dropout, training=True)
        out = x.transpose(0, 1) if batch_first else x
        if kind == "lstm":
            return out, torch.stack(h_out), torch.stack(c_out)
        return out, torch.stack(h_out)

    return rnn


def _make_rnn_cell(kind: str):
    def cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        return _cell(kind, F.linear(input, w_ih, b_ih), tuple(hx) if kind == "lstm" else hx, w_hh, b_hh, None)

    return cell


_VF = torch._C._VariableFunctions
_DATA_PTR = torch.Tensor.data_ptr

REPLACED_OPS: dict = {
    F.layer_norm: layer_norm,
    torch.layer_norm: torch_layer_norm,
    torch.native_layer_norm: native_layer_norm,
    F.instance_norm: instance_norm,
    torch.instance_norm: torch_instance_norm,
    F.batch_norm: batch_norm,
    torch.batch_norm: torch_batch_norm,
    F.prelu: prelu,
    torch.prelu: prelu,
    F.hardsigmoid: hardsigmoid,
    F.rrelu: rrelu,
    F.embedding: embedding,
    F.embedding_bag: embedding_bag,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
    F.conv_transpose1d: _transposed_convolution(F.conv_transpose1d),
    F.conv_transpose2d: _transposed_convolution(F.conv_transpose2d),
    F.conv_transpose3d: _transposed_convolution(F.conv_transpose3d),
    torch.fused_moving_avg_obs_fake_quant: fused_moving_avg_obs_fake_quant,
    torch.cdist: cdist,
    torch.pdist: pdist,
    torch.roll: _roll(torch.roll),
    torch.Tensor.roll: _roll(torch.Tensor.roll),
    _VF.lstm: _make_rnn("lstm"),
    _VF.gru: _make_rnn("gru"),
    _VF.rnn_tanh: _make_rnn("rnn_tanh"),
    _VF.rnn_relu: _make_rnn("rnn_relu"),
    _VF.lstm_cell: _make_rnn_cell("lstm"),
    _VF.gru_cell: _make_rnn_cell("gru"),
    _VF.rnn_tanh_cell: _make_rnn_cell("rnn_tanh"),
    _VF.rnn_relu_cell: _make_rnn_cell("rnn_relu"),
}


_RECORDERS: list[set] = []
# replacements that call the op they replace: they run with the mode off, or they would call themselves
_CALL_THE_ORIGINAL = (
    F.multi_head_attention_forward, torch.fused_moving_avg_obs_fake_quant, torch.batch_norm, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.roll, torch.Tensor.roll,
)


_CONVOLUTIONS = {F.conv1d: _convolution(1), F.conv2d: _convolution(2), F.conv3d: _convolution(3)}


#: ``use_transposed_convolution_backward``'s setting: True (always), False (never), None (automatic, the default)
_TRANSPOSED_CONVOLUTION_SETTING: list[bool | None] = [None]
# open blocks of transposed_convolutions_where_automatic(True); a plain list, which Dynamo reads like any global
_AUTOMATIC_TRANSPOSED_CONVOLUTIONS: list[int] = [0]


def use_transposed_convolution_backward(enabled: bool | None = True) -> None:
    """Route convolutions through :class:`_Convolution`: ``True`` always, ``False`` never, ``None`` automatically.

    Exact either way (the audit runs both); only the speed differs. ``None`` (the state a process starts in)
    uses it where it was measured faster: inside the **exact trace penalty of the structured engine on a CUDA
    device** (an H200: CIFAR CNN −14 %, residual CNN −31 % per step at n = 128). Everywhere else it stays off:
    on the CPU it measured slower (Hutchinson steps +40 %, exact trace steps −10 … +6 %), and on the GPU it made
    the one-probe Hutchinson step 53 % slower (its weight gradient runs under ``vmap`` as a per-sample loop).
    The log-det penalty was not measured: ``True`` turns it on for it too. Process-wide.

    The first-use self-check (:mod:`mgs_torch.self_check`) runs the engine on its own probes, outside the
    automatic choice, so it checks the layer rules through aten's convolution; the replacement itself is checked
    against the float64 per-sample loop on every convolution case by the test suite (``tests/test_audit.py`` on
    the CPU, ``tests/test_cuda.py`` on a GPU).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"use_transposed_convolution_backward takes True, False or None (automatic), got {enabled!r}")
    _TRANSPOSED_CONVOLUTION_SETTING[0] = enabled
    for op, fix in _CONVOLUTIONS.items():
        if enabled:
            REPLACED_OPS[op] = fix
        else:
            REPLACED_OPS.pop(op, None)


@contextlib.contextmanager
def transposed_convolutions_where_automatic(wanted: bool) -> Iterator[None]:
    """Inside the block, forwards that mgs_torch runs route convolutions through :class:`_Convolution` when ``wanted``
    and :func:`use_transposed_convolution_backward` is in its automatic state (``None``); an explicit
    ``True``/``False`` wins. The choice is made when the forward records its graph, so the backward passes
    run later (``loss.backward()``) follow it."""
    if not wanted:
        yield
        return
    _AUTOMATIC_TRANSPOSED_CONVOLUTIONS[0] += 1
    try:
        yield
    finally:
        _AUTOMATIC_TRANSPOSED_CONVOLUTIONS[0] -= 1


def _replacement_table() -> dict:
    """The ops an :class:`ExactOps` created now replaces: :data:`REPLACED_OPS`, with the convolutions where the
    automatic choice asks for them."""
    if _AUTOMATIC_TRANSPOSED_CONVOLUTIONS[0] and _TRANSPOSED_CONVOLUTION_SETTING[0] is None:
        return {**REPLACED_OPS, **_CONVOLUTIONS}
    return REPLACED_OPS


@contextlib.contextmanager
def recording_replacements() -> Iterator[set]:
    """Collect the names of the ops any :class:`ExactOps` replaces inside the block."""
    names: set = set()
    _RECORDERS.append(names)
    try:
        yield names
    finally:
        _RECORDERS.remove(names)


def _substituted(value, substitutes: dict[int, Tensor]):
    """``value`` with each tensor whose id is in ``substitutes`` swapped, one level of lists and tuples included."""
    if isinstance(value, Tensor):
        return substitutes.get(id(value), value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) and id(v) in substitutes for v in value):
        return type(value)(substitutes.get(id(v), v) if isinstance(v, Tensor) else v for v in value)
    return value


class ExactOps(TorchFunctionMode):
    """Route the ops of :data:`REPLACED_OPS` to their exact compositions while active.

    ``substitutes`` maps ids of the model's own Parameters to the tensors that stand for them in this forward,
    for the Parameters a forward reaches other than through its modules' attributes (a list, a closure,
    ``functools.partial``), where ``functional_call`` cannot swap them.

    A replacement runs with the mode re-entered, so the ops it calls are routed too. Other functions
    run as they are, with the mode off inside them (as for any mode): a wrapper that calls a broken
    op internally needs its own entry (``F.multi_head_attention_forward``). ``replaced`` records
    which replacements ran (``verify`` shows it).
    """

    def __init__(self, substitutes: dict[int, Tensor] | None = None):
        super().__init__()
        self.substitutes = substitutes or {}
        self.replacements = _replacement_table()

    def __torch_function__(self, func, types_=(), args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.substitutes:  # Parameters the forward reaches other than through its modules' attributes
            args, kwargs = _substituted(args, self.substitutes), {k: _substituted(v, self.substitutes) for k, v in kwargs.items()}
        if func is _DATA_PTR and torch._C._functorch.is_functorch_wrapped_tensor(args[0]):
            # A torch.func wrapper has no storage. nn.LSTM/GRU/RNN on CUDA read the pointers of their
            # weights (flatten_parameters) only to see whether they alias; equal pointers make them
            # leave the weights as they are, which is what a functional call needs.
            return 0
        fix = self.replacements.get(func)
        if fix is not None:
            name = getattr(func, "__name__", str(func))
            for record in _RECORDERS:  # verify's report (recording_replacements)
                record.add(name)
            if func in _CALL_THE_ORIGINAL:
                return fix(*args, **kwargs)
            with self:
                return fix(*args, **kwargs)
        return func(*args, **kwargs)
