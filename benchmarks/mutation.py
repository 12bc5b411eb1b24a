"""Mutation testing of mgs_torch: change the library one operator at a time, rerun the tests that
cover the changed module, and count the changes no test notices (the survivors).

A small script of its own rather than mutmut or cosmic-ray: both rerun a test command in a fresh
interpreter per mutant, and this suite's torch import, model zoo and per-module test selection make
that minutes per mutant on the 2-core machines (docs/testing.md). Here the parent imports torch and
pytest once and forks a child per mutant, which writes the mutant into a private copy of the work
tree and runs, with ``pytest -x``, only the tests of the module's selection that execute the mutated
lines (measured once per module with coverage.py, one context per test); a mutant no test reaches is
reported as ``not covered`` without a run.

Mutants are regenerated from the current source on every run and identified by module, operator
and the text of the mutated line (not its number), so the results file (JSONL, appended after every
mutant) stays valid while unrelated lines move, and an interrupted run resumes where it stopped.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/mutation.py run            # every module in MODULES
    python benchmarks/mutation.py run mgs_torch/estimators.py                 # one module
    python benchmarks/mutation.py list mgs_torch/estimators.py                # the mutants, without running
    python benchmarks/mutation.py report                                      # survival per module, survivors
    python benchmarks/mutation.py show ID                                     # one mutant as a diff
    python benchmarks/mutation.py check ID [TESTS...]                         # exit 0 when the tests kill it

Results go to benchmarks/mutation-results.jsonl (``--results`` to change it). Operators: comparison
flips (< ↔ <=, == ↔ !=, is ↔ is not, in ↔ not in), arithmetic (+ ↔ -, * ↔ /, ** → *, @ → *),
constants (integers +1, floats ×1.01, 0.0 → 1.0), True ↔ False, and ↔ or, ``not`` dropped, a bare
condition negated, unary minus dropped, option strings swapped ("different" → "same", "full" ↔
"sum", "trace" ↔ "logdet", ...) and other identifier-like strings spoiled, and a statement deleted
(a call, an augmented or attribute/item assignment, ``continue``/``break``). Not mutated: docstrings,
``__all__``, annotations, f-strings, ``raise``/``assert`` statements and ``warnings.warn`` calls
(messages, not behaviour).
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "mutation-results.jsonl"

# The test selection per module: the files (or node ids) whose failures a mutant there should cause,
# fastest and broadest first (``-x`` stops at the first failure). Chosen from the suite's durations.
_CORE_FAST = [
    "tests/test_dropout_masks.py",
    "tests/test_kernel.py",
    "tests/test_penalty.py",
]
_AUDIT = ["tests/test_audit.py::test_matches_the_autograd_loop", "tests/test_audit.py::test_chunked_and_filtered_computations_match_the_loop"]
MODULES: dict[str, list[str]] = {
    "mgs_torch/estimators.py": _CORE_FAST,
    "mgs_torch/kernel.py": _CORE_FAST + ["tests/test_errors.py", "tests/test_side_effects.py"],
    "mgs_torch/penalty.py": _CORE_FAST + ["tests/test_side_effects.py", "tests/test_convolution_backward_choice.py"] + _AUDIT,
    "mgs_torch/engines/jacobian.py": _CORE_FAST + _AUDIT + ["tests/test_trust.py"],
    "mgs_torch/engines/__init__.py": _CORE_FAST + ["tests/test_structured.py"] + _AUDIT,
    "mgs_torch/engines/structured.py": _CORE_FAST + ["tests/test_structured.py"] + _AUDIT,
    "mgs_torch/engines/layers.py": _CORE_FAST + ["tests/test_structured.py"] + _AUDIT,
    "mgs_torch/engines/factors.py": _CORE_FAST + ["tests/test_structured.py"] + _AUDIT
    + ["tests/test_audit.py::test_unfolded_convolution_gradients_match_the_loop"],
    "mgs_torch/_problem.py": _CORE_FAST + ["tests/test_trust.py", "tests/test_side_effects.py", "tests/test_errors_inputs.py"] + _AUDIT,
    "mgs_torch/op_fixes.py": ["tests/test_op_fixes.py", "tests/test_faithful_forwards.py"] + _CORE_FAST + _AUDIT
    + ["tests/test_audit.py::test_transposed_convolution_backward_matches_the_loop", "tests/test_convolution_backward_choice.py"],
    "mgs_torch/metrics.py": ["tests/test_metrics.py", "tests/test_metrics_checks.py"],
    "mgs_torch/scores.py": ["tests/test_scores.py"],
    "mgs_torch/verify.py": ["tests/test_trust.py", "tests/test_readme.py"],
    "mgs_torch/lightning/callback.py": ["tests/test_lightning_monitor.py", "tests/test_lightning_callback_metrics.py",
                                        "tests/test_lightning_ddp.py"],
    "mgs_torch/lightning/mixin.py": ["tests/test_lightning_mixin.py"],
}
IMPORT_TIME_FILES = 3  # how many of a module's test files a mutant of a line run at import time gets
CORE = [m for m in MODULES if not m.startswith(("mgs_torch/metrics", "mgs_torch/scores", "mgs_torch/verify", "mgs_torch/lightning"))]

# option values whose swap is a plausible bug; other identifier-like strings are spoiled ("XX…XX")
STRING_SWAPS = {
    "different": "same", "same": "different", "error": "different", "full": "sum", "sum": "full", "mean": "sum",
    "trace": "logdet", "logdet": "trace", "exact": "hutchinson", "hutchinson": "exact", "eval": "batch",
    "batch": "eval", "jacobian": "structured", "structured": "jacobian", "auto": "jacobian", "weight": "bias",
    "bias": "weight", "cpu": "cuda", "cuda": "cpu",
}
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult, ast.Pow: ast.Mult,
         ast.MatMult: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SIMPLE_STATEMENTS = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Continue, ast.Break, ast.Pass,
                     ast.Delete, ast.Global, ast.Nonlocal, ast.Import, ast.ImportFrom)


@dataclass
class Site:
    """One mutation: where (lines of the original source), what, and how to apply it to its tree."""

    op: str
    detail: str
    lineno: int
    lines: tuple[int, int]  # the lines whose execution means the mutant was reached
    apply: Callable[[], None]


def _is_docstring(node: ast.stmt, body: list) -> bool:
    return body and node is body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_warning_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
    return name in ("warn", "warn_once", "_warn_once")


def sites(tree: ast.Module) -> list[Site]:
    """Every mutation of ``tree``, in a deterministic order (the same source gives the same list)."""
    out: list[Site] = []

    def add(op, detail, node, stmt, apply):
        lo, hi = node.lineno, node.end_lineno or node.lineno
        if stmt is not None and isinstance(stmt, SIMPLE_STATEMENTS):
            lo, hi = min(lo, stmt.lineno), max(hi, stmt.end_lineno or stmt.lineno)
        out.append(Site(op, detail, node.lineno, (lo, hi), apply))

    def setter(parent, field, index=None):
        def set_(value):
            if index is None:
                setattr(parent, field, value)
            else:
                getattr(parent, field)[index] = value
        return set_

    def expr(node, stmt, set_node):
        """Mutations of an expression node and, recursively, of its children."""
        if isinstance(node, ast.JoinedStr) or _is_warning_call(node):
            return
        if isinstance(node, ast.Compare):
            for i, o in enumerate(node.ops):
                if type(o) in COMPARE:
                    add("compare", f"{type(o).__name__} -> {COMPARE[type(o)].__name__}", node, stmt,
                        (lambda n=node, i=i, new=COMPARE[type(o)]: n.ops.__setitem__(i, new())))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP:
            add("arith", f"{type(node.op).__name__} -> {BINOP[type(node.op)].__name__}", node, stmt,
                (lambda n=node, new=BINOP[type(node.op)]: setattr(n, "op", new())))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            add("boolop", f"{type(node.op).__name__} -> {new.__name__}", node, stmt, (lambda n=node, new=new: setattr(n, "op", new())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            add("unary", f"drop {type(node.op).__name__}", node, stmt, (lambda n=node, s=set_node: s(n.operand)))
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                add("bool", f"{v} -> {not v}", node, stmt, (lambda n=node: setattr(n, "value", not n.value)))
            elif isinstance(v, int):
                add("number", f"{v} -> {v + 1}", node, stmt, (lambda n=node: setattr(n, "value", n.value + 1)))
            elif isinstance(v, float):
                new = v * 1.01 if v != 0 else 1.0
                add("number", f"{v!r} -> {new!r}", node, stmt, (lambda n=node, new=new: setattr(n, "value", new)))
            elif isinstance(v, str) and 0 < len(v) <= 40 and " " not in v and "\n" not in v:
                new = STRING_SWAPS.get(v, f"XX{v}XX")
                add("string", f"{v!r} -> {new!r}", node, stmt, (lambda n=node, new=new: setattr(n, "value", new)))
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns"):
                continue
            if isinstance(value, ast.expr):
                expr(value, stmt, setter(node, field))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.expr):
                        expr(item, stmt, setter(node, field, i))
                    elif isinstance(item, ast.keyword):
                        expr(item.value, stmt, setter(item, "value"))
                    elif isinstance(item, ast.comprehension):
                        for f2 in ("iter", "target"):
                            expr(getattr(item, f2), stmt, setter(item, f2))
                        for j, cond in enumerate(item.ifs):
                            expr(cond, stmt, setter(item, "ifs", j))
            elif isinstance(value, ast.arguments):
                for j, d in enumerate(value.defaults):
                    expr(d, stmt, setter(value, "defaults", j))
                for j, d in enumerate(value.kw_defaults):
                    if d is not None:
                        expr(d, stmt, setter(value, "kw_defaults", j))

    def negate(node, stmt, set_node):
        if isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)):
            add("condition", "negated", node, stmt, (lambda n=node, s=set_node: s(ast.UnaryOp(ast.Not(), n))))

    def body(stmts: list, parent, field):
        for i, s in enumerate(stmts):
            if _is_docstring(s, stmts) or isinstance(s, (ast.Raise, ast.Assert, ast.Import, ast.ImportFrom)):
                continue
            if isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in s.targets):
                continue
            if isinstance(s, ast.If) and isinstance(s.test, ast.Name) and s.test.id == "TYPE_CHECKING":
                continue
            deletable = (
                (isinstance(s, ast.Expr) and not isinstance(s.value, ast.Constant) and not _is_warning_call(s.value))
                or isinstance(s, (ast.AugAssign, ast.Continue, ast.Break))
                or (isinstance(s, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in s.targets))
            )
            if deletable:
                add("delete", ast.unparse(s).split("\n")[0][:60], s, s,
                    (lambda p=parent, f=field, i=i, s=s: getattr(p, f).__setitem__(i, ast.copy_location(ast.Pass(), s))))
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for j, d in enumerate(s.args.defaults):
                    expr(d, s, setter(s.args, "defaults", j))
                for j, d in enumerate(s.args.kw_defaults):
                    if d is not None:
                        expr(d, s, setter(s.args, "kw_defaults", j))
                body(s.body, s, "body")
            elif isinstance(s, ast.ClassDef):
                body(s.body, s, "body")
            elif isinstance(s, (ast.If, ast.While)):
                negate(s.test, s.test, setter(s, "test"))
                expr(s.test, s.test, setter(s, "test"))
                body(s.body, s, "body")
                body(s.orelse, s, "orelse")
            elif isinstance(s, (ast.For, ast.AsyncFor)):
                expr(s.iter, s.iter, setter(s, "iter"))
                body(s.body, s, "body")
                body(s.orelse, s, "orelse")
            elif isinstance(s, (ast.With, ast.AsyncWith)):
                for item in s.items:
                    expr(item.context_expr, item.context_expr, setter(item, "context_expr"))
                body(s.body, s, "body")
            elif isinstance(s, ast.Try):
                body(s.body, s, "body")
                for h in s.handlers:
                    body(h.body, h, "body")
                body(s.orelse, s, "orelse")
                body(s.finalbody, s, "finalbody")
            else:
                for field2, value in ast.iter_fields(s):
                    if field2 in ("annotation", "target", "targets"):
                        continue
                    if isinstance(value, ast.expr):
                        if isinstance(s, ast.Return) or field2 == "value":
                            if isinstance(value, ast.IfExp):
                                negate(value.test, s, setter(value, "test"))
                        expr(value, s, setter(s, field2))

    body(tree.body, tree, "body")
    return out


@dataclass
class Mutant:
    id: str
    module: str
    index: int
    op: str
    detail: str
    lineno: int
    lines: tuple[int, int]
    line_text: str


def mutants(module: str, root: Path = ROOT) -> list[Mutant]:
    source = (root / module).read_text()
    src_lines = source.splitlines()
    seen: dict[tuple, int] = {}
    out = []
    for index, site in enumerate(sites(ast.parse(source))):
        text = src_lines[site.lineno - 1].strip()
        key = (site.op, site.detail, text)
        k = seen[key] = seen.get(key, -1) + 1
        digest = hashlib.sha1(f"{site.op}|{site.detail}|{text}|{k}".encode()).hexdigest()[:10]
        out.append(Mutant(f"{module}:{digest}", module, index, site.op, site.detail, site.lineno, site.lines, text))
    return out


def mutated_source(module: str, index: int, root: Path = ROOT) -> str:
    tree = ast.parse((root / module).read_text())
    site = sites(tree)[index]
    site.apply()
    ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


# --------------------------------------------------------------------------------------------- running


def _copy_tree(dest: Path) -> None:
    for name in ("mgs_torch", "tests", "bench", "benchmarks", "examples"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.jsonl", "*.json"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    docs = ROOT / "docs"
    if docs.exists():
        shutil.copytree(docs, dest / "docs")


def _child(copy_root: Path, tests: list[str], out_file: Path | None, coverage_of: list[str] | None) -> None:
    """In the forked child: run pytest on ``tests`` in ``copy_root`` (the mutant already written).

    With ``coverage_of`` (modules), record which test (node id) executed which line of each, and how
    long each test took."""
    os.chdir(copy_root)
    sys.dont_write_bytecode = True
    sys.path[:0] = [str(copy_root), str(copy_root / "bench")]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import pytest

    plugins, durations = [], {}
    if coverage_of is not None:
        import coverage

        cov = coverage.Coverage(data_file=None, include=[str(copy_root / m) for m in coverage_of])

        class _PerTest:
            def pytest_runtest_setup(self, item):
                cov.switch_context(item.nodeid)

            def pytest_runtest_logreport(self, report):
                durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration

        plugins.append(_PerTest())
        cov.start()
    args = ["-q", "-p", "no:cacheprovider", "-W", "ignore", *tests] if coverage_of else ["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    code = pytest.main(args, plugins=plugins)
    if coverage_of is not None:
        cov.stop()
        data = cov.get_data()
        lines = {m: {str(k): v for k, v in data.contexts_by_lineno(str(copy_root / m)).items()} for m in coverage_of}
        out_file.write_text(json.dumps({"code": int(code), "durations": durations, "lines": lines}))
    os._exit(int(code))


def _run(copy_root: Path, tests: list[str], timeout: float, *, coverage_of: list[str] | None = None) -> tuple[str, float, dict | None]:
    out_file = copy_root / ".coverage-lines.json"
    start = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            _child(copy_root, tests, out_file, coverage_of)
        finally:
            os._exit(70)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.time() - start, None
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    lines = None
    if coverage_of is not None and out_file.exists():
        lines = json.loads(out_file.read_text())
        out_file.unlink()
    # pytest: 0 all passed, 1 some failed, 2 interrupted/collection error, 5 nothing collected
    outcome = {0: "survived", 1: "killed", 2: "killed (error)", 5: "no tests"}.get(code, f"killed (exit {code})")
    return outcome, time.time() - start, lines


def load_results(path: Path) -> dict[str, dict]:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                results[r["id"]] = r
    return results


def sampled(ms: list[Mutant], sample: int | None) -> list[Mutant]:
    """``sample`` of the mutants chosen by their ids' hashes (stable across runs and line moves), or all."""
    if sample is None or sample >= len(ms):
        return ms
    keep = {m.id for m in sorted(ms, key=lambda m: hashlib.sha1(m.id.encode()).hexdigest())[:sample]}
    return [m for m in ms if m.id in keep]


