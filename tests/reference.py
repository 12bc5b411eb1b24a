"""The independent reference every engine is checked against: plain autograd, one sample at a time.

No torch.func anywhere: each sample is run through the model on its own (a batch of one), and each
of its outputs is differentiated with one ``torch.autograd.grad``. Penalty gradients differentiate
that loop once more (``create_graph=True``), and central finite differences check the loop itself.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


class _PlainInstanceNorm(TorchFunctionMode):
    """``F.instance_norm`` (and ``F.embedding_bag``, ``F.hardsigmoid``) as formulas in elementary ops, for the loop only.

    PyTorch 2.13's CPU instance norm runs ``batch_norm`` on the input reshaped to a batch of one,
    whose backward is wrong when the incoming gradient has channels-last strides (a map flattened and
    transposed into tokens; tests/test_upstream_bugs.py). Written here independently of mgs_torch's
    own replacement (mgs_torch.op_fixes), which it checks.
    """

    def __init__(self, second_order: bool = False):
        super().__init__()
        self.second_order = second_order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.instance_norm:
            return _instance_norm(*args, **kwargs)
        if func is F.embedding_bag:
            return _embedding_bag(func, *args, **kwargs)
        if func is torch.pdist and self.second_order:  # PyTorch has no double backward for it: its definition
            x, p = args[0], (args[1] if len(args) > 1 else kwargs.get("p", 2.0))
            i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
            return ((x[i] - x[j]).abs() ** p).sum(-1) ** (1 / p)
        if func is torch.cdist and self.second_order:  # PyTorch has no double backward for it: its definition
            x1, x2, p = args[0], args[1], (args[2] if len(args) > 2 else kwargs.get("p", 2.0))
            return ((x1.unsqueeze(-2) - x2.unsqueeze(-3)).abs() ** p).sum(-1) ** (1 / p) if p != float("inf") else (
                (x1.unsqueeze(-2) - x2.unsqueeze(-3)).abs().amax(-1))
        if func is F.hardsigmoid:  # no double backward upstream, and a single-precision 1/6 in its derivative
            return _hardsigmoid(*args, **kwargs)
        return func(*args, **kwargs)


def _embedding_bag(original, input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="mean",
                   sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """Bags of equal length (a 2-D index tensor) as embedding + reduction: PyTorch's own op has no
    double backward, so the loop could not differentiate the penalty of a model that uses it."""
    if input.dim() != 2 or offsets is not None or max_norm is not None or padding_idx is not None:
        return original(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, per_sample_weights,
                        include_last_offset, padding_idx)
    e = F.embedding(input, weight)
    if per_sample_weights is not None:
        e = e * per_sample_weights.unsqueeze(-1)
    return {"sum": e.sum(1), "mean": e.mean(1), "max": e.amax(1)}[mode]


def _hardsigmoid(x, inplace=False):
    y = torch.clamp((x + 3.0) / 6.0, 0.0, 1.0)
    return x.copy_(y) if inplace else y


def _instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if use_input_stats:
        dims = tuple(range(2, x.dim()))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _as_tuple(inputs):
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def jacobian_loop(
    model: nn.Module, inputs, params=None, *, create_graph: bool = False, whole_batch: bool = False, batch_of_one: bool = False
):
    """J by brute force, rows ordered (sample, output), columns the concatenated ``params``.

    Each sample runs as a batch of two identical copies and the first copy's outputs are
    differentiated: PyTorch 2.13's CPU ``batch_norm`` backward (BatchNorm2d in eval and train mode)
    is wrong at batch size one when the incoming gradient has channels-last strides, as after
    ``flatten(2).transpose(1, 2)`` (tests/test_upstream_bugs.py); instance norm, which calls it on a
    batch of one whatever the batch, runs as its formula (:class:`_PlainInstanceNorm`). For a per-sample model
    the copies do not interact, so this is f(x_i). ``batch_of_one``: run each sample alone instead
    (the per-sample semantics of a model whose samples interact).

    ``whole_batch``: differentiate the outputs of one batched forward (samples may interact, e.g.
    train-mode BatchNorm); the model is deep-copied first so running statistics do not move.
    """
    inputs = _as_tuple(inputs)
    params = trainable(model) if params is None else list(params)
    rows = []
    # plain autograd, but attention through PyTorch's math backend: the fused kernels have no double backward
    math_attention = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()

    def grads_of(out):
        for a in range(out.numel()):
            gs = torch.autograd.grad(out[a], params, retain_graph=True, create_graph=create_graph, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))

    with math_attention, _PlainInstanceNorm(second_order=create_graph):
        if whole_batch:
            grads_of(model(*inputs).reshape(-1))
        else:
            for i in range(inputs[0].shape[0]):
                if batch_of_one:
                    grads_of(model(*(x[i : i + 1] for x in inputs)).reshape(-1))
                else:
                    grads_of(model(*(torch.cat([x[i : i + 1]] * 2) for x in inputs))[:1].reshape(-1))
    return torch.stack(rows)


def kernel_loop(model, inputs, params=None, *, outputs: str = "full", create_graph: bool = False, whole_batch: bool = False,
                batch_of_one: bool = False):
    """K = J Jᵀ from :func:`jacobian_loop`; ``outputs="sum"`` sums the output blocks (n×n)."""
    J = jacobian_loop(model, inputs, params, create_graph=create_graph, whole_batch=whole_batch, batch_of_one=batch_of_one)
    K = J @ J.T
    if outputs == "sum":
        n = _as_tuple(inputs)[0].shape[0]
        q = K.shape[0] // n
        K = K.reshape(n, q, n, q).diagonal(dim1=1, dim2=3).sum(-1)
    return K


def penalty_value_loop(model, inputs, kind: str, *, outputs: str = "full", whole_batch: bool = False):
    """g(K) with its graph: tr K or log det K (slogdet; the reference never adds jitter)."""
    with sdpa_kernel(SDPBackend.MATH):
        K = kernel_loop(model, inputs, outputs=outputs, create_graph=True, whole_batch=whole_batch)
    if kind == "trace":
        return K.trace()
    sign, logabs = torch.linalg.slogdet(K)
    assert sign > 0, "the reference kernel is singular; pick a model with p ≥ n·q"
    return logabs


def penalty_grad_loop(model, inputs, kind: str, *, outputs: str = "full", whole_batch: bool = False):
    """∂g(K)/∂θ for every trainable parameter, by differentiating the autograd loop."""
    value = penalty_value_loop(model, inputs, kind, outputs=outputs, whole_batch=whole_batch)
    return torch.autograd.grad(value, trainable(model), allow_unused=True)


def penalty_grad_fd(model, inputs, kind: str, *, eps: float = 1e-6, whole_batch: bool = False, max_entries: int | None = None):
    """Central finite differences of the loop's g(K) on the first ``max_entries`` entries of each parameter (all: None)."""
    model = copy.deepcopy(model)
    out = []
    for p in trainable(model):
        flat = p.data.view(-1)
        g = torch.zeros(flat.numel() if max_entries is None else min(flat.numel(), max_entries), dtype=p.dtype)
        for e in range(g.numel()):
            old = flat[e].item()
            flat[e] = old + eps
            hi = penalty_value_loop(model, inputs, kind, whole_batch=whole_batch).item()
            flat[e] = old - eps
            lo = penalty_value_loop(model, inputs, kind, whole_batch=whole_batch).item()
            flat[e] = old
            g[e] = (hi - lo) / (2 * eps)
        out.append(g)
    return out


def flat_gradients(grads, params) -> torch.Tensor:
    """Gradients as one vector in the parameters' order, a parameter the value does not reach (``None``) as zeros."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / max(‖expected‖, tiny): one number per comparison."""
    scale = max(float(expected.norm()), 1e-300)
    return float((actual - expected).norm()) / scale
