"""The mgs-torch console script on tiny grids: testbench (tuning, resume, figures, report), demo, report."""

from __future__ import annotations

import json

import pytest
import torch

from mgs_bench.cli import build_parser, main


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()  # main() sets torch's thread count (default 1)
    yield
    torch.set_num_threads(old)


TINY = ["--epochs", "2", "--eval-points", "2", "--probe-size", "4", "--quiet"]


def test_testbench_tiny_grid_tunes_runs_resumes_and_plots(tmp_path, capsys):
    out = tmp_path / "tb"
    args = ["testbench", "--dataset", "digits", "--model", "fcn", "--hidden", "16", "16", "--noise", "0", "0.5",
            "--sizes", "30", "40", "--methods", "unreg", "mgs_trace", "--seeds", "0", "1", "--out", str(out),
            "--tune", "--grid", "mgs_trace=0.001,0.01", "--report", *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    runs = sorted((out / "runs").rglob("*.json"))
    assert len(runs) == 2 * 2 * 2 * 2  # noise × size × method × seed
    tuned = json.loads((out / "tuned_digits_fcn.json").read_text())
    assert tuned["scenario"]["noise"] == 0.5 and tuned["scenario"]["train_size"] == 40 and set(tuned["scores"]["mgs_trace"]) == {"0.001", "0.01"}
    chosen = tuned["chosen"]["mgs_trace"]
    assert all(json.loads(p.read_text())["config"]["value"] == chosen for p in runs if "mgs_trace" in p.name)
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"digits_fcn_n30_curves.png", "digits_fcn_n40_curves.png", "digits_fcn_heatmap.png"} <= figs
    assert "| method | 0% noise | 50% noise |" in text and "rank of MGS tr K" in text
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))

    stamps = {p: p.stat().st_mtime_ns for p in runs}
    assert main(args[:-len(TINY)] + TINY + ["--dry-run"]) == 0
    assert "16 runs, 16 finished" in capsys.readouterr().out
    assert main(args) == 0  # resumed: nothing recomputed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.filterwarnings("ignore:MGS kernel not positive definite:RuntimeWarning")  # tiny 8-8 net: K near-singular
def test_demo_writes_curves_memorisation_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-size", "40", "--hidden", "8", "8", *TINY]) == 0  # digits, 4 methods
    text = capsys.readouterr().out
    assert (out / "figures" / "digits_fcn_demo.png").stat().st_size > 1000
    assert not (out / "figures" / "digits_fcn_boundaries.png").exists()  # 64-dimensional inputs: no boundaries
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 4
    assert "demo finished" in text and "MGS tr K" in text and "Memorised" in text and "What it does not do" in text
    runs = [json.loads(p.read_text()) for p in (out / "runs").rglob("*.json")]
    assert {r["config"]["dataset"] for r in runs} == {"digits"} and {r["config"]["train_size"] for r in runs} == {40}
    assert {r["config"]["method"]: r["config"]["value"] for r in runs} == {
        "unreg": None, "weight_decay": 0.003, "gradnorm_inputs": 0.1, "mgs_trace": 0.003}  # the digits-FCN tuning's values
    record = tmp_path / "tuned.json"
    record.write_text(json.dumps({"chosen": {"mgs_trace": 0.02}}))
    assert main(["demo", "--out", str(tmp_path / "d2"), "--methods", "mgs_trace", "--train-size", "40", "--hidden", "8",
                 "--tuned", str(record), "--no-plots", "--no-tensorboard", *TINY]) == 0
    (run,) = (tmp_path / "d2" / "runs").rglob("*.json")
    assert json.loads(run.read_text())["config"]["value"] == 0.02


@pytest.mark.filterwarnings("ignore:MGS kernel not positive definite:RuntimeWarning")
def test_demo_on_circles_draws_decision_boundaries(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "circles", "--out", str(out), "--methods", "unreg", "mgs_trace", "mgs_logdet",
                 "--train-size", "40", "--hidden", "8", "8", "--no-tensorboard", *TINY]) == 0
    assert (out / "figures" / "circles_fcn_boundaries.png").stat().st_size > 1000
    assert (out / "figures" / "circles_fcn_demo.png").stat().st_size > 1000
    assert "MGS log det K" in capsys.readouterr().out


def _fake_run(method, final, best, memorised, seconds=1.0):
    from mgs_bench.methods import make_method

    m = make_method(method, None if method == "unreg" else 0.01)
    return {"config": {"method": method, "seed": 0}, "method": {"name": method, "label": m.label, "hyper": m.hyper, "value": m.value},
            "summary": {"final": final, "best": best, "higher_is_better": True}, "history": [{"memorised": memorised}],
            "seconds": seconds}


