"""Both Lightning pieces under Trainer(accelerator="cpu", devices=2, strategy="ddp") with gloo.

Lightning's DDP launcher re-runs the running script per rank, which misbehaves inside pytest, so
the training runs in tests/lightning_ddp_script.py in a subprocess and this test checks its output.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_helpers import PlainNet
from mgs_torch import mgs_penalty

pytest.importorskip("pytorch_lightning")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "lightning_ddp_script.py"), str(out)],
        env=env, cwd=str(out), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"DDP script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return ranks, rows


def test_ranks_end_with_the_same_weights(ddp_run):
    ranks, _ = ddp_run
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key


def test_each_rank_penalises_its_own_batch(ddp_run):
    ranks, _ = ddp_run
    x0, x1 = ranks[0]["batches"][0][0], ranks[1]["batches"][0][0]
    assert not torch.equal(x0, x1)  # DistributedSampler: different local batches
    for r in ranks:
        net = PlainNet()
        net.net.load_state_dict(r["start"])
        expected = mgs_penalty(net, r["batches"][0][0])
        torch.testing.assert_close(r["first_penalty"], expected.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ranks[0]["first_penalty"], ranks[1]["first_penalty"])


def test_ddp_training_equals_averaging_the_per_rank_regularised_gradients(ddp_run):
    ranks, _ = ddp_run
    model = PlainNet()
    model.net.load_state_dict(ranks[0]["start"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        losses = [F.cross_entropy(model(x), y) + 0.5 * mgs_penalty(model, x) for x, y in (b0, b1)]
        opt.zero_grad()
        (sum(losses) / 2).backward()  # DDP averages the ranks' gradients
        opt.step()
    for key, value in model.net.state_dict().items():
        torch.testing.assert_close(value, ranks[0]["weights"][key], rtol=1e-5, atol=1e-6)


def test_metrics_are_computed_once_logged_once_and_known_to_every_rank(ddp_run):
    ranks, rows = ddp_run
    assert ranks[0]["computations"] == 10 and ranks[1]["computations"] == 0  # 8 steps + 2 epoch ends, rank 0 only
    assert ranks[1]["history"] == ranks[0]["history"]  # broadcast: every rank has rank 0's values
    steps = [h["step"] for h in ranks[0]["history"] if h["stage"] == "step"]
    assert steps == list(range(8))
    assert torch.equal(ranks[0]["probe"][0], ranks[1]["probe"][0])  # same probe everywhere, drawn from the data set
    logged = [(int(row["step"]), float(row["mgs/trace"])) for row in rows if row.get("mgs/trace")]
    assert [s for s, _ in logged] == steps
    assert all(math.isfinite(v) for _, v in logged)
    assert [v for _, v in logged] == pytest.approx([h["mgs/trace"] for h in ranks[0]["history"] if h["stage"] == "step"])
    assert [int(row["epoch"]) for row in rows if row.get("mgs/trace")] == [0] * 4 + [1] * 4
    penalties = [row for row in rows if row.get("train/mgs_penalty")]
    assert len(penalties) == 8  # rank 0's value, once per step


def test_a_budgeted_monitor_follows_rank_zeros_decision_on_every_rank(ddp_run):
    """max_overhead: rank 0 decides from its own clock and broadcasts; a rank deciding alone would hang the fit."""
    ranks, _ = ddp_run
    zero, one = ranks[0]["budgeted"], ranks[1]["budgeted"]
    assert one["history"] == zero["history"] and one["skipped"] == zero["skipped"]
    steps = [h["step"] for h in zero["history"]]
    assert steps[0] == 0 and len(steps) + zero["skipped"] == 8
    # 1 % of 8 steps is far less than a second kernel: rank 0 skips (a rank deciding alone, without the budget, would not)
    assert zero["skipped"] >= 1
    assert zero["computations"] == len(steps) and one["computations"] == 0


def test_early_stopping_and_checkpoint_on_an_mgs_key_agree_on_every_rank(ddp_run):
    ranks, _ = ddp_run
    per_row = [h["mgs/trace_per_row_epoch"] for h in ranks[0]["history"] if h["stage"] == "epoch"]
    assert ranks[0]["mgs_stop_values"] == pytest.approx(per_row, rel=1e-6) == ranks[1]["mgs_stop_values"]
    epoch_values = [h["mgs/trace_epoch"] for h in ranks[0]["history"] if h["stage"] == "epoch"]
    assert len(epoch_values) == 2 and all(math.isfinite(v) for v in epoch_values)
    for r in ranks:
        assert r["stopped_epoch"] == 1 and r["current_epoch"] == 2  # both ranks stopped together after epoch 1
        assert [s["mgs/trace_epoch"] for s in r["seen"]] == pytest.approx(epoch_values)
        assert r["best_model_score"] == pytest.approx(min(epoch_values))
    assert ranks[0]["best_model_path"] == ranks[1]["best_model_path"] != ""
