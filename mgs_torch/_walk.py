"""One walk of a model's module tree per mgs_torch call, instead of one per check.

A call of :func:`~mgs_torch.mgs_trace` (or the kernel, the penalty) asks the module tree many questions
before and after its forward: train flags, BatchNorm layers, Dropout, hooks, caches, parameter names and
owners, the cache key of its plan. Each used to walk ``model.modules()`` or ``model.named_parameters()``
again, about 25 walks a call, which on a 50-module tiny BERT costs about 5 ms of a 25 ms call.

Inside :func:`one_walk` (entered by :func:`~mgs_torch._guards.preserved_state`, so by every eager entry
point) the ``named_modules()`` list is taken once and reused. Only the *tree* is held: parameters and
buffers are read live from each module's ``_parameters`` and ``_buffers`` (``functional_call`` swaps them
during a call, and a lazy module materialises its own), train flags and hooks too. Outside it, and while
``torch.compile`` traces, every helper is the plain ``nn.Module`` method. A model class that overrides
``named_modules``, ``named_parameters`` or ``named_buffers`` always gets its own method.

Each helper yields what the ``nn.Module`` method of the same name yields, in the same order, a shared
module or tensor once (the default ``remove_duplicate=True``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["one_walk", "named_modules", "modules", "named_parameters", "parameters", "named_buffers"]

#: id(model) -> [its named_modules() as a tuple, how many one_walk contexts hold it]
_WALKS: dict[int, list] = {}


@contextlib.contextmanager
def one_walk(model: nn.Module) -> Iterator[None]:
    """Take ``model``'s module tree once; the helpers below reuse it until the outermost context exits."""
    if _overrides(model, "named_modules"):  # its own walk, every time
        yield
        return
    key = id(model)  # the model is alive while an entry for it exists (this frame holds it)
    entry = _WALKS.get(key)
    if entry is None:
        entry = _WALKS[key] = [tuple(model.named_modules()), 0]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0 and _WALKS.get(key) is entry:
            del _WALKS[key]


def _overrides(model: nn.Module, name: str) -> bool:
    return getattr(type(model), name) is not getattr(nn.Module, name)


def named_modules(model: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """``tuple(model.named_modules())``, from the walk held by :func:`one_walk` where there is one."""
    if not torch.compiler.is_compiling():
        entry = _WALKS.get(id(model))
        if entry is not None:
            return entry[0]
    return tuple(model.named_modules())


def modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``."""
    return [m for _, m in named_modules(model)]


def _named_members(model: nn.Module, method: str, attribute: str) -> list[tuple[str, Tensor]]:
    if _overrides(model, method) or torch.compiler.is_compiling() or id(model) not in _WALKS:
        return list(getattr(model, method)())
    seen: set[int] = set()
    out = []
    for prefix, module in named_modules(model):  # as nn.Module._named_members: each tensor once, first name wins
        for local, tensor in getattr(module, attribute).items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out.append((f"{prefix}.{local}" if prefix else local, tensor))
    return out


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``list(model.named_parameters())``."""
    return _named_members(model, "named_parameters", "_parameters")


def parameters(model: nn.Module) -> list[nn.Parameter]:
    """``list(model.parameters())``."""
    return [p for _, p in named_parameters(model)]


def named_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``list(model.named_buffers())``."""
    return _named_members(model, "named_buffers", "_buffers")
