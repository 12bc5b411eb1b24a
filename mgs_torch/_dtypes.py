"""The one rule for a compute ``dtype`` argument, shared by the core and the Lightning classes."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["as_dtype"]


def as_dtype(name: str, value: Any) -> torch.dtype | None:
    """``None``, a floating ``torch.dtype``, or its name (``"float64"``, ``"torch.float64"``) -> the dtype.

    Names are accepted everywhere (``mgs_kernel``, ``mgs_penalty``, ``MGSMonitor``, the mixin) because
    Lightning saves hyper-parameters as text and gives them back as text on ``load_from_checkpoint``.
    Anything else (an integer dtype, an unknown name, a Python type) raises ``TypeError``.
    """
    given = value
    if isinstance(value, str):
        candidate = getattr(torch, value.strip().removeprefix("torch."), None)
        value = candidate if isinstance(candidate, torch.dtype) else value
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(
            f"{name} must be a floating torch.dtype (e.g. torch.float64), its name (e.g. 'float64'), or None; got {given!r}"
        )
    return value
