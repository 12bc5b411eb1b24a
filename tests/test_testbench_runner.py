"""Runner: history/summary, honest log det = −∞, divergence, resumability, tuning, TensorBoard, plots, report."""

from __future__ import annotations

import csv
import json
import math

import pytest

from mgs_bench import plots, report, runner
from mgs_bench.runner import RunConfig, eval_epochs, load_results, run_grid, run_path, summarise_history, train_run, tune


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = RunConfig(dataset="circles", model="fcn", hidden=(8, 8), train_size=40, epochs=4, eval_points=3, probe_size=8)


def test_eval_points_are_evenly_spaced_from_initialisation_to_the_end():
    assert eval_epochs(100, 5) == [0, 25, 50, 75, 100]
    assert eval_epochs(3, 25) == [0, 1, 2, 3]


def test_summary_final_is_mean_of_last_five_and_best_is_max_or_min():
    hist = [{"test_acc": a, "val_acc": a, "test_loss": 1 - a, "val_loss": 1 - a} for a in [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1]]
    s = summarise_history(hist, classification=True)
    assert math.isclose(s["final"], 0.3) and s["best"] == 0.9 and s["higher_is_better"]
    r = summarise_history(hist, classification=False)
    assert math.isclose(r["final"], 0.7) and math.isclose(r["best"], 0.1) and r["metric"] == "mse"


def test_run_records_config_history_summary_and_csv(tmp_path):
    r = train_run(TINY.with_(method="mgs_trace", value=0.01, noise=0.2), out_dir=tmp_path)
    path = run_path(tmp_path, TINY.with_(method="mgs_trace", value=0.01, noise=0.2))
    on_disk = json.loads(path.read_text())
    assert on_disk["config"]["method"] == "mgs_trace" and on_disk["summary"] == r["summary"]
    assert [h["epoch"] for h in on_disk["history"]] == [0, 2, 4]
    assert {"test_acc", "val_acc", "train_loss", "mgs_trace", "mgs_logdet", "mgs_rank", "memorised"} <= set(on_disk["history"][-1])
    rows = list(csv.DictReader(open(path.with_suffix(".csv"))))
    assert len(rows) == 3 and float(rows[-1]["mgs_trace"]) == pytest.approx(r["history"][-1]["mgs_trace"])
    assert len(on_disk["boundary"]["prob"]) == 60  # 2-D data: decision boundary stored for plotting


def test_singular_kernel_is_stored_as_minus_infinity_honestly(tmp_path):
    # 2 → 1 → 2 network: 7 parameters < n·q = 16 rows, so K = J Jᵀ is singular
    cfg = TINY.with_(hidden=(1,), epochs=2, eval_points=2)
    r = train_run(cfg, out_dir=tmp_path)
    h = r["history"][-1]
    assert h["mgs_singular"] and h["mgs_logdet"] is None and h["mgs_rank"] < h["mgs_size"] == 16
    text = run_path(tmp_path, cfg).read_text()
    assert '"mgs_logdet": null' in text and "NaN" not in text
    rows = list(csv.DictReader(open(run_path(tmp_path, cfg).with_suffix(".csv"))))
    assert rows[-1]["mgs_logdet"] == "-inf" and float(rows[-1]["mgs_logdet"]) == -math.inf
    png = plots.plot_curves([r], tmp_path / "singular.png", "singular")  # a gap, not a crash
    assert png.stat().st_size > 1000


def test_divergence_stops_the_run_and_is_reported(tmp_path):
    cfg = RunConfig(dataset="diabetes", model="fcn", train_size=60, epochs=3, eval_points=2, lr=10.0, method="mgs_trace", value=0.01)
    r = train_run(cfg, out_dir=tmp_path)
    assert r["diverged"] and r["summary"]["final"] is None and r["summary"]["diverged_at_epoch"] >= 1
    assert "diverged (1/1)" in report.results_table([r])


