"""Markdown tables generated from run JSONs (never typed by hand).

* :func:`results_table` — the paper's Table 1 / Table 2 shape: rows = methods, columns = noise
  levels, cells ``final ± std (max)`` (accuracy in %, over seeds) or ``final ± std (min)`` (MSE).
* :func:`claims_table` — per noise level, the paper's two claims checked mechanically: does MGS tr K
  have the best final metric, and is its final ≈ its max (gap = max − final, mean over seeds)?
* :func:`memorised_table` — how much of the label noise each method's final model has memorised.
* :func:`render_template` — fills ``{{table key=value ...}}``, ``{{claims ...}}``, ``{{memorised ...}}``,
  ``{{tuned ...}}`` and ``{{runtime ...}}`` markers in a markdown template with the tables for the matching runs.

Two definitions of *final* and *max* (``definition=``; every table says which it uses):

* ``"testbench"`` (default): final = mean of the last 5 evaluations of each run, max = the mean over
  seeds of each run's maximum during training;
* ``"paper"``: the paper's — final = mean over the last 5 % of training
  (:func:`~mgs_bench.runner.paper_final`), max = the maximum of the seed-averaged curve
  (never above the testbench's max, so |max − final| is smaller or equal).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .methods import METHODS
from .runner import load_results, paper_final, tuned_path

DEFINITIONS = ("testbench", "paper")

__all__ = ["results_table", "claims_table", "memorised_table", "tuned_table", "runtime_table", "render_template", "full_report"]


def _fmt(v: float, higher: bool) -> str:
    return f"{100 * v:.1f}" if higher else f"{v:.3f}"


def _variant(r: dict) -> tuple[str, float | None, int, str]:
    c = r["config"]
    return c["method"], c.get("value"), int(c.get("alpha_warmup") or 0), str(c.get("init") or "auto")


def _variant_key(method: str, value: float | None, warmup: int, init: str = "auto") -> str:
    """``method``, or ``method=value`` (+ ``~wN`` for an α warm-up of N epochs, ``~i<init>`` for a
    non-default initialisation) when a method has several variants."""
    key = method if value is None else f"{method}={value:g}"
    return key + (f"~w{warmup}" if warmup else "") + (f"~i{init}" if init != "auto" else "")


def _parse_key(key: str) -> tuple[str, str, str, str]:
    """(base method, value, warm-up epochs, init) of a row key ('' where absent)."""
    head, *tokens = key.split("~")
    base, _, value = head.partition("=")
    warm = next((t[1:] for t in tokens if t.startswith("w")), "")
    init = next((t[1:] for t in tokens if t.startswith("i")), "")
    return base, value, warm, init


def _group(results: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[float, list[dict]]], list[float], bool]:
    """Runs by row key and noise. A row is a method; a method run with several hyper-parameter values or
    α warm-ups gets one row per variant (key ``method=value[~wN]``)."""
    variants: dict[str, set] = defaultdict(set)
    for r in results:
        variants[r["config"]["method"]].add(_variant(r))
    by: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        m = r["config"]["method"]
        key = m if len(variants[m]) == 1 else _variant_key(*_variant(r))
        by[key][r["config"]["noise"]].append(r)
    noises = sorted({r["config"]["noise"] for r in results})
    higher = bool(results[0]["summary"]["higher_is_better"]) if results else True
    return by, noises, higher


def _base_method(key: str) -> str:
    return _parse_key(key)[0]


def _warmup_note(runs: list[dict]) -> str:
    w = sorted({int(r["config"].get("alpha_warmup") or 0) for r in runs} - {0})
    inits = sorted({str(r["config"].get("init") or "auto") for r in runs} - {"auto"})
    return (f", α warm-up {', '.join(map(str, w))} ep." if w else "") + (f", {', '.join(inits)} init" if inits else "")


def _method_label(runs: list[dict]) -> str:
    m = runs[0]["method"]
    values = sorted({r["method"]["value"] for r in runs if r["method"]["value"] is not None})
    if not values:
        note = _warmup_note(runs)
        return m["label"] + (f" ({note[2:]})" if note else "")
    return f"{m['label']} ({m['hyper']}={', '.join(f'{v:g}' for v in values)}{_warmup_note(runs)})"


def _short_label(key: str) -> str:
    """The registry label, plus the variant (α value, warm-up) when the key names one."""
    base, value, warm, init = _parse_key(key)
    label = METHODS[base][3] if base in METHODS else base
    parts = ([f"{METHODS[base][0] if base in METHODS else 'value'}={value}"] if value else []) + ([f"warm-up {warm}"] if warm else []) \
        + ([f"{init} init"] if init else [])
    return f"{label} ({', '.join(parts)})" if parts else label


def _order(methods) -> list[str]:
    def rank(key: str):
        base, value, warm, init = _parse_key(key)
        return (list(METHODS).index(base) if base in METHODS else 99, float(value) if value else 0.0, int(warm or 0), init)

    return sorted(methods, key=rank)


def _check(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")


def _key(r: dict) -> str:
    return "test_acc" if r["summary"]["higher_is_better"] else "test_loss"


def run_final(r: dict, definition: str = "testbench") -> float | None:
    """One run's final test metric under ``definition`` (``None`` for a diverged run)."""
    _check(definition)
    if r["summary"]["final"] is None:
        return None
    if definition == "testbench":
        return r["summary"]["final"]
    return paper_final(r["history"], _key(r), r["config"]["epochs"])


