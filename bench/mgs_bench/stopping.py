"""Early stopping on the MGS curve against validation-loss early stopping and the last epoch.

Applied to finished testbench runs (``mgs-torch testbench ... --eval-points EPOCHS+1`` evaluates
after every epoch): each run's history holds, per epoch, tr K of the fixed probe batch (what
``MGSMonitor(probe="train", model_mode="eval", log_on_epoch_end=True)`` logs), the clean validation
loss and the test accuracy. For each run:

* **MGS stop**: the first epoch at which :class:`mgs_torch.stopping.GrowthPlateau` (the rule of
  :class:`mgs_torch.lightning.MGSEarlyStopping`, same code) says stop, fed tr K / N once per
  evaluation; the last epoch if it never stops. No validation data is used.
* **val-loss stop**: Lightning's ``EarlyStopping(monitor="val_loss", patience=P)`` with the weights of
  the best validation-loss epoch restored (as ``ModelCheckpoint(monitor="val_loss")`` would); the
  last epoch's best if it never stops.
* **final**: the last epoch (the paper's protocol: no early stopping).
* **oracle**: the best test accuracy at any evaluation (not attainable; an upper bound).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

from mgs_torch.stopping import growth_plateau_stop

__all__ = ["stopping_points", "stopping_table", "rule_selection_table", "DEFAULT_RULE"]

#: the rule reported in examples/RESULTS.md (fixed before looking at test accuracy; see there)
DEFAULT_RULE: dict[str, Any] = {"threshold": 0.02, "patience": 3, "window": 1, "min_checks": 0}


def stopping_points(result: dict[str, Any], rule: dict[str, Any] | None = None, val_patience: int = 10) -> dict[str, Any]:
    """Epoch and test accuracy of each stopping strategy for one run's history."""
    rule = dict(DEFAULT_RULE if rule is None else rule)
    h = result["history"]
    epochs = [r["epoch"] for r in h]
    acc = [r["test_acc"] for r in h]
    val_acc = [r.get("val_acc", math.nan) for r in h]
    size = h[0].get("mgs_size") or 1
    trace = [r["mgs_trace"] / size if r.get("mgs_trace") is not None else math.nan for r in h]
    i_mgs = growth_plateau_stop(trace, **rule)
    mgs_i = len(h) - 1 if i_mgs is None else i_mgs
    best, best_i, wait, stop_i = math.inf, 0, 0, None
    for i, r in enumerate(h):
        v = r["val_loss"]
        if v < best:
            best, best_i, wait = v, i, 0
        else:
            wait += 1
            if wait >= val_patience:
                stop_i = i
                break
    return {
        "mgs_epoch": epochs[mgs_i], "mgs_acc": acc[mgs_i], "mgs_val_acc": val_acc[mgs_i], "mgs_stopped": i_mgs is not None,
        "val_epoch": epochs[best_i], "val_stop_epoch": epochs[stop_i] if stop_i is not None else epochs[-1], "val_acc": acc[best_i],
        "final_epoch": epochs[-1], "final_acc": acc[-1],
        "oracle_acc": max(acc), "oracle_epoch": epochs[acc.index(max(acc))],
    }


def _mean_std(values: Sequence[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def stopping_table(results: Sequence[dict[str, Any]], rule: dict[str, Any] | None = None, val_patience: int = 10) -> str:
    """Markdown: per (model, noise), test accuracy (%) at each strategy's stopping point, mean ± std over seeds."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in results:
        if r["summary"].get("higher_is_better") is False or "test_acc" not in r["history"][0]:
            continue
        c = r["config"]
        groups[(c["dataset"], c["model"], c["method"], c["train_size"], c["noise"])].append(stopping_points(r, rule, val_patience))
    if not groups:
        return "_no classification runs found_\n"
    lines = [
        "| data / model / method | noise | final epoch | val-loss ES (best restored) | MGS ES | MGS − final | MGS − val | "
        "MGS stop epoch (stopped/seeds) | val best epoch | oracle max |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for (dataset, model, method, size, noise), pts in sorted(groups.items()):
        epochs = ", ".join(str(p["mgs_epoch"]) for p in pts)
        stopped = sum(p["mgs_stopped"] for p in pts)
        d_final = [p["mgs_acc"] - p["final_acc"] for p in pts]
        d_val = [p["mgs_acc"] - p["val_acc"] for p in pts]
        lines.append(
            f"| {dataset} / {model} / {method} (n={size}) | {100 * noise:g}% | {_mean_std([p['final_acc'] for p in pts])} | "
            f"{_mean_std([p['val_acc'] for p in pts])} | {_mean_std([p['mgs_acc'] for p in pts])} | "
            f"{100 * sum(d_final) / len(pts):+.1f} | {100 * sum(d_val) / len(pts):+.1f} | {epochs} ({stopped}/{len(pts)}) | "
            f"{', '.join(str(p['val_epoch']) for p in pts)} | {_mean_std([p['oracle_acc'] for p in pts])} |"
        )
    return "\n".join(lines) + "\n"


def rule_selection_table(results: Sequence[dict[str, Any]], rules: Sequence[dict[str, Any]], select_model: str) -> tuple[str, dict[str, Any]]:
    """Choose the rule by the mean *validation* accuracy at its stopping point on ``select_model``'s runs
    (all noise levels and seeds), never by test accuracy; return a markdown table of every rule and the choice.

    Columns: mean validation accuracy at the MGS stop on the selection model (the criterion), and, for
    information only, the mean test accuracy at the MGS stop per model.
    """
    runs = [r for r in results if "test_acc" in r["history"][0]]
    models = sorted({r["config"]["model"] for r in runs})
    rows, best, best_score = [], None, -math.inf
    for rule in rules:
        pts = {m: [stopping_points(r, rule) for r in runs if r["config"]["model"] == m] for m in models}
        sel = pts.get(select_model) or []
        score = sum(p["mgs_val_acc"] for p in sel) / len(sel) if sel else math.nan
        if score > best_score:
            best, best_score = rule, score
        tests = " | ".join(f"{100 * sum(p['mgs_acc'] for p in pts[m]) / max(len(pts[m]), 1):.1f}" for m in models)
        rows.append(f"| {rule['threshold']:g} | {rule['window']} | {rule['patience']} | {rule['min_checks']} | {100 * score:.1f} | {tests} |")
    head = ["| threshold | window | patience | min epochs | " + f"val acc at stop, {select_model} (criterion) | "
            + " | ".join(f"test acc at stop, {m}" for m in models) + " |",
            "|---:|---:|---:|---:|---:|" + "---:|" * len(models)]
    return "\n".join(head + rows) + "\n", best