def test_grid_is_resumable_second_invocation_skips(tmp_path, monkeypatch):
    configs = [TINY.with_(method=m, seed=s) for m in ("unreg", "weight_decay") for s in (0, 1)]
    first = run_grid(configs, tmp_path, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (run_path(tmp_path, c) for c in configs)}

    def boom(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(runner, "train_run", boom)
    second = run_grid(configs, tmp_path, progress=False)
    assert [r["summary"] for r in second] == [r["summary"] for r in first]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(load_results(tmp_path, method="weight_decay")) == 2


def test_run_id_depends_on_every_setting():
    ids = {TINY.run_id, TINY.with_(seed=1).run_id, TINY.with_(lr=0.05).run_id, TINY.with_(noise=0.3).run_id, TINY.with_(epochs=5).run_id, TINY.with_(init="he").run_id}
    assert len(ids) == 6
    with pytest.raises(ValueError, match="lenet5"):
        RunConfig(model="vgg")
    with pytest.raises(ValueError, match="circles"):
        RunConfig(dataset="imagenet")


def test_same_seed_same_result():
    a = train_run(TINY.with_(method="dropout", value=0.3))
    b = train_run(TINY.with_(method="dropout", value=0.3))
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]


def test_tuning_picks_the_best_validation_value_and_records_it(tmp_path):
    rec = tune(TINY.with_(noise=0.3), ["unreg", "weight_decay"], tmp_path, grids={"weight_decay": [1e-4, 0.5]}, progress=False)
    scores = rec["scores"]["weight_decay"]
    assert set(scores) == {"0.0001", "0.5"} and "unreg" not in rec["scores"]
    assert rec["chosen"]["weight_decay"] == float(max(scores, key=scores.get))
    on_disk = json.loads((tmp_path / "tuned_circles_fcn.json").read_text())
    assert on_disk["chosen"] == rec["chosen"] and "validation" in on_disk["criterion"]


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_run(TINY, out_dir=tmp_path, tensorboard=True, tb_dir=tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"mgs/trace", "mgs/logdet", "mgs/rank", "test/accuracy", "test/loss"} <= tags
    assert [e.step for e in acc.Scalars("mgs/trace")] == [0, 2, 4]


def test_plots_and_report_tables(tmp_path):
    configs = [TINY.with_(method=m, noise=nz, train_size=sz) for m in ("unreg", "mgs_trace") for nz in (0.0, 0.4) for sz in (30, 40)]
    results = run_grid(configs, tmp_path, progress=False)
    for fn, name in ((plots.plot_curves, "c.png"), (plots.plot_heatmaps, "h.png"), (plots.plot_boundaries, "b.png")):
        chosen = results if fn is not plots.plot_boundaries else [r for r in results if r["config"]["noise"] == 0.4 and r["config"]["train_size"] == 40]
        assert fn(chosen, tmp_path / name, "t").stat().st_size > 1000
    with pytest.raises(ValueError, match="boundary"):
        plots.plot_boundaries([{k: v for k, v in results[0].items() if k != "boundary"}], tmp_path / "x.png")
    n40 = [r for r in results if r["config"]["train_size"] == 40]
    table = report.results_table(n40)
    lines = table.splitlines()
    assert lines[0] == "| method | 0% noise | 40% noise |" and len(lines) == 2 + 2 + 2
    r0 = next(r for r in n40 if r["config"]["method"] == "unreg" and r["config"]["noise"] == 0.0)
    cell = lines[2].split(" | ")[1].strip("*")
    assert cell == f"{100 * r0['summary']['final']:.1f} ({100 * r0['summary']['best']:.1f})"  # one seed: no ± std
    assert "one seed" in lines[-1]
    two_seeds = run_grid([TINY.with_(method="unreg", train_size=40, seed=s) for s in (0, 1)], tmp_path / "two", progress=False)
    finals = [100 * r["summary"]["final"] for r in two_seeds]
    import numpy as np

    assert f"{np.mean(finals):.1f} ± {np.std(finals):.1f}" in report.results_table(two_seeds)
    assert "rank of MGS tr K" in report.claims_table(n40)
    mem = report.memorised_table(n40).splitlines()
    r4 = next(r for r in n40 if r["config"]["method"] == "mgs_trace" and r["config"]["noise"] == 0.4)
    assert mem[0] == "| method | 40% noise |" and mem[3] == f"| MGS tr K | {100 * r4['history'][-1]['memorised']:.0f} |"
    clean = [r for r in n40 if r["config"]["noise"] == 0]
    assert report.memorised_table(clean).startswith("_no runs with label noise yet")  # not a table without columns
    text = report.render_template("A\n{{table dataset=circles train_size=40}}\nB {{runtime model=fcn}}", tmp_path)
    assert text.startswith("A\n| method | 0% noise | 40% noise |") and "| **all** | 8 |" in text
    import shutil  # the tuning runs live under <out>/tune/runs: source=tune reads them, the default does not

    shutil.copytree(tmp_path / "runs", tmp_path / "tune" / "runs")
    shutil.rmtree(tmp_path / "runs")
    assert "_no runs found_" in report.render_template("{{table dataset=circles train_size=40}}", tmp_path)
    assert report.render_template("{{table source=tune dataset=circles train_size=40}}", tmp_path) == table.rstrip("\n")
    with pytest.raises(ValueError, match="source must be"):
        report.render_template("{{table source=other dataset=circles}}", tmp_path)


