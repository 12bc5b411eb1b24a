"""Why padded batches of Hugging Face models fell to the whole-batch route, and the fix.

``transformers`` builds attention masks in ``masking_utils``: before it materialises a 4-D mask it asks
whether it may skip it — ``padding_mask.all()`` (no padding: let SDPA use ``is_causal`` or no mask at
all), ``torch.all(attention_mask == 1)``, ``pad_token_id in input_ids[:, [-1, 0]]`` (the "you forgot
the attention mask" warning). Each is a Python ``if`` on a tensor's *values*. Under ``torch.func.vmap``
(the per-sample route: every sample runs alone) the mask is a batched tensor whose truth value differs
between samples, so vmap refuses ("data-dependent control flow") and mgs_torch fell back to the
whole-batch Jacobian, about n times the cost.

transformers guards every one of these reads with ``is_tracing(tensor)`` — true under
``torch.compile``, ``torch.export``, ``torch.jit`` and FX, where values cannot be read either — and
then builds the mask explicitly. A mask of all ones is the same function as no mask, so skipping is
only a shortcut. :func:`masks_built_under_transforms` makes ``is_tracing`` also true for tensors
wrapped by a torch.func transform (batched or gradient-tracking), for as long as mgs_torch runs a
forward: transformers then takes the path it takes under compilation. Outside torch.func transforms
nothing changes, and every other value of ``is_tracing`` is the original's.

This module never imports transformers: it patches the modules already loaded (a model of theirs exists).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator

import torch

__all__ = ["masks_built_under_transforms"]

_lock = threading.Lock()
_depth = 0
_patched: list[tuple[object, Callable]] = []
_targets: tuple[int, list[object], Callable | None] = (-1, [], None)


def _is_functorch_wrapped(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _modules_to_patch() -> tuple[list[object], Callable | None]:
    """The loaded transformers modules that hold the original ``is_tracing`` (cached per module count)."""
    global _targets
    count = len(sys.modules)
    if _targets[0] == count:
        return _targets[1], _targets[2]
    source = sys.modules.get("transformers.utils.import_utils")
    original = getattr(source, "is_tracing", None)
    modules = []
    if original is not None:
        for name, module in list(sys.modules.items()):
            if (name == "transformers" or name.startswith("transformers.")) and getattr(module, "is_tracing", None) is original:
                modules.append(module)
    _targets = (count, modules, original)
    return modules, original


@contextlib.contextmanager
def masks_built_under_transforms() -> Iterator[None]:
    """transformers' ``is_tracing(t)`` is also true for a torch.func-wrapped ``t`` inside this block
    (re-entrant and thread-safe: patched on the first entry, restored on the last exit). Nothing to do while
    torch.compile traces the call: ``is_tracing`` is true there already (and a lock cannot be traced)."""
    global _depth
    if torch.compiler.is_compiling():
        yield
        return
    with _lock:
        if _depth == 0:
            modules, original = _modules_to_patch()
            if original is not None:

                def is_tracing(tensor=None) -> bool:
                    return original(tensor) or _is_functorch_wrapped(tensor)

                for module in modules:
                    _patched.append((module, original))
                    module.is_tracing = is_tracing
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for module, original in _patched:
                    module.is_tracing = original
                _patched.clear()