def _source_hash(root: Path) -> str:
    """The library and its tests as they are now: a cached coverage map is reused only for the same."""
    h = hashlib.sha1()
    for path in sorted([*root.glob("mgs_torch/**/*.py"), *root.glob("tests/*.py")]):
        if path.name.endswith("_sweep.py"):  # scripts outside the suite
            continue
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def coverage_map(copy_root: Path, modules: list[str], cache: Path) -> dict:
    """Which test of the union of the modules' selections runs which line, and each test's duration:
    one pytest run under coverage.py for all modules, cached in ``cache`` until a source changes."""
    selection = list(dict.fromkeys(t for m in [*CORE, *modules] for t in MODULES[m]))  # one map serves every core module
    key = _source_hash(ROOT)
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("key") == key and set(modules) <= set(data["lines"]) and set(selection) <= set(data["selection"]):
            return data
    status, seconds, data = _run(copy_root, selection, 4 * 3600, coverage_of=list(MODULES))
    if status != "survived":
        raise SystemExit(f"the unmutated selection does not pass ({status}): fix the suite first")
    data.update(key=key, selection=selection, seconds=round(seconds))
    cache.write_text(json.dumps(data))
    return data


def tests_for(contexts: set[str], durations: dict[str, float], budget: float) -> list[str]:
    """The covering tests, fastest first, as many as fit in ``budget`` seconds of their own run time
    (at least one): a mutant they all let pass is reported "survived" and can be rerun against the whole
    selection with ``check``."""
    chosen, total = [], 0.0
    for nodeid in sorted((c for c in contexts if c in durations), key=lambda c: (durations[c], c)):
        if chosen and total + durations[nodeid] > budget:
            break
        chosen.append(nodeid)
        total += durations[nodeid]
    return chosen


