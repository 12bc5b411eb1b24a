"""Log-determinants of positive semi-definite kernels, honest about singularity."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator

import torch
from torch import Tensor

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


def check_square(K: Tensor) -> None:
    if not isinstance(K, Tensor):
        raise TypeError(f"K must be a tensor, got {type(K).__name__}")
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"K must be a non-empty square matrix, got shape {tuple(K.shape)}")


def logdet_psd(K: Tensor, jitter: float = 0.0, max_tries: int = 6) -> Tensor:
    """log det(K + εI) via Cholesky, 2 Σ log L_ii, differentiable (d = tr((K+εI)⁻¹ dK)).

    ε starts at ``jitter``; if K + εI is not numerically positive definite, ε grows from
    1e-10·mean(diag K) by factors of 100 (at most ``max_tries`` times) and a warning is issued once.
    Raises ``ValueError`` if no such ε works (K has non-finite entries or is far from PSD).
    """
    check_square(K)
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    scale = float(K.detach().diagonal().mean().abs()) or 1.0
    first = max(float(jitter), 1e-10 * scale)
    schedule = [float(jitter)] + [first * 100.0**i for i in range(max_tries)]
    for eps in schedule:
        L, info = torch.linalg.cholesky_ex(K + eps * eye if eps else K)
        if int(info) == 0:
            if eps != float(jitter):
                warn_once(
                    "logdet-jitter",
                    f"MGS kernel not positive definite; added jitter {eps:.3g}·I for its log-determinant "
                    f"(pass a larger jitter to silence this)",
                )
            return 2.0 * torch.log(L.diagonal()).sum()
    raise ValueError(
        f"the MGS kernel is not positive semi-definite even with jitter {schedule[-1]:.3g}; it may contain "
        f"NaN/inf (check the model outputs) — log det is undefined"
    )
