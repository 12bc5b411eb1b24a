"""Documented errors that had no test of their own (issue 24, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mgs_early_stopping_needs_a_metric_key():
    pytest.importorskip("pytorch_lightning")
    from mgs_torch.lightning import MGSEarlyStopping

    with pytest.raises(TypeError, match="monitor must be a callback-metric key"):
        MGSEarlyStopping(monitor=3)


def test_the_lightning_subpackage_without_lightning_says_what_to_install():
    """``import mgs_torch.lightning`` with neither ``pytorch_lightning`` nor ``lightning`` importable."""
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"
        "import mgs_torch\n"
        "try:\n    import mgs_torch.lightning\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ImportError: mgs_torch.lightning needs PyTorch Lightning" in out.stdout
    assert "pip install -e '.[lightning]'" in out.stdout  # the package is on no index: install from the clone
