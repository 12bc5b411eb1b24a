"""examples/lightning_quickstart.py runs and writes the MGS curves under lightning_logs/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning")
pytest.importorskip("sklearn")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_quickstart.py"


@pytest.mark.filterwarnings("ignore:.*treespec.*")
def test_quickstart_runs_and_logs_to_lightning_logs(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("lightning_quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    module.main(epochs=1)
    assert "tensorboard --logdir lightning_logs" in capsys.readouterr().out
    run = tmp_path / "lightning_logs" / "mgs_quickstart" / "version_0"
    ea = event_accumulator.EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert {"mgs/trace", "mgs/logdet", "mgs/trace_epoch", "train/mgs_alpha", "train/data_loss"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("mgs/trace")] == [9, 19]  # 22 steps, logged every 10
    assert [e.value for e in ea.Scalars("train/mgs_alpha")] == [0.0, pytest.approx(1e-3)]  # the 10-step warm-up, then α
    # per-step values reach the logger in the first epoch (Lightning's default interval, 50, would log none)
    (penalty,) = ea.Scalars("train/mgs_penalty")
    assert penalty.step == 19 and penalty.value > 0


@pytest.mark.filterwarnings("ignore")
def test_the_callback_modes_comparison_behaves_as_docs_lightning_md_says(capsys):
    """docs/lightning.md quotes examples/mgs_callback_modes.py: tr K rises in ordinary training, so
    EarlyStopping(mode="min") on it stops after `patience` epochs and ModelCheckpoint(mode="min") keeps
    epoch 0. Checked here against the run's own curve on a short budget."""
    spec = importlib.util.spec_from_file_location("mgs_callback_modes", EXAMPLE.parent / "mgs_callback_modes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(epochs=3, patience=1)
    trace = [result["rows"][e]["mgs/trace_epoch"] for e in range(3)]
    assert trace[0] < trace[1] < trace[2]  # the curve rises
    stopped, kept = result["stopped"], result["kept"]
    assert stopped["EarlyStopping(monitor='mgs/trace_epoch', mode='min', patience=1)"] == 1
    assert kept["ModelCheckpoint(monitor='mgs/trace_epoch', mode='min')"] == 0
    assert kept["ModelCheckpoint(monitor='mgs/trace_epoch', mode='max')"] == 2
    assert stopped["EarlyStopping(monitor='mgs/trace_epoch', mode='max', patience=1)"] is None
    assert "| callback |" in capsys.readouterr().out
