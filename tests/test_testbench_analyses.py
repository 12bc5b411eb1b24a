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
