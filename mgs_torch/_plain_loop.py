"""What the plain autograd loop needs where PyTorch's own first derivative is not the one MGS uses.

The references of :func:`~mgs_torch.verify` and of the self-check (:mod:`mgs_torch.self_check`) are plain
per-sample autograd over the model's own ops, never torch.func. A few of PyTorch's ops report a first derivative
that is wrong, imprecise, or rescaled by definition; the loop computes them as these formulas instead:

* ``F.instance_norm``: (x − mean) / sqrt(var + eps) · w + b over each map. PyTorch 2.13's CPU kernel calls
  ``batch_norm`` on a batch of one, whose backward is wrong when the incoming gradient has channels-last strides
  (a map turned into tokens).
* ``F.hardsigmoid``: relu6(x + 3) / 6. PyTorch's CPU derivative multiplies by a single-precision 1/6 even in
  float64 (3·10⁻⁸ off), and it has no double backward.
* ``F.prelu``: where(x > 0, x, w·x). PyTorch's first derivative at an input of exactly 0 is the slope w, but its
  double backward there is not the derivative of that first derivative (off by the zero inputs' share), so the
  penalty gradient of a PReLU fed exact zeros (a zero sample through a layer without bias) would not be checked.
* ``F.embedding`` / ``F.embedding_bag`` with ``scale_grad_by_freq=True``: autograd reports the gradient divided
  by each index's count in the batch, which is not the function's derivative; MGS uses the function's derivative
  (``sparse=True`` only changes the gradient's layout).

Modules whose whole backward PyTorch gets wrong are computed by their exact forwards
(:data:`~mgs_torch.op_fixes.EXACT_FORWARDS`, entered by the callers). ``tests/test_upstream_bugs.py`` pins each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["LoopFormulas", "FloatingDtypes", "lowest_precision"]


class LoopFormulas(TorchFunctionMode):
    """The loop's instance norm, hardsigmoid, PReLU and embeddings, as the formulas and definitions above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.instance_norm:
            return instance_norm_formula(*args, **kwargs)
        if func is F.hardsigmoid:
            x = args[0] if args else kwargs["input"]
            y = F.relu6(x + 3.0) / 6.0
            return x.copy_(y) if (args[1:2] or [kwargs.get("inplace", False)])[0] else y
        if func is F.prelu:
            return prelu_formula(*args, **kwargs)
        if func in (F.embedding, F.embedding_bag) and (kwargs.get("scale_grad_by_freq") or kwargs.get("sparse")):
            kwargs = {**kwargs, "scale_grad_by_freq": False, "sparse": False}
        return func(*args, **kwargs)


def prelu_formula(input, weight):
    """where(x > 0, x, w·x), the slopes along dim 1 (one shared slope keeps any shape)."""
    w = weight.reshape(()) if weight.numel() == 1 else weight if input.dim() < 2 else weight.reshape(
        (1, -1) + (1,) * (input.dim() - 2))
    return torch.where(input > 0, input, w * input)


def instance_norm_formula(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1,
                          eps=1e-5):
    view = (1, -1) + (1,) * (x.dim() - 2)
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True) if use_input_stats else running_mean.reshape(view)
    var = x.var(dims, unbiased=False, keepdim=True) if use_input_stats else running_var.reshape(view)
    y = (x - mean) / torch.sqrt(var + eps)
    y = y if weight is None else y * weight.reshape(view)
    return y if bias is None else y + bias.reshape(view)


class FloatingDtypes(TorchFunctionMode):
    """Records the floating dtypes of every op's tensor results (``.seen``)."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.seen.add(t.dtype)
        return out


def lowest_precision(seen: set[torch.dtype]) -> torch.dtype | None:
    """The least precise floating dtype below float64 among ``seen``, or None."""
    low = [d for d in seen if torch.finfo(d).eps > torch.finfo(torch.float64).eps]
    return max(low, key=lambda d: torch.finfo(d).eps) if low else None