def test_curves_legend_fits_in_the_figure(monkeypatch, tmp_path):
    """The demo's curves figure (8 methods, one noise column) keeps its whole legend inside the figure."""
    from pathlib import Path

    from mgs_bench.runner import load_results

    results = load_results(Path(__file__).resolve().parents[1] / "examples" / "testbench", dataset="circles")
    assert len({r["config"]["method"] for r in results}) == 8
    seen = {}

    def capture(fig, path):
        fig.canvas.draw()
        seen["fig"] = fig
        return Path(path)

    monkeypatch.setattr(plots, "_save", capture)
    plots.plot_curves(results, tmp_path / "c.png", "circles")
    fig = seen["fig"]
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box, frame = legend.get_window_extent(renderer), fig.bbox
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
    for ax in fig.axes:  # and no panel runs into it
        assert ax.get_tightbbox(renderer).y0 >= box.y1 - 1 or ax.get_position().y0 * frame.height >= box.y1 - 1


def test_curves_title_and_marker_note_say_only_what_is_drawn(monkeypatch, tmp_path):
    """One seed: no 'mean ± std over 1 seed'; the × note appears only where a log det was singular (issue 23)."""
    from pathlib import Path

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: (fig.canvas.draw(), seen.append(fig), Path(path))[-1])
    results = run_grid([RunConfig(dataset="circles", model="fcn", hidden=(8,), train_size=30, epochs=2, eval_points=2, probe_size=4,
                                  method=m, noise=0.3) for m in ("unreg", "weight_decay")], tmp_path, progress=False)
    plots.plot_curves(results, tmp_path / "c.png", "t")
    texts = [t.get_text() for t in seen[-1].findobj(lambda a: hasattr(a, "get_text"))]
    assert seen[-1]._suptitle.get_text() == "t  (one run per method, seed 0)"
    assert not any("K singular" in t for t in texts)
    singular = json.loads(json.dumps(results))
    singular[0]["history"][-1].update(mgs_singular=True, mgs_logdet=None)
    plots.plot_curves(singular + [json.loads(json.dumps(results[0])) | {"config": results[0]["config"] | {"seed": 1}}], tmp_path / "d.png", "t")
    texts = [t.get_text() for t in seen[-1].findobj(lambda a: hasattr(a, "get_text"))]
    # unregularised on seeds 0 and 1, weight decay on seed 0 only: the title says the curves differ
    assert any("K singular" in t for t in texts)
    assert seen[-1]._suptitle.get_text() == "t  (mean ± std over 1–2 seeds per curve; no band: one seed)"
    both = results + [json.loads(json.dumps(r)) | {"config": r["config"] | {"seed": 1}} for r in results]
    plots.plot_curves(both, tmp_path / "f.png", "t")
    assert seen[-1]._suptitle.get_text() == "t  (mean ± std over 2 seeds)"
    plots.plot_demo(results, tmp_path / "e.png", "demo")
    fig = seen[-1]
    assert fig._suptitle.get_text() == "demo  (one run per method, seed 0)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 2 and labels[0].startswith("unregularised: final ") and "max" in labels[0]
    assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy (%)", "flipped training labels\npredicted as given (%)",
                                                    "tr K / N of a fixed probe batch"]
