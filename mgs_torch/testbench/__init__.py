"""Testbench reproducing the MGS paper's experiments on offline data (label noise × training size).

Modules: :mod:`.data` (data sets, label noise, stratified subsets, IDX loader), :mod:`.models`
(FCN, LeNet-5), :mod:`.methods` (regularisers with one hyper-parameter each), :mod:`.runner`
(training loop, resumable grids, tuning), :mod:`.plots` (figures), :mod:`.report` (tables).

The core package never imports this one. It needs the ``examples`` extra for data and figures
(scikit-learn, matplotlib, mnist1d, mlxtend, tqdm) and tensorboard for logging:
``pip install "mgs-torch[examples]"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise an ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        extra = "lightning" if module.startswith("tensorboard") else "examples"
        raise ImportError(
            f"{purpose} needs the optional package {module.split('.')[0]!r}, which is not installed: "
            f'pip install "mgs-torch[{extra}]"'
        ) from exc