def test_demo_reading_follows_the_numbers():
    from mgs_bench.cli import _demo_reading

    ahead = _demo_reading([_fake_run("unreg", 0.72, 0.86, 0.4), _fake_run("mgs_trace", 0.88, 0.90, 0.07, 7.0),
                           _fake_run("gradnorm_inputs", 0.84, 0.92, 0.04)])
    assert "keeps 16.0 points more" in ahead[1]
    assert "its max (90.0 %) is below the best max of the others (92.0 %, ‖∇xL‖² penalty); it keeps accuracy" in ahead[2]
    assert "ahead of it (88.0 % vs 84.0 %)" in ahead[-1] and "MGS tr K 7 s" in ahead[3]
    level = _demo_reading([_fake_run("unreg", 0.90, 0.92, 0.1), _fake_run("mgs_trace", 0.905, 0.91, 0.05)])
    assert "does not beat the unregularised net" in level[1]
    assert "its max (91.0 %) is about the best max of the others (92.0 %, unregularised)." in level[2]
    higher = _demo_reading([_fake_run("unreg", 0.70, 0.80, 0.4), _fake_run("mgs_trace", 0.88, 0.90, 0.05)])
    assert "Its max is 10.0 points above the best max of the others (80.0 %, unregularised)." == higher[2]
    tied = _demo_reading([_fake_run("unreg", 0.1, 0.1, 0.1), _fake_run("weight_decay", 0.1, 0.1, 0.1), _fake_run("mgs_trace", 0.1, 0.1, 0.1)])
    assert "best max of the others (10.0 %, unregularised)" in tied[2]  # equal maxima: no comparison of runs
    assert _demo_reading([_fake_run("mgs_trace", 0.9, 0.9, 0.0)]) == []  # nothing to compare with


def test_report_command_and_template(tmp_path, capsys):
    out = tmp_path / "tb"
    assert main(["testbench", "--dataset", "circles", "--model", "fcn", "--hidden", "8", "--noise", "0.2", "--sizes", "30",
                 "--methods", "unreg", "weight_decay", "--seeds", "0", "--out", str(out), "--no-tensorboard", "--no-plots", *TINY]) == 0
    capsys.readouterr()
    assert main(["report", "--out", str(out)]) == 0
    assert "## circles / fcn / 30 training samples / 2 epochs" in capsys.readouterr().out
    tpl = tmp_path / "t.md"
    tpl.write_text("# R\n{{table dataset=circles model=fcn}}\n")
    assert main(["report", "--out", str(out), "--template", str(tpl), "--output", str(tmp_path / "r.md")]) == 0
    body = (tmp_path / "r.md").read_text()
    assert body.startswith("# R\n| method | 20% noise |") and "weight decay (weight_decay=0.001)" in body
    from mgs_bench.report import render_template  # out=DIR reads another folder than the report's

    assert render_template(f"{{{{table out={out} dataset=circles}}}}", tmp_path / "elsewhere") == body[len("# R\n"):].rstrip("\n")
    assert main(["testbench", "--dataset", "circles", "--model", "fcn", "--hidden", "8", "--noise", "0.2", "--sizes", "30",
                 "--methods", "unreg", "--seeds", "1", "--out", str(out), "--no-tensorboard", "--no-plots", *TINY]) == 0
    partial = render_template("{{table dataset=circles}}", out)  # two seeds in the table, one in the weight-decay cell
    assert "[1 of 2 seeds]" in partial.split("weight decay")[1].split("\n")[0] and "[1 of" not in partial.split("weight decay")[0]


def test_errors_name_the_allowed_values(capsys):
    assert main(["testbench", "--methods", "ridge", "--out", "unused", "--dry-run"]) == 2
    assert "mgs_trace" in capsys.readouterr().err
    assert main(["testbench", "--set", "dropout=2", "--dry-run", "--out", "unused"]) == 2
    assert "dropout probability" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["testbench", "--dataset", "cifar"])
    assert "digits" in capsys.readouterr().err


def test_report_on_a_missing_or_empty_folder_fails_with_a_clear_message(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "missing_dir")]) == 2
    err = capsys.readouterr().err
    assert "missing_dir" in err and "does not exist" in err and "--out" in err
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_version(capsys):
    import mgs_torch

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mgs-torch {mgs_torch.__version__}"


def test_tensorboard_run_names_start_with_the_method(tmp_path):
    from mgs_bench.runner import RunConfig

    config = RunConfig(dataset="circles", model="fcn", method="mgs_trace", value=3e-4, noise=0.3, train_size=200)
    assert config.display_name.startswith("mgs_trace0.0003_noise0.3_n200_seed0_")
    assert config.display_name.endswith(config.run_id[-8:])


def test_dry_run_estimates_the_time_left_from_finished_runs(tmp_path, capsys):
    done, new = tmp_path / "done", tmp_path / "new"
    grid = ["testbench", "--dataset", "circles", "--model", "fcn", "--hidden", "8", "--noise", "0.3", "--sizes", "30",
            "--methods", "unreg", "mgs_trace", "--seeds", "0", "--no-tensorboard", "--no-plots", *TINY]
    assert main(grid + ["--out", str(done)]) == 0
    capsys.readouterr()
    assert main(grid + ["--out", str(done), "--dry-run"]) == 0
    assert "2 runs, 2 finished\n" in capsys.readouterr().out  # nothing left: no estimate
    assert main(grid + ["--out", str(new), "--dry-run", "--seeds", "0", "1"]) == 0
    assert "no finished run of these methods" in capsys.readouterr().out
    assert main(grid + ["--out", str(new), "--dry-run", "--estimate-from", str(done), "--tune", "--grid", "mgs_trace=0.1,1"]) == 0
    text = capsys.readouterr().out
    assert "tuning: 2 runs, 0 finished; about" in text and "2 runs, 0 finished; about" in text and "registry defaults" not in text
    assert not new.exists()  # a dry run writes nothing
