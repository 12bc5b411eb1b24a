"""MGSMonitor's values are callback metrics: EarlyStopping / ModelCheckpoint can monitor them, the
progress bar can show them, and CSV rows carry the epoch like Lightning's own (issue 11, items 1 and 4)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lightning_helpers import PlainNet, fit, loader, pl
from mgs_torch.lightning import MGSConfigurationError, MGSMonitor

from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402


class Growing(pl.Callback):
    """Record trainer.callback_metrics["mgs/trace_epoch"] as EarlyStopping sees it."""

    def __init__(self):
        self.seen: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(float(trainer.callback_metrics["mgs/trace_epoch"]))


def test_early_stopping_and_checkpoint_on_an_mgs_key(tmp_path):
    monitor = MGSMonitor(probe="train", max_samples=8, log_every_n_steps=2, log_on_epoch_end=True)
    # tr K grows while this net fits random labels: "min" with patience 1 stops after two epochs without a new minimum
    stop = EarlyStopping(monitor="mgs/trace_epoch", mode="min", patience=1, strict=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="mgs/trace_epoch", mode="min", save_top_k=1)
    trainer = fit(PlainNet(lr=0.5), tmp_path, callbacks=[stop, monitor, ckpt], max_epochs=30,
                  enable_checkpointing=True)
    epochs = [h for h in monitor.history if h["stage"] == "epoch"]
    assert trainer.should_stop and trainer.current_epoch < 30  # it stopped on the MGS value
    traces = [h["mgs/trace_epoch"] for h in epochs]
    assert float(stop.best_score) == pytest.approx(min(traces))
    assert float(ckpt.best_model_score) == pytest.approx(min(traces))
    best_epoch = traces.index(min(traces))
    assert f"epoch={best_epoch}-" in ckpt.best_model_path
    assert float(trainer.callback_metrics["mgs/trace_epoch"]) == pytest.approx(traces[-1])
    assert float(trainer.callback_metrics["mgs/trace"]) == pytest.approx(
        [h["mgs/trace"] for h in monitor.history if h["stage"] == "step"][-1]
    )


def test_the_step_value_is_there_for_a_callback_in_the_same_step(tmp_path):
    seen = []

    class Reader(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics.get("mgs/trace", math.nan)))

    monitor = MGSMonitor(log_every_n_steps=1)
    fit(PlainNet(), tmp_path, callbacks=[monitor, Reader()])
    assert seen == pytest.approx([h["mgs/trace"] for h in monitor.history])


def test_progress_bar_shows_the_chosen_keys_only(tmp_path):
    monitor = MGSMonitor(log_every_n_steps=1, log_on_epoch_end=True, prog_bar=["trace", "mgs/logdet_epoch"])
    trainer = fit(PlainNet(), tmp_path, callbacks=[monitor])
    bar = trainer.progress_bar_metrics
    assert {"mgs/trace", "mgs/logdet_epoch"} <= set(bar)
    assert not {"mgs/logdet", "mgs/rank", "mgs/trace_epoch"} & set(bar)
    assert set(MGSMonitor(prog_bar=True).prog_bar_keys) >= {"mgs/trace", "mgs/trace_epoch", "mgs/rank"}
    assert MGSMonitor().prog_bar_keys == frozenset()


@pytest.mark.parametrize("value", ["trace", ["eigenvalue_max"], ["nope"], 3])
def test_prog_bar_rejects_what_is_not_logged(value):
    with pytest.raises(MGSConfigurationError, match="prog_bar"):
        MGSMonitor(prog_bar=value)


def test_csv_rows_carry_the_epoch_and_lightnings_step(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="csv", version=0)
    monitor = MGSMonitor(log_every_n_steps=2, log_on_epoch_end=True)
    fit(PlainNet(), tmp_path, callbacks=[monitor], logger=logger, max_epochs=2, log_every_n_steps=2)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    mgs = [r for r in rows if r.get("mgs/trace")]
    own = [r for r in rows if r.get("train/loss")]
    assert mgs and own
    assert all(r["epoch"] != "" for r in mgs)
    # the same (step, epoch) pairs as Lightning's own training rows
    assert [(r["step"], r["epoch"]) for r in mgs] == [(r["step"], r["epoch"]) for r in own]
    epoch_rows = [r for r in rows if r.get("mgs/trace_epoch")]
    assert [int(r["epoch"]) for r in epoch_rows] == [0, 1]


def test_sample_score_distribution_is_logged(tmp_path):
    monitor = MGSMonitor(probe="train", max_samples=6, log_every_n_steps=2, log_sample_scores=True, prog_bar=["sample_agreement_min"])
    trainer = fit(PlainNet(double=True), tmp_path, loader(16, 8, dtype=torch.float64), callbacks=[monitor])
    records = [m for _, m in trainer.logger.records if "mgs/sample_energy_median" in m]
    assert len(records) == 1
    scores = monitor.last_sample_scores
    assert scores.energy.shape == (6,) and scores.agreement.shape == (6,)
    # the logged summaries are those of the scores (whose formulas test_scores.py checks against a reference)
    assert records[0]["mgs/sample_energy_max"] == pytest.approx(float(scores.energy.max()))
    assert records[0]["mgs/sample_agreement_median"] == pytest.approx(float(scores.agreement.median()))
    assert float(scores.energy.sum()) == pytest.approx(records[0]["mgs/trace"])  # energies add up to tr K
    assert "mgs/sample_agreement_min" in trainer.progress_bar_metrics
    assert "mgs/sample_energy_min" in trainer.callback_metrics


def test_sample_score_histograms_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(PlainNet(), tmp_path, callbacks=[MGSMonitor(log_every_n_steps=2, log_sample_scores=True)], logger=logger)
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0}).Reload()
    assert {"mgs/sample_energy", "mgs/sample_agreement"} <= set(acc.Tags()["histograms"])


def test_minus_infinity_and_nan_reach_the_callback_metrics(tmp_path, monkeypatch):
    # 32 samples x 3 outputs = 96 rows > 51 parameters: K is singular, log det = -inf
    monitor = MGSMonitor(probe="train", max_samples=32, log_every_n_steps=1)
    trainer = fit(PlainNet(), tmp_path, loader(32, 8), callbacks=[monitor])
    assert float(trainer.callback_metrics["mgs/logdet"]) == -math.inf
    assert float(trainer.callback_metrics["mgs/rank"]) < 96
