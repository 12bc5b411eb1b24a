"""Every code block of README.md runs as written (issue 11, item 5).

Python blocks are executed, each on its own in a fresh namespace, in a temporary working directory.
Shell blocks are checked line by line: ``mgs-torch ...`` commands must parse with the real CLI parser
(running the paper's grid would take hours), the install and test lines must be what ``.ci/run`` runs,
and ``tensorboard --logdir DIR`` must name a folder the Python blocks actually wrote event files to.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "bash"]


def test_the_readme_has_the_blocks_we_expect():
    assert len(PYTHON) >= 2 and len(SHELL) >= 4
    assert {lang for lang, _ in BLOCKS} <= {"python", "bash"}, "a block in another language is neither run nor checked"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    pytest.importorskip("pytorch_lightning")
    if "capture_step(step)" in PYTHON[index] and not torch.cuda.is_available():
        pytest.skip("the CUDA-graph block needs a GPU (benchmarks/cuda_graphs.py runs the same recipe there)")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(PYTHON[index], f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
    capsys.readouterr()


def _shell_lines():
    for block in SHELL:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                if part.strip():
                    yield part.strip()


def test_mgs_torch_commands_parse():
    from mgs_bench.cli import build_parser

    commands = [shlex.split(c) for c in _shell_lines() if c.startswith("mgs-torch")]
    assert len(commands) >= 3
    for argv in commands:
        build_parser().parse_args(argv[1:])  # SystemExit (exit code 2) on an unknown option


def test_install_and_test_lines_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = list(_shell_lines())
    assert "python -m pytest -q" in lines and "python -m pytest -q" in ci
    assert 'pip install -e ".[dev]" -e ./bench' in lines and '-e ".[dev]" -e ./bench' in ci
    assert "pip install torch==2.13.0" in lines and "torch==2.13.0" in ci
    assert "bash .ci/run" in lines and (ROOT / ".ci" / "run").exists()
    pins = re.findall(r"torch(?:>=|==)([\d.]+)", (ROOT / "pyproject.toml").read_text())
    assert pins and all(tuple(map(int, p.split(".")[:2])) >= (2, 13) for p in pins)  # the floor is the tested version


@pytest.mark.filterwarnings("ignore")
def test_tensorboard_logdir_of_the_lightning_snippet(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pytorch_lightning")
    monkeypatch.chdir(tmp_path)
    (snippet,) = [code for code in PYTHON if "TensorBoardLogger" in code]
    exec(compile(snippet, "README.md lightning block", "exec"), {"__name__": "readme_lightning"})
    capsys.readouterr()
    logdirs = [c.split()[-1] for c in _shell_lines() if c.startswith("tensorboard --logdir")]
    assert "lightning_logs" in logdirs
    runs = {p.parent.relative_to(tmp_path / "lightning_logs").as_posix() for p in (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")}
    assert runs == {"net/version_0"}  # not lightning_logs/lightning_logs/...
