"""Train a tiny model with TensorBoardLogger and read the event file back with EventAccumulator."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import reference_kernel
from lightning_helpers import RegNet, fit, loader, pl, reference_logdet
from mgs_torch.lightning import MGSMonitor

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


class Snapshot(pl.Callback):
    def __init__(self):
        self.nets = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.nets.setdefault(trainer.global_step, copy.deepcopy(pl_module.net))


def test_mgs_curves_in_the_tensorboard_event_file(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    monitor = MGSMonitor(probe="val", max_samples=6, log_every_n_steps=2, log_on_epoch_end=True,
                         log_spectrum=True, log_kernel_image=True)
    # only the last layer (21 parameters) for 8·3 = 24 rows: a kernel that is singular by construction
    singular = MGSMonitor(probe="val", max_samples=8, params=["net.2"], prefix="mgs_head/",
                          metrics=("trace", "logdet", "rank"), log_every_n_steps=2)
    snap = Snapshot()
    model = RegNet(mgs_alpha=0.05)
    fit(model, tmp_path, loader(32, 8, shuffle=True), val=loader(16, 8, seed=2), logger=logger,
        callbacks=[monitor, singular, snap], max_epochs=3, log_every_n_steps=2)

    ea = event_accumulator.EventAccumulator(
        logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0}
    ).Reload()
    tags = ea.Tags()
    assert {"mgs/trace", "mgs/logdet", "mgs/trace_per_row", "mgs/logdet_per_row", "mgs/rank"} <= set(tags["scalars"])
    assert {"mgs/trace_epoch", "mgs/logdet_epoch", "train/mgs_penalty", "train/data_loss", "train/loss"} <= set(tags["scalars"])

    # 3 epochs of 4 steps; every second step, at the steps Lightning logs its own training loss at
    steps = [e.step for e in ea.Scalars("mgs/trace")]
    assert steps == [1, 3, 5, 7, 9, 11]
    assert steps == [e.step for e in ea.Scalars("train/loss")]
    assert [e.step for e in ea.Scalars("mgs/logdet_epoch")] == [4, 8, 12]

    x = monitor.probe_inputs[0].double()
    for trace, logdet in zip(ea.Scalars("mgs/trace"), ea.Scalars("mgs/logdet")):
        K = reference_kernel(copy.deepcopy(snap.nets[trace.step]).double(), x)
        assert torch.linalg.matrix_rank(K) == K.shape[0]  # non-singular ...
        assert math.isfinite(logdet.value)  # ... so a finite log-determinant
        assert trace.value == pytest.approx(float(K.trace()), rel=1e-6)  # event files store float32
        assert logdet.value == pytest.approx(reference_logdet(K), rel=1e-5)

    # the singular kernel is reported honestly, and training went on
    head = ea.Scalars("mgs_head/logdet")
    assert [e.step for e in head] == steps and all(e.value == -math.inf for e in head)
    assert {e.value for e in ea.Scalars("mgs_head/rank")} == {21.0}

    # spectrum histograms and kernel images, at the same steps
    assert [e.step for e in ea.Histograms("mgs/eigenvalues")] == steps
    assert [e.step for e in ea.Histograms("mgs/log10_eigenvalues")] == steps
    assert "mgs/eigenvalues_epoch" in tags["histograms"]
    images = ea.Images("mgs/kernel")
    assert [e.step for e in images] == steps
    assert (images[0].width, images[0].height) == (18, 18)  # N = 6 samples · 3 outputs
