"""Run by tests/test_lightning_ddp.py as ``python lightning_ddp_script.py OUT_DIR``.

Lightning's ``strategy="ddp"`` re-launches this script once per extra rank (gloo on the CPU), which
is why it is a standalone script and not a test. Every rank writes ``OUT_DIR/rank{r}.pt`` with its
final weights, the batches it trained on, its first penalty, and what MGSMonitor computed on it;
rank 0's CSVLogger writes the logged metrics under ``OUT_DIR/csv/version_0``.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning_helpers import RegNet, loader, pl  # noqa: E402

from mgs_torch.lightning import MGSEarlyStopping, MGSMonitor  # noqa: E402
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402


class Record(pl.Callback):
    """Per rank: the initial weights, every local batch, and the penalty of the first one."""

    def __init__(self):
        self.batches: list[list[torch.Tensor]] = []
        self.start: dict | None = None
        self.first_penalty: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = copy.deepcopy(pl_module.net.state_dict())
        self.batches.append([t.clone() for t in batch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first_penalty is None:
            self.first_penalty = pl_module.mgs_last_penalty.clone()


class SeenByEarlyStopping(pl.Callback):
    """What the monitoring callbacks find in trainer.callback_metrics at each epoch end, on this rank."""

    def __init__(self):
        self.seen: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mgs/")})


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = RegNet(mgs_alpha=0.5, seed=0)
    monitor = MGSMonitor(probe="train", max_samples=8, log_every_n_steps=1, log_on_epoch_end=True)
    # a budget rank 0 alone can judge (its clock, its kernels): every rank must follow its decision, or the values'
    # broadcast would wait forever; 1 % of the fit: after the first step's kernel every scheduled step is skipped
    budgeted = MGSMonitor(prefix="budget/", max_samples=4, log_every_n_steps=1, max_overhead=0.01)
    record = Record()
    seen = SeenByEarlyStopping()
    # min_delta far beyond any change: epoch 0 sets the best value, epoch 1 does not improve it -> stop after epoch 1,
    # on every rank (strict=True: a rank without the metric would raise)
    stop = EarlyStopping(monitor="mgs/trace_epoch", mode="min", patience=1, min_delta=1e9, strict=True)
    # never fires (no growth is below -1e9): records what MGSEarlyStopping sees on each rank
    mgs_stop = MGSEarlyStopping(threshold=-1e9, patience=1, window=1)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="mgs/trace_epoch", mode="min", save_top_k=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=4,
        logger=pl.loggers.CSVLogger(out, name="csv", version=0), callbacks=[stop, monitor, budgeted, record, seen, mgs_stop, ckpt],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(model, loader(32, 4))
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "weights": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
            "start": record.start,
            "batches": record.batches,
            "first_penalty": record.first_penalty,
            "history": monitor.history,
            "probe": monitor.probe_inputs,
            "computations": monitor.computations,
            "budgeted": {"history": budgeted.history, "skipped": budgeted.skipped_steps, "computations": budgeted.computations},
            "seen": seen.seen,
            "stopped_epoch": stop.stopped_epoch,
            "mgs_stop_values": list(mgs_stop.rule.values),
            "current_epoch": trainer.current_epoch,
            "best_model_score": float(ckpt.best_model_score),
            "best_model_path": ckpt.best_model_path,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )
    # Tear the gloo process group down explicitly: left to interpreter shutdown, its C++ threads can
    # still be running when their std::thread objects are destroyed, and the process aborts with
    # "terminate called without an active exception" (seen in about 1 of 10 full test runs).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