def run(modules: list[str], results_path: Path, *, limit: int | None = None, sample: int | None = None,
        rerun_survivors: bool = False, budget: float = 20.0) -> None:
    import pytest  # noqa: F401 - imported once here, inherited by every forked child
    import torch

    torch.set_num_threads(1)
    try:
        import numpy  # noqa: F401
        import pytorch_lightning  # noqa: F401
    except ImportError:
        pass
    done = load_results(results_path)
    with tempfile.TemporaryDirectory(prefix="mgs-mutation-") as tmp:
        copy_root = Path(tmp)
        _copy_tree(copy_root)
        start = time.time()
        cov = coverage_map(copy_root, modules, results_path.with_name(results_path.stem + "-coverage.json"))
        print(f"coverage map: {time.time() - start:.0f} s (selection {cov['seconds']} s under coverage)", flush=True)
        durations = cov["durations"]
        for module in modules:
            again = {i for i, r in done.items() if rerun_survivors and r["status"] == "survived"}
            todo = [m for m in sampled(mutants(module), sample) if m.id not in done or m.id in again]
            if not todo:
                print(f"{module}: all {len(mutants(module))} mutants done", flush=True)
                continue
            original = (copy_root / module).read_text()
            by_line = {int(k): set(v) for k, v in cov["lines"][module].items()}
            print(f"{module}: {len(todo)} mutants to run", flush=True)
            for count, m in enumerate(todo):
                if limit is not None and count >= limit:
                    break
                contexts = set().union(*(by_line.get(line, set()) for line in range(m.lines[0], m.lines[1] + 1)))
                # a line run at import time (a default argument, a constant: context "") is reached by every
                # test: the module's own first test files then, whole (-x stops at the first failure)
                reached = MODULES[module][:IMPORT_TIME_FILES] if "" in contexts else tests_for(contexts, durations, budget)
                seconds = 0.0
                if not reached:
                    status = "not covered"
                else:
                    try:
                        source = mutated_source(module, m.index)
                        compile(source, module, "exec")
                    except (SyntaxError, ValueError) as error:
                        status = f"invalid ({type(error).__name__})"
                    else:
                        (copy_root / module).write_text(source)
                        try:
                            status, seconds, _ = _run(copy_root, reached, 10 * budget + 120)
                        finally:
                            (copy_root / module).write_text(original)
                record = {"id": m.id, "module": module, "line": m.lineno, "op": m.op, "detail": m.detail, "text": m.line_text,
                          "status": status, "seconds": round(seconds, 1), "tests_run": len(reached)}
                with results_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"  {m.id} line {m.lineno} {m.op} {m.detail!r}: {status} ({seconds:.0f} s, {len(reached)} tests)", flush=True)


