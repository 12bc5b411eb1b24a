"""Figures from run results (the dicts :func:`~mgs_bench.runner.train_run` returns / writes).

* :func:`plot_curves` — test metric, MGS trace and MGS log det vs epoch per method, one column per
  noise level (the paper's Figs 2–4); mean over seeds with a ±std band (one seed: the run itself,
  and the title says so). Where K was singular (log det = −∞) the log-det curve has a gap and a "×"
  marks the epoch at the bottom of the panel (explained under the panels only when one appears).
* :func:`plot_demo` — the demo's one-row figure: test accuracy, memorised flipped labels and tr K/N per method.
* :func:`plot_heatmaps` — final test metric over noise × training size, one panel per method (Figs A.4–A.13).
* :func:`plot_boundaries` — decision boundaries per method on two-dimensional data (Fig 2, top).

matplotlib is imported lazily (installed with ``pip install -e ./bench``) with the Agg backend.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import require
from .methods import METHODS

__all__ = ["plot_curves", "plot_demo", "plot_heatmaps", "plot_boundaries", "METHOD_COLORS"]

METHOD_COLORS = {
    "unreg": "#000000", "weight_decay": "#1f77b4", "dropout": "#2ca02c", "gradnorm_params": "#9467bd",
    "gradnorm_inputs": "#8c564b", "mgs_trace": "#d62728", "mgs_logdet": "#ff7f0e", "adam": "#7f7f7f",
    "gradnorm_params_norm": "#e377c2", "mgs_trace_hutchinson": "#bcbd22",
}
DPI = 80


def _plt():
    mpl = require("matplotlib", "plotting")
    mpl.use("Agg", force=False)
    return require("matplotlib.pyplot", "plotting")


def _order(methods: Sequence[str]) -> list[str]:
    return sorted(set(methods), key=lambda m: list(METHODS).index(m) if m in METHODS else 99)


def _label(result: dict[str, Any]) -> str:
    m = result["method"]
    return m["label"] if m["value"] is None else f"{m['label']} ({m['hyper']}={m['value']:g})"


def _metric_key(result: dict[str, Any]) -> tuple[str, str]:
    if result["summary"]["higher_is_better"]:
        return "test_acc", "test accuracy"
    return "test_loss", "test MSE"


def _stack(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """epochs, values (seeds × evals; NaN where missing/None) over the common evaluation epochs."""
    epochs = sorted({h["epoch"] for r in runs for h in r["history"]})
    vals = np.full((len(runs), len(epochs)), np.nan)
    singular = np.zeros((len(runs), len(epochs)), dtype=bool)
    pos = {e: i for i, e in enumerate(epochs)}
    for s, r in enumerate(runs):
        for h in r["history"]:
            v = h.get(key)
            if v is not None and math.isfinite(v):
                vals[s, pos[h["epoch"]]] = v
            if h.get("mgs_singular"):
                singular[s, pos[h["epoch"]]] = True
    return np.asarray(epochs), vals, singular


def plot_curves(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test metric / MGS tr K / MGS log det K vs epoch, per method (rows) × noise level (columns)."""
    plt = _plt()
    if not results:
        raise ValueError("no results to plot")
    groups: dict[float, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        groups[r["config"]["noise"]][r["config"]["method"]].append(r)
    noises = sorted(groups)
    key, ylabel = _metric_key(results[0])
    rows = [(key, ylabel), ("mgs_trace", "MGS tr K"), ("mgs_logdet", "MGS log det K")]
    fig, axes = plt.subplots(3, len(noises), figsize=(max(7.0, 3.2 * len(noises) + 0.6), 7.6), squeeze=False, sharex=True)
    handles = {}
    any_singular = False
    for c, noise in enumerate(noises):
        for method in _order(groups[noise]):
            runs = groups[noise][method]
            color = METHOD_COLORS.get(method, None)
            for r_i, (k, _) in enumerate(rows):
                ax = axes[r_i][c]
                ep, vals, singular = _stack(runs, k)
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (singular K, diverged runs)
                    mean = np.nanmean(vals, 0) if np.isfinite(vals).any() else np.full(len(ep), np.nan)
                    std = np.nanstd(vals, 0)
                if k == "mgs_logdet":
                    mean = np.where(singular.any(0), np.nan, mean)  # any seed singular: no finite mean
                    if singular.any():
                        any_singular = True
                        ax.plot(ep[singular.any(0)], np.zeros(int(singular.any(0).sum())), "x", color=color, ms=5,
                                transform=ax.get_xaxis_transform(), clip_on=False)
                (line,) = ax.plot(ep, mean, color=color, lw=1.4, label=_label(runs[0]))
                if len(runs) > 1:
                    ax.fill_between(ep, mean - std, mean + std, color=color, alpha=0.15, lw=0)
                handles.setdefault(method, line)
        axes[0][c].set_title(f"label noise {100 * noise:g}%" if results[0]["summary"]["higher_is_better"] else f"target noise σ = {noise:g}", fontsize=10)
        axes[1][c].set_yscale("log")
        axes[2][c].set_xlabel("epoch")
    for r_i, (_, lab) in enumerate(rows):
        axes[r_i][0].set_ylabel(lab)
    if any_singular:  # explain the marker only where it appears
        axes[2][0].annotate("× : K singular, log det = −∞ (gap)", (0, -0.32), xycoords="axes fraction", fontsize=7)
    # as many legend columns as the figure's width holds (labels run to ~30 characters at 8 pt ≈ 2.3 in)
    ncol = max(1, min(len(handles), int(fig.get_figwidth() // 2.4)))
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()], loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"{title}  ({_seeds_note(results)})", fontsize=11)
    fig.tight_layout(rect=(0, 0.05 + 0.025 * math.ceil(len(handles) / ncol), 1, 0.97))
    return _save(fig, path)


def _seeds_note(results: list[dict[str, Any]]) -> str:
    """'mean ± std over 3 seeds', 'one run per method, seed 0' when there is nothing to average, or, when
    the curves rest on different numbers of seeds, the range (a curve without a band is one seed)."""
    seeds = sorted({r["config"]["seed"] for r in results})
    per_curve: dict[tuple, set] = {}
    for r in results:
        key = (json.dumps(r.get("method"), sort_keys=True, default=str), r["config"].get("noise"), r["config"].get("n_train"))
        per_curve.setdefault(key, set()).add(r["config"]["seed"])
    counts = sorted({len(s) for s in per_curve.values()})
    if len(seeds) == 1:
        return f"one run per method, seed {seeds[0]}"
    if len(counts) > 1:
        return f"mean ± std over {counts[0]}–{counts[-1]} seeds per curve; no band: one seed"
    return f"mean ± std over {len(seeds)} seeds"


def plot_demo(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """The demo's figure: test accuracy, flipped training labels memorised and tr K/N against epochs, one line per method.

    One panel each; a legend entry gives each method's final and maximum test accuracy. Several seeds
    are averaged (a ±std band); one seed is drawn as is and the title says so.
    """
    plt = _plt()
    if not results:
        raise ValueError("no results to plot")
    by: dict[str, list] = defaultdict(list)
    for r in results:
        by[r["config"]["method"]].append(r)
    classification = bool(results[0]["summary"]["higher_is_better"])
    panels = [("test_acc" if classification else "test_loss", "test accuracy (%)" if classification else "test MSE", 100 if classification else 1)]
    if classification and any("memorised" in h for r in results for h in r["history"]):
        panels.append(("memorised", "flipped training labels\npredicted as given (%)", 100))
    panels.append(("mgs_trace", "tr K / N of a fixed probe batch", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
    handles = []
    for method in _order(by):
        runs = by[method]
        color = METHOD_COLORS.get(method)
        for ax, (key, ylabel, scale) in zip(axes[0], panels):
            ep, vals, _ = _stack(runs, key)
            if key == "mgs_trace":  # tr K of the probe → per row of K
                vals = vals / np.array([[r["config"]["probe_size"] * r["data"]["num_outputs"]] for r in runs])
            elif scale:
                vals = vals * scale
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0)
            (line,) = ax.plot(ep, mean, color=color, lw=1.6)
            if len(runs) > 1:
                ax.fill_between(ep, mean - std, mean + std, color=color, alpha=0.15, lw=0)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if key == "mgs_trace":
                ax.set_yscale("log")
            if key == panels[0][0]:
                finals = [r["summary"]["final"] for r in runs]
                best = [r["summary"]["best"] for r in runs]
                if classification and all(f is not None for f in finals):
                    line.set_label(f"{_label(runs[0])}: final {100 * np.mean(finals):.1f}%, max {100 * np.mean(best):.1f}%")
                else:
                    line.set_label(_label(runs[0]))
                handles.append(line)
    ncol = 2 if len(handles) > 2 else len(handles)
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=ncol, fontsize=8.5, frameon=False)
    fig.suptitle(f"{title}  ({_seeds_note(results)})", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * math.ceil(len(handles) / ncol), 1, 0.96))
    return _save(fig, path)


def plot_heatmaps(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Final test metric (mean over seeds) over noise (rows) × training size (columns), one panel per method."""
    plt = _plt()
    if not results:
        raise ValueError("no results to plot")
    cells: dict[str, dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        v = r["summary"]["final"]
        cells[r["config"]["method"]][(r["config"]["noise"], r["config"]["train_size"])].append(np.nan if v is None else v)
    methods = _order(cells)
    noises = sorted({k[0] for c in cells.values() for k in c})
    sizes = sorted({k[1] for c in cells.values() for k in c})
    higher = results[0]["summary"]["higher_is_better"]
    grids = {m: np.array([[np.mean(cells[m][(nz, sz)]) if (nz, sz) in cells[m] else np.nan for sz in sizes] for nz in noises]) for m in methods}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()]) if grids else np.array([0.0])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ncol = min(4, len(methods))
    nrow = math.ceil(len(methods) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.7 * ncol + 1.0, 2.5 * nrow + 0.6), squeeze=False, constrained_layout=True)
    cmap = "viridis" if higher else "viridis_r"
    im = None
    for ax, m in zip(axes.ravel(), methods):
        g = grids[m]
        im = ax.imshow(g, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for i in range(len(noises)):
            for j in range(len(sizes)):
                txt = "div." if not np.isfinite(g[i, j]) else (f"{100 * g[i, j]:.0f}" if higher else f"{g[i, j]:.2f}")
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="w" if np.isfinite(g[i, j]) and (g[i, j] - vmin) < 0.5 * (vmax - vmin) else "k")
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes], fontsize=7)
        ax.set_yticks(range(len(noises)), [f"{100 * n:g}%" if higher else f"{n:g}" for n in noises], fontsize=7)
        ax.set_title(METHODS.get(m, (None, None, None, m))[3], fontsize=9)
        ax.set_xlabel("training size", fontsize=7)
        if ax in axes[:, 0]:
            ax.set_ylabel("label noise" if higher else "target noise", fontsize=7)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=("final test accuracy" if higher else "final test MSE"))
    fig.suptitle(title + ("  (final test accuracy, %)" if higher else "  (final test MSE)"), fontsize=10)
    return _save(fig, path)


def plot_boundaries(results: list[dict[str, Any]], path: str | Path, title: str = "", data=None) -> Path:
    """Decision boundaries (P(class 1) = 0.5 and the probability field) per method, one seed/noise each.

    ``results`` must carry ``boundary`` (2-D classification runs); the training points of the
    first result's scenario are drawn on top (flipped labels marked with a black edge).
    """
    plt = _plt()
    runs = [r for r in results if "boundary" in r]
    if not runs:
        raise ValueError("no result has a decision boundary (only 2-D classification runs record one)")
    runs = sorted(runs, key=lambda r: _order([r["config"]["method"], *METHODS]).index(r["config"]["method"]))
    if data is None:
        from .data import load_dataset

        c = runs[0]["config"]
        data = load_dataset(c["dataset"], train_size=c["train_size"], noise=c["noise"], seed=c["seed"], **dict(c["data_options"]))
    ncol = min(4, len(runs))
    nrow = math.ceil(len(runs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.75 * nrow + 0.3), squeeze=False)
    x, y, flipped = data.x_train.numpy(), data.y_train.numpy(), data.noisy_mask.numpy()
    for ax, r in zip(axes.ravel(), runs):
        b = r["boundary"]
        prob = np.asarray(b["prob"])
        ax.imshow(prob, extent=b["extent"], origin="lower", cmap="RdBu", vmin=0, vmax=1, alpha=0.55, aspect="auto")
        gx = np.linspace(b["extent"][0], b["extent"][1], prob.shape[1])
        gy = np.linspace(b["extent"][2], b["extent"][3], prob.shape[0])
        ax.contour(gx, gy, prob, levels=[0.5], colors="k", linewidths=1.2)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu", vmin=0, vmax=1, s=7, edgecolors=np.where(flipped, "k", "none"), linewidths=0.5)
        acc = r["summary"]["final"]
        ax.set_title(f"{_label(r)}\nfinal test acc {'div.' if acc is None else f'{100 * acc:.1f}%'}", fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(runs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write a PNG quantised to a 256-colour palette (about 3× smaller, so figures can be committed)."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.1)  # never clip a legend or label
    _plt().close(fig)
    buf.seek(0)
    try:
        from PIL import Image  # a matplotlib dependency

        Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    except Exception:  # pragma: no cover - fall back to the plain PNG
        path.write_bytes(buf.getvalue())
    return path
