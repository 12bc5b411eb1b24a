"""The ``mgs-torch`` console script: ``demo``, ``testbench`` and ``report``.

``mgs-torch demo``       300 blurred 8×8 digits with 30 % flipped labels: MGS tr K against the unregularised net, weight
                         decay and the input-gradient penalty; accuracy / memorisation / tr K curves as PNG, TensorBoard
                         logs (about a minute of one CPU core); ``--dataset circles`` adds decision boundaries.
``mgs-torch testbench``  a grid noise × training size × method × seed (resumable), figures, tables.
``mgs-torch report``     markdown tables from the run JSONs of an output folder (optionally filling a template).
``mgs-torch stopping``   MGS early stopping vs validation-loss early stopping vs the last epoch, on finished runs.
``mgs-torch scores``     how well per-sample MGS scores flag flipped labels (AUROC), next to the per-sample loss.
``mgs-torch alpha``      tr K / N and the loss at initialisation: how large the MGS trace penalty starts (docs/choosing-alpha.md).

Run ``mgs-torch <command> --help`` for the options. Needs the testbench installed (``pip install -e ./bench``)
(and tensorboard for ``--tensorboard``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _common_training(p: argparse.ArgumentParser, epochs: int) -> None:
    g = p.add_argument_group("training (the paper's protocol by default)")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs per run, no early stopping (default {epochs})")
    g.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default 32)")
    g.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate (default 0.1)")
    g.add_argument("--lr-decay", type=float, default=0.99, help="learning rate × this after every epoch (default 0.99)")
    g.add_argument("--eval-points", type=int, default=25, help="evenly spaced evaluations incl. epoch 0 (default 25)")
    g.add_argument("--probe-size", type=int, default=32, help="training inputs in the fixed MGS probe batch (default 32)")
    g.add_argument("--hidden", type=int, nargs="+", default=None, help="FCN hidden widths (default the paper's 300 ×6)")
    g.add_argument("--fixed-split", action="store_true",
                   help="train every run on the same images (a fixed stratified draw) instead of redrawing the training set per seed")
    g.add_argument("--alpha-warmup", type=int, default=0, metavar="EPOCHS",
                   help="ramp every penalty's α linearly from 0 over this many epochs (default 0: none)")
    g.add_argument("--init", default="auto", choices=("auto", "he", "xavier", "torch"),
                   help="weight init, zero biases (default auto: He/Kaiming-normal for lenet5, Glorot-uniform for fcn)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: these models are tiny, and extra threads only contend for busy cores)")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    g.add_argument("--no-plots", action="store_true", help="do not draw figures")
    g.add_argument("--figures", default=None, help="folder for the PNGs (default <out>/figures)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    parser = argparse.ArgumentParser(prog="mgs-torch", description="Model Gradient Similarity (MGS) experiments for PyTorch.")
    from mgs_torch import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="300 digits with 30 %% flipped labels: MGS tr K against the unregularised net, weight decay "
                                       "and the input-gradient penalty; curves as PNG, TensorBoard logs (about a minute of one core)")
    demo.add_argument("--out", default="mgs_demo", help="output folder (default ./mgs_demo)")
    demo.add_argument("--dataset", default="digits", choices=tuple(DEMO_SETTINGS),
                      help="digits (default: 8×8 blurred digits, the paper's FCN) or circles (2-D: decision boundaries too)")
    demo.add_argument("--noise", type=float, default=0.3, help="fraction of training labels flipped (default 0.3)")
    demo.add_argument("--train-size", type=int, default=None, help="training samples (default 300 digits, 200 circles)")
    demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS),
                      help=f"methods (default {' '.join(DEMO_METHODS)}; 'all' for every one): {', '.join(METHODS)}")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", type=_kv, action="append", default=[], metavar="METHOD=VALUE", help="override a method's hyper-parameter")
    demo.add_argument("--tuned", default=None, metavar="JSON",
                      help="take the hyper-parameters from a tuning record (tuned_digits_fcn.json) instead of the built-in ones")
    _common_training(demo, epochs=100)
    demo.set_defaults(hidden=None, epochs=None, eval_points=None)

    tb = sub.add_parser("testbench", help="grid noise × size × method × seed; per-run JSON/CSV, figures, tables")
    tb.add_argument("--dataset", default="digits", choices=DATASETS, help="data set (default digits)")
    tb.add_argument("--data-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="data-set option, e.g. blur_radius=10, root=/data/mnist (IDX files) or path=my.npz (--dataset npz)")
    tb.add_argument("--model", nargs="+", default=["lenet5"], choices=MODELS, help="model(s) (default lenet5)")
    tb.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.8],
                    help="label-noise fractions, or target-noise scales for regression (default 0 0.3 0.6 0.8)")
    tb.add_argument("--sizes", type=int, nargs="+", default=[500], help="training-set sizes (default 500)")
    tb.add_argument("--methods", nargs="+", default=["paper"],
                    help=f"methods, 'paper' (the seven of Table 1, ‖∇θL‖² baseline), 'paper-exact' (with the paper's ‖∇θL‖) or 'all' (paper + Adam): {', '.join(METHODS)}")
    tb.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    tb.add_argument("--out", default="testbench_out", help="output folder (default ./testbench_out)")
    tb.add_argument("--tune", action="store_true", help="tune each method's hyper-parameter once on --tune-noise / --tune-size first")
    tb.add_argument("--tune-noise", type=float, default=None, help="noise of the tuning scenario (default: the middle of --noise)")
    tb.add_argument("--tune-size", type=int, default=None, help="training size of the tuning scenario (default: the middle of --sizes)")
    tb.add_argument("--tune-seeds", type=int, nargs="+", default=[0], help="seeds for tuning (default 0)")
    tb.add_argument("--grid", type=_kv, action="append", default=[], metavar="METHOD=V1,V2,...", help="tuning grid for a method")
    tb.add_argument("--set", type=_kv, action="append", default=[], metavar="METHOD=VALUE", help="fix a method's hyper-parameter (overrides tuning)")
    tb.add_argument("--report", action="store_true", help="print the markdown tables of this grid at the end")
    tb.add_argument("--dry-run", action="store_true",
                    help="list the runs (and how many are finished, tuning included) with an estimate of the time left, and exit")
    tb.add_argument("--estimate-from", nargs="+", default=[], metavar="DIR",
                    help="testbench folders whose finished runs give the seconds per epoch of the --dry-run estimate "
                         "(default: the --out folder's own finished runs)")
    _common_training(tb, epochs=100)

    st = sub.add_parser("stopping", help="MGS early stopping vs validation-loss early stopping vs the last epoch, on finished runs")
    st.add_argument("--out", default="testbench_out", help="folder holding runs/ of a testbench evaluated every epoch (--eval-points EPOCHS+1)")
    st.add_argument("--threshold", type=float, nargs="+", default=[0.02], help="relative growth per window below which an epoch is a plateau (default 0.02); several: one table each")
    st.add_argument("--patience", type=int, default=3, help="plateau epochs in a row to stop (default 3)")
    st.add_argument("--window", type=int, default=1, help="epochs the growth is measured over (default 1)")
    st.add_argument("--min-epochs", type=int, default=0, help="never stop before this many epochs (default 0)")
    st.add_argument("--val-patience", type=int, default=10, help="patience of the validation-loss early stopping (default 10)")
    st.add_argument("--select-on", default=None, metavar="MODEL",
                    help="choose threshold × window × patience from a small grid by the mean *validation* accuracy at the "
                         "MGS stop on this model's runs, then report every table with the chosen rule")

    sc = sub.add_parser("scores", help="how well per-sample MGS scores flag flipped labels (AUROC), next to the per-sample loss")
    sc.add_argument("--dataset", default="digits", choices=DATASETS, help="a classification data set (default digits)")
    sc.add_argument("--data-option", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="data-set option")
    sc.add_argument("--model", nargs="+", default=["fcn"], choices=MODELS, help="model(s) (default fcn)")
    sc.add_argument("--noise", type=float, nargs="+", default=[0.3, 0.6], help="label-noise fractions (default 0.3 0.6)")
    sc.add_argument("--sizes", type=int, nargs="+", default=[500], help="training-set sizes (default 500); every training sample is scored")
    sc.add_argument("--method", default="unreg", help="training method (default unreg)")
    sc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    sc.add_argument("--out", default="testbench_out", help="output folder; records go to <out>/flagging/ (resumable)")
    _common_training(sc, epochs=100)
    sc.set_defaults(eval_points=6)

    al = sub.add_parser("alpha", help="tr K/N and the loss at initialisation, and the α at which the trace penalty equals the loss")
    al.add_argument("--dataset", default="digits", choices=DATASETS, help="data set (default digits)")
    al.add_argument("--data-option", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="data-set option")
    al.add_argument("--model", default="lenet5", choices=MODELS, help="model (default lenet5)")
    al.add_argument("--noise", type=float, default=0.5, help="label noise of the labels the loss sees (default 0.5)")
    al.add_argument("--size", type=int, default=500, help="training-set size (default 500)")
    al.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisations (default 0 1 2)")
    al.add_argument("--batches", type=int, default=4, help="mini-batches per initialisation (default 4)")
    al.add_argument("--tuned", default=None, metavar="JSON", help="a tuning record (tuned_*.json) whose MGS tr K α to set beside it")
    al.add_argument("--out", default=None, help="write the record to <out>/init/<data set>_<model>_<init>.json")
    _common_training(al, epochs=1)

    rep = sub.add_parser("report", help="markdown tables from the run JSONs under --out")
    rep.add_argument("--out", default="testbench_out", help="folder holding runs/ (default ./testbench_out)")
    rep.add_argument("--template", default=None, help="markdown template with {{table ...}} / {{claims ...}} / {{tuned ...}} / {{runtime ...}} markers")
    rep.add_argument("--output", default=None, help="write here instead of stdout")
    rep.add_argument("--definition", default="testbench", choices=("testbench", "paper"),
                     help="final/max: 'testbench' (mean of the last 5 evaluations / mean of per-run maxima) or "
                          "'paper' (mean over the last 5 %% of training / max of the seed-averaged curve); default testbench")
    return parser


def _values(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    from .methods import make_method

    out = {}
    for k, v in pairs:
        out[k] = float(v)
        make_method(k, out[k])  # validates
    return out


def _base_config(args: argparse.Namespace, **kw: Any):
    from .runner import RunConfig

    return RunConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
                     eval_points=args.eval_points, probe_size=args.probe_size,
                     hidden=tuple(args.hidden) if args.hidden else None, init=args.init,
                     fixed_split=args.fixed_split, alpha_warmup=args.alpha_warmup, **kw)


def _configs(base, methods: Sequence[str], values: dict[str, float | None], noises, sizes, seeds) -> list:
    return [base.with_(method=m, value=values.get(m), noise=float(nz), train_size=int(sz), seed=int(s))
            for nz in noises for sz in sizes for m in methods for s in seeds]


def _figures(results: list[dict], fig_dir: Path, stem: str, title: str) -> list[Path]:
    from . import plots

    written = []
    sizes = sorted({r["config"]["train_size"] for r in results})
    for sz in sizes:
        runs = [r for r in results if r["config"]["train_size"] == sz]
        written.append(plots.plot_curves(runs, fig_dir / f"{stem}_n{sz}_curves.png", f"{title}, {sz} training samples"))
    if len(sizes) > 1:
        written.append(plots.plot_heatmaps(results, fig_dir / f"{stem}_heatmap.png", title))
    if any("boundary" in r for r in results):
        seed = min(r["config"]["seed"] for r in results)
        for nz in sorted({r["config"]["noise"] for r in results}):
            for sz in sizes:
                runs = [r for r in results if r["config"]["noise"] == nz and r["config"]["train_size"] == sz and r["config"]["seed"] == seed]
                written.append(plots.plot_boundaries(runs, fig_dir / f"{stem}_noise{nz:g}_n{sz}_boundaries.png",
                                                     f"{title}: {100 * nz:g}% flipped labels, {sz} points, seed {seed}"))
    return written


# The demo's settings. Its hyper-parameters are each method's value chosen by a tuning run of examples/run_all.sh
# (by final validation accuracy, seed 0), recorded in examples/testbench/tuned_<data set>_fcn.json — for digits on
# 60 % noise (not the demo's 30 %), for circles on the demo's own scenario. --tuned FILE reads such a record instead.
DEMO_METHODS = ("unreg", "weight_decay", "gradnorm_inputs", "mgs_trace")
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"train_size": 300, "epochs": 100, "eval_points": 26, "title": "digits 8×8 (blurred), FCN 6×300",
               "values": {"weight_decay": 0.003, "dropout": 0.1, "gradnorm_params": 0.1, "gradnorm_inputs": 0.1,
                          "mgs_trace": 3e-3, "mgs_logdet": 0.03, "adam": 3e-5}},
    "circles": {"train_size": 200, "epochs": 150, "eval_points": 25, "title": "two circles, FCN 6×300",
                "values": {"weight_decay": 0.01, "dropout": 0.1, "gradnorm_params": 0.001, "gradnorm_inputs": 0.001,
                           "mgs_trace": 3e-4, "mgs_logdet": 3e-3, "adam": 1e-4}},
}
DEMO_VALUES = DEMO_SETTINGS["circles"]["values"]  # the values of the earlier two-circles demo


def _demo_reading(results: list[dict[str, Any]]) -> list[str]:
    """Plain sentences from the demo's numbers: what MGS tr K did against the others (never a fixed claim)."""
    by = {r["config"]["method"]: r for r in results if r["summary"]["final"] is not None}
    mgs, unreg = by.get("mgs_trace"), by.get("unreg")
    if mgs is None or unreg is None or not mgs["summary"]["higher_is_better"]:
        return []
    pc = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    pts = lambda v: f"{100 * v:.1f} points"  # noqa: E731
    fm, bm, fu, bu = mgs["summary"]["final"], mgs["summary"]["best"], unreg["summary"]["final"], unreg["summary"]["best"]
    mem = lambda r: r["history"][-1].get("memorised")  # noqa: E731
    lines = [f"MGS tr K ends at {pc(fm)} (its max {pc(bm)}); the unregularised net ends at {pc(fu)} (its max {pc(bu)})"
             + (f", having memorised {pc(mem(unreg))} of the flipped labels against MGS's {pc(mem(mgs))}." if mem(unreg) is not None else ".")]
    if fm - fu > 0.02:
        lines.append(f"What MGS does here: it keeps {pts(fm - fu)} more of the test accuracy the unregularised net loses late in training.")
    else:
        lines.append("Here MGS does not beat the unregularised net by more than 2 points.")
    peak_run = max((r for m, r in by.items() if m != "mgs_trace"), key=lambda r: r["summary"]["best"])  # first of equals
    peak = peak_run["summary"]["best"]
    if bm <= peak + 0.02:
        lines.append(f"What it does not do: raise the peak — its max ({pc(bm)}) is {'below' if bm < peak - 0.01 else 'about'} the best "
                     f"max of the others ({pc(peak)}, {peak_run['method']['label']})"
                     + ("; it keeps accuracy, it does not add to it." if fm - fu > 0.02 else "."))
    else:
        lines.append(f"Its max is {pts(bm - peak)} above the best max of the others ({pc(peak)}, {peak_run['method']['label']}).")
    times = ", ".join(f"{r['method']['label']} {r['seconds']:.0f} s" for r in results)
    lines.append(f"Cost (wall time of each run, data loading included): {times} — the penalty differentiates the Jacobian's norm "
                 "at every step.")
    others = [(r["summary"]["final"], r) for m, r in by.items() if m not in ("mgs_trace", "unreg")]
    if others:
        f_o, r_o = max(others, key=lambda t: t[0])
        verdict = "ahead of" if fm > f_o + 0.01 else "behind" if fm < f_o - 0.01 else "level with"
        lines.append(f"Against the best other regulariser here, {r_o['method']['label']}, MGS ends {verdict} it ({pc(fm)} vs {pc(f_o)}): "
                     "one seed — rerun with --seed to see the spread.")
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    from .methods import method_names
    from .runner import run_grid

    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(args.out)
    setting = DEMO_SETTINGS[args.dataset]
    for key in ("train_size", "epochs", "eval_points"):
        if getattr(args, key) is None:
            setattr(args, key, setting[key])
    methods = method_names(args.methods)
    values: dict[str, float | None] = dict(setting["values"])
    if args.tuned:
        values.update(json.loads(Path(args.tuned).read_text())["chosen"])
    values.update(_values(args.set))
    base = _base_config(args, dataset=args.dataset, model="fcn")
    configs = _configs(base, methods, values, [args.noise], [args.train_size], [args.seed])
    results = run_grid(configs, out, tensorboard=not args.no_tensorboard, progress=not args.quiet, desc="demo")
    written = []
    if not args.no_plots:
        from . import plots

        fig_dir = Path(args.figures or out / "figures")
        title = f"{setting['title']}, {args.train_size} training samples, {100 * args.noise:g}% flipped labels"
        written.append(plots.plot_demo(results, fig_dir / f"{args.dataset}_fcn_demo.png", title))
        if any("boundary" in r for r in results):
            written.append(plots.plot_boundaries(results, fig_dir / f"{args.dataset}_fcn_boundaries.png", f"{title}, seed {args.seed}"))
    from .report import memorised_table, results_table

    print(results_table(results))
    if results and results[0]["summary"]["higher_is_better"] and args.noise > 0:
        print(memorised_table(results))
    for line in _demo_reading(results):
        print(line)
    for p in written:
        print(f"figure: {p}")
    if not args.no_tensorboard:
        print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} s of CPU)")
    return 0


