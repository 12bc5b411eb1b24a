"""Warnings issued once per process, pointing at the user's line (never once per training step)."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn_once"]

_warned: set[str] = set()


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points ``warnings.warn`` at the first frame outside mgs_torch."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2  # skip this helper and warn_once
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` the first time ``key`` is seen in this process, never per step, pointing at
    the user's line that called into mgs_torch."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=_caller_stacklevel())
