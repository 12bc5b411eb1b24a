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


def test_metrics_are_computed_and_logged_once(ddp_run):
    ranks, rows = ddp_run
    assert ranks[1]["history"] == []  # only global rank 0 computes
    assert [h["step"] for h in ranks[0]["history"]] == [0, 1, 2, 3]
    assert torch.equal(ranks[0]["probe"][0], ranks[1]["probe"][0])  # same probe everywhere, drawn from the data set
    logged = [(int(row["step"]), float(row["mgs/trace"])) for row in rows if row.get("mgs/trace")]
    assert [s for s, _ in logged] == [0, 1, 2, 3]
    assert all(math.isfinite(v) for _, v in logged)
    assert [v for _, v in logged] == pytest.approx([h["mgs/trace"] for h in ranks[0]["history"]])
    penalties = [row for row in rows if row.get("train/mgs_penalty")]
    assert len(penalties) == 4  # rank 0's value, once per step
