"""mgs_bench: the testbench reproducing the MGS paper's experiments on offline data (label noise × training size).

An application built on mgs_torch's public API, installed separately (``pip install -e ./bench``), so
the core wheel carries none of it. The ``mgs-torch`` console script (``demo``, ``testbench``,
``report``, …) is :mod:`mgs_bench.cli`.

Modules: :mod:`.data` (data sets, label noise, stratified subsets, IDX loader), :mod:`.models`
(FCN, LeNet-5), :mod:`.methods` (regularisers with one hyper-parameter each), :mod:`.runner`
(training loop, resumable grids, tuning), :mod:`.plots` (figures), :mod:`.report` (tables).

The core package never imports this one; its own dependencies (scikit-learn, matplotlib, mnist1d,
tqdm, mlxtend, tensorboard) come with ``pip install -e ./bench``.
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
        raise ImportError(
            f"{purpose} needs the package {module.split('.')[0]!r}, which is not installed: "
            f"pip install -e ./bench (from the mgs_torch repository) installs the testbench with its dependencies"
        ) from exc
