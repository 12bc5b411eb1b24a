"""The testbench analyses behind examples/RESULTS.md's early-stopping and flagging tables (issue 11, items 2, 3)."""

from __future__ import annotations

import json

import pytest
import torch

from mgs_bench.cli import main
from mgs_bench.flagging import SCORES, auroc, flagging_run, flagging_table
from mgs_bench.runner import RunConfig, train_run

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = RunConfig(dataset="circles", model="fcn", hidden=(8, 8), train_size=40, epochs=4, eval_points=3, probe_size=8, noise=0.3)


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_auroc():
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])) != auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))  # nan


def test_the_evaluate_hook_does_not_change_the_run():
    plain = train_run(TINY)
    seen = []
    hooked = train_run(TINY, evaluate_hook=lambda epoch, model, data: seen.append(model.training) or {"x": torch.rand(1).item()})
    assert [h["test_acc"] for h in plain["history"]] == [h["test_acc"] for h in hooked["history"]]
    assert [e["epoch"] for e in hooked["extras"]] == [0, 2, 4] and seen == [False] * 3  # eval mode


def test_flagging_run_is_resumable_and_tabulated(tmp_path):
    record = flagging_run(TINY, tmp_path)
    assert [row["epoch"] for row in record["auroc"]] == [0, 2, 4]
    assert set(record["auroc"][0]) == {"epoch", *SCORES}
    assert all(0.0 <= v <= 1.0 for row in record["auroc"] for k, v in row.items() if k != "epoch")
    (path,) = (tmp_path / "flagging").rglob("*.json")
    assert json.loads(path.read_text())["run_id"] == TINY.run_id
    assert flagging_run(TINY, tmp_path) == json.loads(path.read_text())  # loaded, not re-run
    table = flagging_table([record])
    assert "30% flipped labels" in table and "| agreement_loss_same_label |" in table and "epoch 4" in table


def test_cli_scores_and_stopping(tmp_path, capsys):
    tiny = ["--epochs", "4", "--probe-size", "8", "--quiet", "--hidden", "8", "8"]
    assert main(["scores", "--dataset", "circles", "--model", "fcn", "--noise", "0.3", "--sizes", "40", "--seeds", "0",
                 "--eval-points", "3", "--out", str(tmp_path), *tiny]) == 0
    assert "| loss |" in capsys.readouterr().out
    assert main(["testbench", "--dataset", "circles", "--model", "fcn", "--noise", "0", "0.3", "--sizes", "40",
                 "--methods", "unreg", "--seeds", "0", "1", "--eval-points", "5", "--out", str(tmp_path),
                 "--no-plots", "--no-tensorboard", *tiny]) == 0
    capsys.readouterr()
    assert main(["stopping", "--out", str(tmp_path), "--threshold", "0.02", "0.1", "--val-patience", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("| circles / fcn / unreg (n=40) |") == 4  # 2 noise levels x 2 thresholds
    assert main(["stopping", "--out", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- choosing α (issue 23): the penalty's size at initialisation, α sweeps -----------------------------


def test_init_scale_matches_the_penalty_and_loss_by_hand():
    """tr K/N at initialisation is the trace penalty mgs_penalty(reduction="mean") of the same mini-batch."""
    from mgs_torch import mgs_kernel

    from mgs_bench.alpha import init_scale
    from mgs_bench.data import load_dataset
    from mgs_bench.models import build_model

    config = TINY.with_(batch_size=8)
    rec = init_scale(config, seeds=[0], batches=1)
    data = load_dataset("circles", train_size=40, noise=0.3, seed=0)
    torch.manual_seed(0)
    model = build_model("fcn", data.input_shape, data.num_outputs, hidden=(8, 8))
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(31_337))[:8]
    K = mgs_kernel(model, data.x_train[idx], dtype=torch.float64)
    assert rec["trace_per_row"] == pytest.approx(float(K.trace()) / K.shape[0], rel=1e-4)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]))
    assert rec["loss"] == pytest.approx(loss, rel=1e-5)
    assert rec["alpha_value"] == pytest.approx(loss / rec["trace_per_row"]) and rec["init"] == "xavier"
    assert rec["alpha_grad"] > 0 and rec["classification"]


def test_cli_alpha_writes_a_record_and_the_template_renders_it(tmp_path, capsys):
    from mgs_bench import report

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"scenario": {"noise": 0.5, "train_size": 40}, "chosen": {"mgs_trace": 0.01},
                                 "scores": {"mgs_trace": {"0.01": 0.8}}}))
    assert main(["alpha", "--dataset", "circles", "--model", "fcn", "--hidden", "8", "--size", "40", "--seeds", "0", "1",
                 "--batches", "2", "--tuned", str(tuned), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    rec = json.loads((tmp_path / "init" / "circles_fcn_xavier.json").read_text())
    assert rec["tuned"]["alpha"] == 0.01 and rec["seeds"] == [0, 1] and rec["batches"] == 2
    assert "| circles / fcn / xavier |" in text and "0.01 (50%)" in text
    ratio = f"{0.01 / rec['alpha_value']:.3g}"
    assert ratio in report.render_template(f"{{{{alpha_init out={tmp_path}}}}}", tmp_path)


def test_alpha_sweep_table_marks_the_best_validation_alpha(tmp_path):
    from mgs_bench import report
    from mgs_bench.alpha import sweep_table
    from mgs_bench.runner import load_results, run_grid

    base = TINY.with_(method="mgs_trace", epochs=2)
    run_grid([base.with_(value=a, noise=nz) for a in (0.001, 0.1) for nz in (0.3, 0.6)], tmp_path, progress=False)
    results = load_results(tmp_path)
    table = sweep_table(results)
    assert "| α | 30%: val (test) | train loss | tr K/N | 60%: val (test) | train loss | tr K/N |" in table
    assert "H(30%) = 0.61" in table and table.count(" † |") == 2 and "of 2 columns with more than one α" in table
    for nz in (0.3, 0.6):
        runs = {r["config"]["value"]: r for r in results if r["config"]["noise"] == nz}
        best = max(runs, key=lambda a: runs[a]["summary"]["final_val"])
        cell = f"{100 * runs[best]['summary']['final_val']:.1f} ({100 * runs[best]['summary']['final']:.1f})"
        assert f"**{cell}**" in table
    assert report.render_template(f"{{{{alpha_sweep out={tmp_path} noise=0.3}}}}", tmp_path).count("| 0.1 |") == 1
    assert "_no runs found_" in sweep_table([])


def test_noise_entropy_and_the_rule_pick():
    import math

    from mgs_bench.alpha import noise_entropy, rule_pick

    assert noise_entropy(0.0, 10) == 0.0
    p = 0.5  # the cross-entropy of predicting the true class with 1 - p and each other class with p / 9
    assert noise_entropy(p, 10) == pytest.approx(-(0.5 * math.log(0.5) + 9 * (0.5 / 9) * math.log(0.5 / 9)))
    assert noise_entropy(0.9, 10) == pytest.approx(math.log(10))  # p = (q-1)/q: the labels carry no signal
    with pytest.raises(ValueError):
        noise_entropy(1.0, 10)
    losses = {0.001: 0.4, 0.003: 1.1, 0.01: 1.7, 0.03: 2.1}
    assert rule_pick(losses, 1.79) == 0.01  # the largest α that still fits down to H(p)
    assert rule_pick(losses, 0.2) == 0.001 and rule_pick({}, 1.0) is None  # none fits: the smallest
