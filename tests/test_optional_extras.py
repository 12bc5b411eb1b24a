"""tests/optional.py: an optional extra that fails to import skips its file, or fails the run under
MGS_REQUIRE_EXTRAS=1 (issue 25: a broken install must not pass as 64 skipped tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optional import REQUIRE_EXTRAS, require_extra

MISSING = "mgs_torch_no_such_extra"
OPTIONAL_FILES = ["test_torchvision_models.py", "test_timm_models.py", "test_transformers_models.py", "test_transformers_reference.py"]


def test_an_installed_module_is_returned(monkeypatch):
    monkeypatch.setenv(REQUIRE_EXTRAS, "1")
    assert require_extra("json", "none").dumps([1]) == "[1]"


def test_a_missing_extra_skips_with_the_import_error(monkeypatch):
    monkeypatch.delenv(REQUIRE_EXTRAS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"ModuleNotFoundError: No module named '{MISSING}'.*pip install -e"):
        require_extra(MISSING, "vision")


@pytest.mark.parametrize("value", ["1", "true"])
def test_a_missing_extra_fails_when_extras_are_required(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_EXTRAS, value)
    with pytest.raises(ImportError, match=f"{REQUIRE_EXTRAS} is set and {MISSING} not usable here"):
        require_extra(MISSING, "vision")


def test_a_broken_install_counts_as_missing(monkeypatch, tmp_path):
    """Not only ImportError: a torchvision built for another torch raises RuntimeError on import."""
    (tmp_path / "broken_extra.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(REQUIRE_EXTRAS, raising=False)
    with pytest.raises(pytest.skip.Exception, match="RuntimeError: operator torchvision::nms"):
        require_extra("broken_extra", "vision")
    monkeypatch.setenv(REQUIRE_EXTRAS, "1")
    with pytest.raises(ImportError, match="RuntimeError: operator torchvision::nms"):
        require_extra("broken_extra", "vision")


@pytest.mark.parametrize("name", OPTIONAL_FILES)
def test_every_optional_file_imports_its_extra_through_the_helper(name):
    source = (Path(__file__).parent / name).read_text()
    if "from hf_helpers import" in source:  # the shared Hugging Face helpers import transformers for it
        source += (Path(__file__).parent / "hf_helpers.py").read_text()
    assert "require_extra(" in source and "allow_module_level" not in source, f"{name} skips on its own"
