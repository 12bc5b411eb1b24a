"""Every code block of README.md and docs/*.md runs as written (issues 11 and 24).

Python blocks are executed, each on its own in a fresh namespace, in a temporary working directory.
Shell blocks are checked line by line, and a line no rule checks fails the test: ``mgs-torch ...``
commands must parse with the real CLI parser (running the paper's grid would take hours), the
install and test lines must be what ``.ci/run`` runs, ``pip install -e`` must name extras that exist,
scripts must exist and know the flags they are given, and ``tensorboard --logdir DIR`` must name a
folder the Python blocks (or the demo) write event files to. Relative links must resolve.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = PAGES[0].read_text()


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = {page: _blocks(page.read_text()) for page in PAGES}
# docs/huggingface.md's blocks run in tests/test_hf_docs.py (with the Hugging Face extra)
PYTHON = [(page, code) for page, blocks in BLOCKS.items() for lang, code in blocks if lang == "python" and page.name != "huggingface.md"]
PYTHON_IDS = [f"{page.relative_to(ROOT)}-{i}" for i, (page, _) in enumerate(PYTHON)]


def test_the_readme_has_the_blocks_we_expect():
    readme = BLOCKS[PAGES[0]]
    assert sum(lang == "python" for lang, _ in readme) >= 3 and sum(lang == "bash" for lang, _ in readme) >= 3
    for page, blocks in BLOCKS.items():
        assert {lang for lang, _ in blocks} <= {"python", "bash"}, f"{page.name}: a block in another language is neither run nor checked"


def test_the_readme_is_a_guide_in_the_order_a_user_needs_it():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    order = ["Install", "Plain PyTorch", "PyTorch Lightning", "Hugging Face", "Choosing α, and what a step costs",
             "Check it on your model: `verify`", "More"]
    assert [h for h in headings if h in order] == order  # in this order; other sections may sit between them
    assert headings.index("PyTorch Lightning") <= 3  # Lightning within the first screenfuls, not behind internals
    assert len(README.splitlines()) <= 200
    # the two copy-paste commands come first, before any section
    first_section = README.index("\n## ")
    assert "mgs-torch demo" in README[:first_section] and "python -m pytest -q" in README[:first_section]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(PYTHON)), ids=PYTHON_IDS)
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    pytest.importorskip("pytorch_lightning")
    page, code = PYTHON[index]
    for extra in ("transformers", "peft"):
        if re.search(rf"^\s*(from|import) {extra}\b", code, flags=re.M):
            pytest.importorskip(extra)
    if "capture_step(step)" in code and not torch.cuda.is_available():
        pytest.skip("the CUDA-graph block needs a GPU (benchmarks/cuda_graphs.py runs the same recipe there)")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"{page.name} python block {index}", "exec"), {"__name__": f"doc_block_{index}"})
    capsys.readouterr()


def _shell_lines(pages=PAGES):
    for page in pages:
        for lang, block in BLOCKS[page]:
            if lang != "bash":
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                for part in line.split("&&"):
                    if part.strip():
                        yield part.strip()


def test_mgs_torch_commands_parse():
    from mgs_bench.cli import build_parser

    commands = [shlex.split(c) for c in _shell_lines() if c.startswith("mgs-torch")]
    assert len(commands) >= 3 and any(c.startswith("mgs-torch demo") for c in _shell_lines(PAGES[:1]))
    for argv in commands:
        build_parser().parse_args(argv[1:])  # SystemExit (exit code 2) on an unknown option


def test_install_and_test_lines_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = list(_shell_lines(PAGES[:1]))
    assert "python -m pytest -q" in lines and "python -m pytest -q" in ci
    assert 'pip install -e ".[dev]" -e ./bench' in lines and '-e ".[dev]" -e ./bench' in ci
    assert "pip install torch==2.13.0" in lines and "torch==2.13.0" in ci
    assert "bash .ci/run" in _shell_lines() and (ROOT / ".ci" / "run").exists()
    pins = re.findall(r"torch(?:>=|==)([\d.]+)", (ROOT / "pyproject.toml").read_text())
    assert pins and all(tuple(map(int, p.split(".")[:2])) >= (2, 13) for p in pins)  # the floor is the tested version


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    return set(re.findall(r"^(\w+)\s*=", section, flags=re.M))


def _check_script(argv: list[str]) -> None:
    script = ROOT / argv[1]
    assert script.exists(), f"{argv[1]} does not exist"
    source = script.read_text()
    for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{argv[1]} has no option {flag}"


def test_every_shell_line_is_checked():
    """Each line is one of the kinds the tests above (or this one) check; anything else is an error."""
    extras, demo_outs = _extras(), []
    for line in _shell_lines():
        argv = shlex.split(line)
        if line.startswith(("python3 -m venv", ". .venv/bin/activate", "pip install torch==2.13.0", "python -m pytest",
                            "bash .ci/run", "tensorboard --logdir")):
            continue  # the CI lines (above), tensorboard (below)
        if re.fullmatch(r"pip install torch==2\.1[3-9]\.\d+ torchvision==0\.\d+\.\d+", line):
            continue  # torchvision with the torch it is built for, installed together (docs/testing.md's extras)
        if argv[:4] == ["MGS_REQUIRE_EXTRAS=1", "python", "-m", "pytest"]:
            for path in argv[4:]:
                assert path.startswith("-") or (ROOT / path).exists(), f"{line}: no file {path}"
            continue  # the extras' files, required (tests/optional.py)
        if line.startswith("mgs-torch"):
            if argv[1] == "demo":
                demo_outs.append(argv[argv.index("--out") + 1] if "--out" in argv else "mgs_demo")
            continue  # parsed above
        if argv[:3] == ["pip", "install", "-e"]:
            for target in argv[3:]:
                if target == "-e":
                    continue
                path, _, extra = target.partition("[")
                assert (ROOT / path).exists(), line
                assert not extra or set(extra.rstrip("]").split(",")) <= extras, f"{line}: no such extra"
            continue
        if argv[0] in ("python", "bash") and argv[1].endswith((".py", ".sh")):
            _check_script(argv)
            continue
        raise AssertionError(f"a shell line no test checks: {line!r}")
    logdirs = [c.split()[-1] for c in _shell_lines() if c.startswith("tensorboard --logdir")]
    for logdir in logdirs:  # the demo writes <out>/tensorboard (tests/test_testbench_cli.py runs it); hf_out/runs is
        # where docs/huggingface.md's Trainer block writes (tests/test_hf_docs.py runs it and checks the folder)
        assert logdir in {"lightning_logs", "hf_out/runs"} or logdir in {f"{out}/tensorboard" for out in demo_outs}, logdir


@pytest.mark.filterwarnings("ignore")
def test_tensorboard_logdir_of_the_lightning_snippet(tmp_path, monkeypatch, capsys):
    """The README's Lightning block writes where `tensorboard --logdir lightning_logs` looks, and its
    per-step values reach the logger (12 batches per epoch, log_every_n_steps=4)."""
    pytest.importorskip("pytorch_lightning")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.chdir(tmp_path)
    (snippet,) = [code for page, code in PYTHON if "TensorBoardLogger" in code and page == PAGES[0]]
    exec(compile(snippet, "README.md lightning block", "exec"), {"__name__": "readme_lightning"})
    capsys.readouterr()
    assert "tensorboard --logdir lightning_logs" in _shell_lines(PAGES[:1])
    runs = {p.parent.relative_to(tmp_path / "lightning_logs").as_posix() for p in (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")}
    assert runs == {"net/version_0"}  # not lightning_logs/lightning_logs/...
    ea = event_accumulator.EventAccumulator(str(tmp_path / "lightning_logs" / "net" / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in ea.Scalars("mgs/trace")] == [3, 7, 11, 15, 19, 23, 27, 31, 35]  # 36 steps, every 4th
    assert [e.step for e in ea.Scalars("train/mgs_penalty")] == [23, 27, 31, 35]  # after the 20-step warm-up
    assert len(ea.Scalars("mgs/trace_epoch")) == 3


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=[p.name if p.parent == ROOT else f"docs/{p.name}" for p in PAGES])
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: broken link {target}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading for #{anchor} in {file.name}"


def test_user_docs_say_nothing_about_the_development_machines():
    for page in PAGES:
        text = page.read_text().lower()
        for phrase in ("2-core", "two-core", "developed on", "this machine", "the machines this", "busy machine"):
            assert phrase not in text, f"{page.name} mentions {phrase!r}"