def _middle(values: Sequence[float]) -> float:
    """The middle value (the upper one of the two middles for an even count: 0 0.3 0.6 0.8 → 0.6)."""
    vals = sorted(values)
    return vals[len(vals) // 2]


def cmd_testbench(args: argparse.Namespace) -> int:
    from .methods import METHODS, method_names
    from .report import coerce_value
    from .runner import run_grid, run_path, tune, tuned_path

    out = Path(args.out)
    methods = method_names(args.methods)
    fixed = _values(args.set)
    data_options = tuple(sorted((k, coerce_value(v)) for k, v in args.data_option))
    all_results = []
    for model in args.model:
        base = _base_config(args, dataset=args.dataset, model=model, data_options=data_options)
        values: dict[str, float | None] = {}
        record_path = tuned_path(out, args.dataset, model)
        if args.tune and args.dry_run:
            _dry_run_tuning(args, base, [m for m in methods if m not in fixed], out)
        if args.tune and not args.dry_run:
            grids = {k: [float(x) for x in v.split(",")] for k, v in args.grid}
            tnoise = args.tune_noise if args.tune_noise is not None else _middle(args.noise)
            tsize = args.tune_size if args.tune_size is not None else _middle(args.sizes)
            rec = tune(base.with_(noise=tnoise, train_size=tsize), [m for m in methods if m not in fixed], out,
                       grids=grids, seeds=args.tune_seeds, progress=not args.quiet)
            values.update(rec["chosen"])
            print(f"[{model}] tuned on noise {tnoise:g}, size {tsize}: {rec['chosen']}  ({record_path})")
        elif record_path.exists():
            values.update(json.loads(record_path.read_text())["chosen"])
            print(f"[{model}] using tuned values from {record_path}: {values}")
        values.update(fixed)
        missing = [m for m in methods if METHODS[m][0] is not None and m not in values]
        if missing and not (args.tune and args.dry_run):
            print(f"[{model}] registry defaults (not tuned) for: {', '.join(f'{m}={METHODS[m][1]:g}' for m in missing)}")
        configs = _configs(base, methods, values, args.noise, args.sizes, args.seeds)
        if args.dry_run:
            todo = [c for c in configs if not run_path(out, c).exists()]
            print(f"[{model}] {len(configs)} runs, {len(configs) - len(todo)} finished{_estimate(todo, [out, *args.estimate_from])}")
            continue
        results = run_grid(configs, out, tensorboard=not args.no_tensorboard, progress=not args.quiet, desc=f"{args.dataset}/{model}")
        all_results += results
        if not args.no_plots:
            for p in _figures(results, Path(args.figures or out / "figures"), f"{args.dataset}_{model}", f"{args.dataset}, {model}"):
                print(f"figure: {p}")
        if args.report:
            from .report import claims_table, results_table

            for sz in args.sizes:
                runs = [r for r in results if r["config"]["train_size"] == sz]
                print(f"\n### {args.dataset} / {model} / {sz} training samples\n")
                print(results_table(runs))
                if "mgs_trace" in methods:
                    print(claims_table(runs))
    return 0


def _seconds_per_epoch(folders: Sequence[str | Path]) -> dict[tuple[str, str, str], float]:
    """Mean seconds per epoch of the finished runs under ``folders`` (their grids and tuning runs), by (data set, model, method)."""
    from .runner import load_results

    per: dict[tuple[str, str, str], list[float]] = {}
    for folder in folders:
        for sub in (Path(folder), Path(folder) / "tune"):
            if (sub / "runs").is_dir():
                for r in load_results(sub):
                    c = r["config"]
                    if r.get("seconds") and not r.get("diverged"):
                        per.setdefault((c["dataset"], c["model"], c["method"]), []).append(r["seconds"] / c["epochs"])
    return {k: sum(v) / len(v) for k, v in per.items()}


def _estimate(todo: Sequence[Any], folders: Sequence[str | Path]) -> str:
    """', about X h of one core left (...)' for the runs ``todo``, from the speed of finished runs; '' when nothing is left."""
    if not todo:
        return ""
    speed = _seconds_per_epoch(folders)
    known = [c for c in todo if (c.dataset, c.model, c.method) in speed]
    if not known:
        return "; no finished run of these methods to estimate the time from (pass --estimate-from DIR)"
    seconds = sum(speed[(c.dataset, c.model, c.method)] * c.epochs for c in known)
    note = "" if len(known) == len(todo) else f", {len(todo) - len(known)} runs without an estimate"
    return f"; about {seconds / 3600:.1f} h of one core left at the speed of the finished runs{note}"


def _dry_run_tuning(args: argparse.Namespace, base: Any, methods: Sequence[str], out: Path) -> None:
    from .methods import METHODS, default_grid
    from .runner import run_path

    grids = {k: [float(x) for x in v.split(",")] for k, v in args.grid}
    tnoise = args.tune_noise if args.tune_noise is not None else _middle(args.noise)
    tsize = args.tune_size if args.tune_size is not None else _middle(args.sizes)
    configs = [base.with_(noise=tnoise, train_size=tsize, method=m, value=float(v), seed=s) for m in methods if METHODS[m][0] is not None
               for v in grids.get(m, default_grid(m)) for s in args.tune_seeds]
    todo = [c for c in configs if not run_path(out / "tune", c).exists()]
    print(f"[{base.model}] tuning: {len(configs)} runs, {len(configs) - len(todo)} finished{_estimate(todo, [out, *args.estimate_from])}"
          + ("" if not todo else " (the grid below then uses the values the tuning chooses)"))


def _require_runs(out: str | Path) -> Path:
    runs = Path(out) / "runs"
    if not runs.is_dir() or not any(runs.rglob("*.json")):
        raise FileNotFoundError(
            f"no run JSONs under {runs} (the folder {'is empty' if runs.is_dir() else 'does not exist'}); pass the --out "
            f"folder a 'mgs-torch testbench --out DIR' or 'mgs-torch demo --out DIR' wrote to"
        )
    return runs


def cmd_stopping(args: argparse.Namespace) -> int:
    from .runner import load_results
    from .stopping import stopping_table

    _require_runs(args.out)
    results = load_results(args.out)
    rules = [{"threshold": t, "patience": args.patience, "window": args.window, "min_checks": args.min_epochs} for t in args.threshold]
    if args.select_on:
        from .stopping import rule_selection_table

        grid = [{"threshold": t, "patience": p, "window": w, "min_checks": args.min_epochs}
                for t in (0.005, 0.01, 0.02, 0.05, 0.1) for w in (1, 5) for p in (3, 5)]
        table, chosen = rule_selection_table(results, grid, args.select_on)
        print(f"\n### Rule selection on {args.select_on} by validation accuracy at the MGS stop (test accuracy for information)\n")
        print(table)
        print(f"chosen: {chosen}")
        rules = [chosen]
    for rule in rules:
        threshold = rule["threshold"]
        args.window, args.patience = rule["window"], rule["patience"]
        print(f"\n### MGS stop: tr K/N of the probe grew < {100 * threshold:g}% per {args.window} epoch(s) for {args.patience} epochs "
              f"(min {args.min_epochs} epochs); val-loss patience {args.val_patience}; test accuracy (%)\n")
        print(stopping_table(results, rule, args.val_patience))
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    from .flagging import flagging_run, flagging_table
    from .report import coerce_value

    data_options = tuple(sorted((k, coerce_value(v)) for k, v in args.data_option))
    records = []
    for model in args.model:
        base = _base_config(args, dataset=args.dataset, model=model, data_options=data_options)
        for noise in args.noise:
            for size in args.sizes:
                for seed in args.seeds:
                    config = base.with_(method=args.method, value=None, noise=float(noise), train_size=int(size), seed=int(seed))
                    t0 = time.perf_counter()
                    records.append(flagging_run(config, args.out))
                    if not args.quiet:
                        print(f"[{model}] noise {noise:g}, n {size}, seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(flagging_table(records))
    return 0


def cmd_alpha(args: argparse.Namespace) -> int:
    from .alpha import init_record, init_scale, init_table
    from .report import coerce_value

    data_options = tuple(sorted((k, coerce_value(v)) for k, v in args.data_option))
    config = _base_config(args, dataset=args.dataset, model=args.model, data_options=data_options).with_(
        noise=args.noise, train_size=args.size, method="unreg", value=None)
    if args.out:
        rec = init_record(config, args.out, tuned=args.tuned, seeds=args.seeds, batches=args.batches)
        print(f"wrote {rec.pop('path')}")
    else:
        rec = init_scale(config, args.seeds, args.batches)
        if args.tuned:
            rec["tuned"] = {"alpha": json.loads(Path(args.tuned).read_text())["chosen"].get("mgs_trace"),
                            "noise": json.loads(Path(args.tuned).read_text())["scenario"]["noise"]}
    print(init_table([rec]))
    print(f"At initialisation the trace penalty α·tr K/N equals the loss at α = {rec['alpha_value']:.3g}: a scale, not a "
          "recommendation (docs/choosing-alpha.md compares it with the tuned α).")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import full_report, render_template

    _require_runs(args.out)
    text = render_template(Path(args.template).read_text(), args.out) if args.template else full_report(args.out, definition=args.definition)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgs-torch`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        commands = {"demo": cmd_demo, "testbench": cmd_testbench, "report": cmd_report, "stopping": cmd_stopping, "scores": cmd_scores,
                    "alpha": cmd_alpha}
        return commands[args.command](args)
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"mgs-torch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m mgs_bench.cli
    sys.exit(main())