def report(results_path: Path, modules: list[str]) -> str:
    """Survival per module (Markdown) and every survivor, with its note where one explains it."""
    results, explained = load_results(results_path), notes()
    lines = ["| module | mutants | run | killed | of them by a test added after a first survival | survived | not covered | survival rate | unexplained |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    survivors = []
    for module in modules:
        current = {m.id: m for m in mutants(module)}
        rs = [results[i] for i in current if i in results]
        if not rs:
            continue
        killed = sum(r["status"].startswith(("killed", "timeout", "invalid")) for r in rs)
        alive = [r for r in rs if r["status"] in ("survived", "not covered")]
        unexplained = [r for r in alive if r["id"] not in explained]
        later = sum(bool(r.get("checked_with")) and r["status"].startswith("killed") for r in rs)
        lines.append(f"| {module} | {len(current)} | {len(rs)} | {killed} | {later} | {sum(r['status'] == 'survived' for r in rs)} | "
                     f"{sum(r['status'] == 'not covered' for r in rs)} | {100 * len(alive) / len(rs):.0f} % | {len(unexplained)} |")
        for r in alive:
            note = explained.get(r["id"], "UNEXPLAINED")
            survivors.append(f"| `{r['id'].split(':')[1]}` | {module} | {current[r['id']].lineno} | {r['op']}: `{r['detail']}` | "
                             f"{r['status']} | {note} |")
    return "\n".join(lines + ["", "| mutant | module | line | change | status | why it survives |",
                               "| --- | --- | ---: | --- | --- | --- |"] + survivors)


def show(mutant_id: str) -> str:
    module = mutant_id.rsplit(":", 1)[0]
    m = next(m for m in mutants(module) if m.id == mutant_id)
    before = ast.unparse(ast.parse((ROOT / module).read_text())).splitlines()
    after = mutated_source(module, m.index).splitlines()
    return "\n".join(difflib.unified_diff(before, after, module, f"{module} ({m.op}: {m.detail})", n=2, lineterm=""))


def check(mutant_id: str, tests: list[str], results_path: Path | None = None) -> int:
    """Run ``tests`` (default: the module's selection, without -x) against one mutant; print pytest's
    summary, and record the outcome in ``results_path`` (a later record of a mutant replaces earlier ones)."""
    import subprocess

    module = mutant_id.rsplit(":", 1)[0]
    m = next(m for m in mutants(module) if m.id == mutant_id)
    tests = tests or MODULES[module]
    with tempfile.TemporaryDirectory(prefix="mgs-mutant-") as tmp:
        copy_root = Path(tmp)
        _copy_tree(copy_root)
        (copy_root / module).write_text(mutated_source(module, m.index))
        env = dict(os.environ, PYTHONPATH=f"{copy_root}{os.pathsep}{copy_root / 'bench'}", PYTHONDONTWRITEBYTECODE="1")
        print(f"{mutant_id}: line {m.lineno} {m.op} {m.detail}: {m.line_text}", flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", *tests],
                              cwd=copy_root, env=env, capture_output=True, text=True)
        print("\n".join(proc.stdout.strip().splitlines()[-12:]))
    status = {0: "survived", 1: "killed"}.get(proc.returncode, f"killed (exit {proc.returncode})")
    if results_path is not None:
        record = {"id": m.id, "module": module, "line": m.lineno, "op": m.op, "detail": m.detail, "text": m.line_text,
                  "status": status, "seconds": round(time.time() - start, 1), "tests_run": len(tests), "checked_with": tests}
        with results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return proc.returncode


def notes(path: Path = ROOT / "benchmarks" / "mutation-notes.json") -> dict[str, str]:
    """Why a surviving mutant is equivalent (or otherwise explained), by mutant id."""
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "list", "report", "show", "check"])
    parser.add_argument("targets", nargs="*", help="modules (default: all of MODULES) or, for show, a mutant id")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--limit", type=int, default=None, help="at most this many new mutants per module")
    parser.add_argument("--sample", type=int, default=None, help="a stable random sample of this many mutants per module")
    parser.add_argument("--rerun-survivors", action="store_true", help="run the survivors again (after new tests)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of covering tests (fastest first) per mutant")
    args = parser.parse_args(argv)
    if args.command == "check":  # check ID [tests...]: does the selection (or these tests) kill it?
        sys.exit(0 if check(args.targets[0], args.targets[1:], args.results) else 1)
    if args.command == "show":
        print(show(args.targets[0]))
        return
    modules = args.targets or list(MODULES)
    if args.command == "list":
        for module in modules:
            for m in mutants(module):
                print(f"{m.id}  line {m.lineno}  {m.op}  {m.detail}")
    elif args.command == "report":
        print(report(args.results, modules))
    else:
        start = time.time()
        run(modules, args.results, limit=args.limit, sample=args.sample, rerun_survivors=args.rerun_survivors, budget=args.budget)
        print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
