"""Bounding torch's CPU threads for one computation (eigensolvers on shared cores)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """At most ``n`` intra-op CPU threads for the duration (``None``: unchanged); restored after."""
    old = torch.get_num_threads()
    if n is None or n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
