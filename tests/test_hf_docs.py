"""Every code block of docs/huggingface.md (the README's Hugging Face section) runs as written, offline.

Python blocks run each in a fresh namespace in a temporary working directory; the ``tensorboard --logdir``
line must name the folder the Trainer block wrote its event files to.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from optional import require_extra  # noqa: E402

require_extra("transformers", "hf")

DOC = (Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", DOC, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_the_section_has_its_blocks():
    assert len(PYTHON) == 3 and {lang for lang, _ in BLOCKS} == {"python", "bash"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    if "peft" in PYTHON[index]:
        pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": f"hf_doc_block_{index}"}
    exec(compile(PYTHON[index], f"docs/huggingface.md python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    if "trainer" in namespace:  # the Trainer block: its values are in log_history and in TensorBoard's folder
        rows = namespace["trainer"].state.log_history
        assert [r["step"] for r in rows if "mgs/trace" in r] == [3, 6]
        assert [r["step"] for r in rows if "mgs/penalty" in r] == [3, 6]
        (logdir,) = [line.split()[2] for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()
                     if line.startswith("tensorboard --logdir")]
        assert list((tmp_path / logdir).rglob("events.out.tfevents.*"))
    else:
        assert "mgs/trace" in printed
