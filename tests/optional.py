"""The optional extras (torchvision, timm, transformers): skipped where not installed, or required.

A test file that needs an extra imports it through :func:`require_extra` at module level. Without
the extra the file is skipped with the import error in the reason; with ``MGS_REQUIRE_EXTRAS=1`` in
the environment the same import error fails the run instead (a collection error), so a CI job that
installed the extras cannot go green on a broken install (a torchvision built for another torch, a
missing dependency) by skipping 64 tests silently:

    pip install torch==2.13.0 torchvision --index-url https://download.pytorch.org/whl/cpu
    pip install -e ".[dev,hf,timm]"
    MGS_REQUIRE_EXTRAS=1 python -m pytest -q tests/test_torchvision_models.py tests/test_timm_models.py \\
        tests/test_transformers_models.py tests/test_transformers_reference.py
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_EXTRAS = "MGS_REQUIRE_EXTRAS"


def extras_required() -> bool:
    return os.environ.get(REQUIRE_EXTRAS, "").strip().lower() in ("1", "true", "yes")


def require_extra(module_name: str, extra: str) -> ModuleType:
    """``import module_name``; on any failure skip the calling test module, or fail it when required.

    Any exception counts, not only ImportError: a torchvision whose C ops do not match the installed
    torch raises RuntimeError at import time.
    """
    try:
        return importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - every failure to import means: not usable here
        reason = f"{module_name} not usable here ({type(error).__name__}: {error}); install the extra: pip install -e \".[{extra}]\""
        if extras_required():
            raise ImportError(f"{REQUIRE_EXTRAS} is set and {reason}") from error
        pytest.skip(reason, allow_module_level=True)