def _curve_best(runs: list[dict], higher: bool) -> float | None:
    """Max (min) over epochs of the seed-averaged test curve, over the epochs every run evaluated."""
    runs = [r for r in runs if r["summary"]["final"] is not None]
    if not runs:
        return None
    key = _key(runs[0])
    curves = [{h["epoch"]: h[key] for h in r["history"] if h.get(key) is not None} for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    mean = [float(np.mean([c[e] for c in curves])) for e in common]
    return (max(mean) if higher else min(mean)) if mean else None


def _stats(runs: list[dict], higher: bool, definition: str = "testbench") -> tuple[float | None, float | None, float | None, int, int]:
    finals = [run_final(r, definition) for r in runs]
    ok = [f for f in finals if f is not None]
    diverged = len(finals) - len(ok)
    mean = float(np.mean(ok)) if ok else None
    std = float(np.std(ok)) if ok else None
    if definition == "paper":
        best = _curve_best(runs, higher)
    else:
        bests = [r["summary"]["best"] for r in runs if r["summary"]["best"] is not None]
        best = float(np.mean(bests)) if bests else None
    return mean, std, best, len(runs), diverged


def _definition_note(definition: str, higher: bool) -> str:
    word = "max" if higher else "min"
    if definition == "paper":
        return f"the paper's definitions: final = mean over the last 5 % of training, {word} = {word} of the seed-averaged curve"
    return f"testbench definitions: final = mean of the last 5 evaluations, {word} = mean over seeds of each run's {word}"


def results_table(results: Sequence[dict[str, Any]], definition: str = "testbench") -> str:
    """Rows = methods, columns = noise levels, cells ``final ± std (max)`` over seeds (Table 1 / 2 shape).

    ``definition="testbench"``: final = mean of the last 5 evaluations of the test metric; max (min
    for MSE) = best evaluation during training, averaged over seeds. ``"paper"``: final = mean over the
    last 5 % of training, max = max of the seed-averaged curve. std over seeds of final. Accuracy in %.
    A cell notes how many seeds diverged (their final is excluded). The caption names the definition.
    """
    _check(definition)
    if not results:
        return "_no runs found_\n"
    by, noises, higher = _group(results)
    best_word = "max" if higher else "min"
    head = "| method | " + " | ".join((f"{100 * n:g}% noise" if higher else f"noise σ={n:g}") for n in noises) + " |"
    lines = [head, "|" + "---|" * (len(noises) + 1)]
    best_final = {n: None for n in noises}
    for n in noises:
        finals = [_stats(by[m][n], higher, definition)[0] for m in by if by[m].get(n)]
        finals = [f for f in finals if f is not None]
        if finals:
            best_final[n] = max(finals) if higher else min(finals)
    n_seeds = len({r["config"]["seed"] for r in results})
    for m in _order(by):
        cells = []
        runs_all = [r for n in noises for r in by[m].get(n, [])]
        for n in noises:
            runs = by[m].get(n, [])
            if not runs:
                cells.append("–")
                continue
            mean, std, best, k, div = _stats(runs, higher, definition)
            if mean is None:
                cells.append(f"diverged ({div}/{k})")
                continue
            spread = f" ± {_fmt(std, higher)}" if k - div > 1 else ""  # no std from a single seed
            cell = f"{_fmt(mean, higher)}{spread} ({_fmt(best, higher)})"
            if best_final[n] is not None and mean == best_final[n]:
                cell = f"**{cell}**"
            if div:
                cell += f" [{div}/{k} diverged]"
            elif k < n_seeds:  # a grid still running: say which cells rest on fewer seeds
                cell += f" [{k} of {n_seeds} seeds]"
            cells.append(cell)
        lines.append(f"| {_method_label(runs_all)} | " + " | ".join(cells) + " |")
    seeds = sorted({r["config"]["seed"] for r in results})
    lines.append("")
    unit = "test accuracy in %" if higher else "test MSE (targets in units of their std)"
    note = "" if definition == "testbench" else f" ({_definition_note(definition, higher)})"
    if len(seeds) > 1:
        lines.append(f"Cells: final ± std over {len(seeds)} seeds ({best_word} during training); {unit}; bold = best final per column{note}.")
    else:
        lines.append(f"Cells: final ({best_word} during training), one seed; {unit}; bold = best final per column{note}.")
    return "\n".join(lines) + "\n"


def claims_table(results: Sequence[dict[str, Any]], method: str = "mgs_trace", definition: str = "testbench") -> str:
    """Per noise level: best method by final metric, ``method``'s rank, and every method's max − final gap.

    ``definition="testbench"``: gap = mean over seeds of |max − final| of each run; ``"paper"``:
    gap = |max of the seed-averaged curve − mean final|.
    """
    _check(definition)
    if not results:
        return "_no runs found_\n"
    by, noises, higher = _group(results)
    methods = _order(by)
    targets = [m for m in methods if _base_method(m) == method]
    lines = ["| noise | best final | " + f"rank of {METHODS[method][3]} | " + " | ".join(f"gap {_short_label(m)}" for m in methods) + " |",
             "|" + "---|" * (3 + len(methods))]
    for n in noises:
        finals = {m: _stats(by[m][n], higher, definition)[0] for m in methods if by[m].get(n)}
        ranked = sorted([m for m in finals if finals[m] is not None], key=lambda m: finals[m], reverse=higher)
        ranks = [(t, ranked.index(t) + 1) for t in targets if t in ranked]
        if len(targets) == 1:
            rank = f"{ranks[0][1]} of {len(ranked)}" if ranks else "–"
        else:
            rank = ", ".join(f"{k} ({_short_label(t)[len(METHODS[method][3]) + 2:-1] or 'default'})" for t, k in ranks) + f" of {len(ranked)}" if ranks else "–"
        gaps = []
        for m in methods:
            runs = by[m].get(n, [])
            if definition == "paper":
                mean, _, best, _, _ = _stats(runs, higher, definition) if runs else (None, None, None, 0, 0)
                gaps.append(_fmt(abs(best - mean), higher) if mean is not None and best is not None else "–")
                continue
            g = [abs(r["summary"]["best"] - r["summary"]["final"]) for r in runs if r["summary"]["final"] is not None]
            gaps.append(_fmt(float(np.mean(g)), higher) if g else "–")
        best = _short_label(ranked[0]) if ranked else "–"
        lines.append(f"| {100 * n:g}% | {best} | {rank} | " + " | ".join(gaps) + " |" if higher else
                     f"| σ={n:g} | {best} | {rank} | " + " | ".join(gaps) + " |")
    how = "mean over seeds" if definition == "testbench" else "of the seed means"
    lines += ["", f"gap = |{'max' if higher else 'min'} − final| of the test {'accuracy (points of %)' if higher else 'MSE'}, {how}: "
              f"small = the method does not overfit late in training; {_definition_note(definition, higher)}."]
    return "\n".join(lines) + "\n"


def memorised_table(results: Sequence[dict[str, Any]]) -> str:
    """Fraction of the flipped training labels that the final model predicts as their wrong label (%, mean over seeds).

    100 % = the label noise is memorised; a few % = the model predicts other (mostly the true) classes.
    """
    if not results:
        return "_no runs found_\n"
    by, noises, _ = _group(results)
    noises = [n for n in noises if n > 0]
    if not noises:
        return "_no runs with label noise yet (memorisation is measured on flipped labels)_\n"
    lines = ["| method | " + " | ".join(f"{100 * n:g}% noise" for n in noises) + " |", "|" + "---|" * (len(noises) + 1)]
    for m in _order(by):
        cells = []
        for n in noises:
            vals = [r["history"][-1].get("memorised") for r in by[m].get(n, []) if not r["diverged"]]
            vals = [v for v in vals if v is not None]
            cells.append(f"{100 * np.mean(vals):.0f}" if vals else "–")
        lines.append(f"| {_short_label(m)} | " + " | ".join(cells) + " |")
    lines += ["", "Memorised = % of the flipped training labels that the final model predicts as given (the wrong class)."]
    return "\n".join(lines) + "\n"


def tuned_table(out_dir: str | Path, dataset: str, model: str) -> str:
    """The tuning record ``tuned_<dataset>_<model>.json``: grid scores and the chosen values."""
    path = tuned_path(out_dir, dataset, model)
    if not path.exists():
        return f"_no tuning record {path.name}_\n"
    rec = json.loads(path.read_text())
    sc = rec["scenario"]
    higher = "accuracy" in rec["criterion"]
    lines = [f"Scenario: {sc['dataset']} / {sc['model']}, noise {sc['noise']:g}, {sc['train_size']} training samples, "
             f"{sc['epochs']} epochs, seeds {rec['seeds']}" + (f", {sc['init']} init" if sc.get("init", "auto") != "auto" else "")
             + f"; criterion: {rec['criterion']}.", "",
             "| method | grid (final validation " + ("accuracy %" if higher else "MSE") + ") | chosen |", "|---|---|---|"]
    for m in _order(rec["scores"]):
        vals = ", ".join(f"{v}: {'div.' if s is None else _fmt(s, higher)}" for v, s in rec["scores"][m].items())
        lines.append(f"| {METHODS[m][3]} | {vals} | {rec['chosen'].get(m, '–')} |")
    return "\n".join(lines) + "\n"


def runtime_table(results: Sequence[dict[str, Any]]) -> str:
    """Wall-clock seconds per run by method (mean) and in total."""
    if not results:
        return "_no runs found_\n"
    by: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by[r["config"]["method"]].append(r["seconds"])
    lines = ["| method | runs | mean s/run | total s |", "|---|---|---|---|"]
    for m in _order(by):  # by method name (all variants together)
        lines.append(f"| {METHODS[m][3]} | {len(by[m])} | {np.mean(by[m]):.1f} | {np.sum(by[m]):.0f} |")
    total = sum(sum(v) for v in by.values())
    lines.append(f"| **all** | {sum(len(v) for v in by.values())} | | **{total:.0f}** ({total / 3600:.2f} h) |")
    return "\n".join(lines) + "\n"


_MARKER = re.compile(r"\{\{\s*(table|claims|tuned|runtime|memorised|stopping_selection|stopping|flagging|alpha_init|alpha_sweep)((?:\s+\w+=[^\s}]+)*)\s*\}\}")


def coerce_value(v: str) -> Any:
    """A command-line or template value as int, else float, else the string itself."""
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return v


def render_template(template: str, out_dir: str | Path) -> str:
    """Replace every ``{{kind key=value ...}}`` marker by the table of the matching runs.

    ``kind``: ``table`` (:func:`results_table`), ``claims`` (:func:`claims_table`), ``tuned``
    (:func:`tuned_table`, keys ``dataset`` and ``model``) or ``runtime`` (:func:`runtime_table`);
    ``stopping`` / ``stopping_selection`` (key ``out``: a testbench folder evaluated every epoch;
    ``threshold``, ``window``, ``patience`` / ``select``: the model the rule is chosen on) and
    ``flagging`` (key ``out``: a ``mgs-torch scores`` folder) read their own folders, and so do ``alpha_init``
    (key ``out``: folders holding ``init/`` records of ``mgs-torch alpha``) and ``alpha_sweep`` (key ``out``:
    comma-separated testbench folders; other keys filter their runs; :func:`mgs_bench.alpha.sweep_table`).
    Keys filter the run configs (``dataset``, ``model``, ``train_size``, ``epochs``, ``method``...),
    except ``definition=testbench|paper`` (final/max definitions, for ``table`` and ``claims``) and
    ``source=tune`` (the tuning runs under ``<out>/tune`` instead of the grid's) and ``out=DIR`` (read another
    testbench folder than ``out_dir``; relative to the working directory); a comma-separated
    value matches any of its items (``method=unreg,mgs_trace``).
    """
    cache: dict[tuple, list] = {}

    def sub(match: re.Match) -> str:
        kind = match.group(1)
        where = {k: coerce_value(v) for k, v in (kv.split("=", 1) for kv in match.group(2).split())}
        if kind in ("stopping", "stopping_selection", "flagging", "alpha_init", "alpha_sweep"):
            return _analysis_table(kind, where).rstrip("\n")
        definition = str(where.pop("definition", "testbench"))
        folder = Path(str(where.pop("out", out_dir)))  # out=DIR: another testbench folder than the report's
        if kind == "tuned":
            return tuned_table(folder, where["dataset"], where["model"]).rstrip("\n")
        source = where.pop("source", "grid")
        if source not in ("grid", "tune"):
            raise ValueError(f"source must be 'grid' or 'tune', got {source!r}")
        base = folder / "tune" if source == "tune" else folder
        key = (str(base), *sorted(where.items()))
        if key not in cache:
            exact = {k: v for k, v in where.items() if not (isinstance(v, str) and "," in v)}
            any_of = {k: {coerce_value(x) for x in v.split(",")} for k, v in where.items() if k not in exact}
            cache[key] = [r for r in load_results(base, **exact) if all(r["config"].get(k) in vs for k, vs in any_of.items())]
        res = cache[key]
        if kind in ("table", "claims"):
            fn = results_table if kind == "table" else claims_table
            return fn(res, definition=definition).rstrip("\n")
        fn = {"runtime": runtime_table, "memorised": memorised_table}[kind]
        return fn(res).rstrip("\n")

    return _MARKER.sub(sub, template)


def _analysis_table(kind: str, where: dict[str, Any]) -> str:
    """The early-stopping and flagging tables of examples/RESULTS.md, from their own output folders."""
    if kind in ("alpha_init", "alpha_sweep"):
        from .alpha import init_table, load_init_records, sweep_table

        folders = [Path(f) for f in str(where.pop("out")).split(",")]
        if kind == "alpha_init":
            return init_table([r for f in folders for r in load_init_records(f)]) if any((f / "init").is_dir() for f in folders) else "_no records found_\n"
        method = str(where.pop("method", "mgs_trace"))
        exact = {k: v for k, v in where.items() if not (isinstance(v, str) and "," in v)}
        any_of = {k: {coerce_value(x) for x in v.split(",")} for k, v in where.items() if k not in exact}
        runs = [r for f in folders if (f / "runs").is_dir() for r in load_results(f, **exact)
                if all(r["config"].get(k) in vs for k, vs in any_of.items())]
        return sweep_table(runs, method)
    folder = Path(str(where["out"]))
    if kind == "flagging":
        import json

        from .flagging import flagging_table

        return flagging_table([json.loads(p.read_text()) for p in sorted((folder / "flagging").rglob("*.json"))])
    from .stopping import rule_selection_table, stopping_table

    results = load_results(folder)
    if kind == "stopping_selection":
        grid = [{"threshold": t, "patience": p, "window": w, "min_checks": 0}
                for t in (0.005, 0.01, 0.02, 0.05, 0.1) for w in (1, 5) for p in (3, 5)]
        table, chosen = rule_selection_table(results, grid, str(where["select"]))
        return table + f"\nChosen: threshold {chosen['threshold']:g}, window {chosen['window']}, patience {chosen['patience']}.\n"
    rule = {"threshold": float(where.get("threshold", 0.05)), "window": int(where.get("window", 5)),
            "patience": int(where.get("patience", 3)), "min_checks": int(where.get("min_epochs", 0))}
    return stopping_table(results, rule, int(where.get("val_patience", 10)))


def full_report(out_dir: str | Path, definition: str = "testbench") -> str:
    """Every (data set, model, training size) group under ``out_dir`` as a Table-1-shaped table plus claims."""
    results = load_results(out_dir)
    groups: dict[tuple, list] = defaultdict(list)
    for r in results:
        c = r["config"]
        groups[(c["dataset"], c["model"], c["train_size"], c["epochs"])].append(r)
    parts = []
    for (ds, model, size, epochs), runs in sorted(groups.items()):
        parts.append(f"## {ds} / {model} / {size} training samples / {epochs} epochs\n")
        parts.append(results_table(runs, definition))
        if any(r["config"]["method"] == "mgs_trace" for r in runs):
            parts.append(claims_table(runs, definition=definition))
    if results:
        parts.append("## Run time\n")
        parts.append(runtime_table(results))
    return "\n".join(parts) if parts else "_no runs found_\n"
