"""MGS in PyTorch Lightning: a regularised digit classifier whose MGS curves go to TensorBoard.

    python examples/lightning_quickstart.py
    tensorboard --logdir lightning_logs

22 training steps per epoch: the Trainer logs every 10 steps (``log_every_n_steps=10``; Lightning's
default of 50 would log no step at all here), so ``train/mgs_penalty`` and ``mgs/trace`` have step curves.

Data: scikit-learn's built-in 8×8 digits (nothing is downloaded).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mgs_torch.lightning import MGSMonitor, MGSRegularizedMixin


class DigitNet(MGSRegularizedMixin, pl.LightningModule):
    """A small MLP; the mixin adds α·tr K / N to the loss training_step returns."""

    def __init__(self, lr: float = 0.05, **mgs):
        super().__init__(**mgs)  # mgs_alpha, mgs_kind, ... (saved in hparams)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)  # raw logits: the MGS kernel is taken on these

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss  # the penalty is added for you

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = order[:1400], order[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def main(epochs: int = 3, alpha: float = 1e-3) -> None:
    pl.seed_everything(0)
    train, val = digits()
    model = DigitNet(mgs_alpha=alpha, mgs_kind="trace", mgs_warmup_steps=10)  # no penalty for the first 10 steps
    monitor = MGSMonitor(
        probe="val",          # a fixed probe batch, so curves compare across epochs and runs
        max_samples=32,       # K is (32·10)×(32·10)
        log_on_epoch_end=True,
        log_spectrum=True,    # eigenvalue histograms in TensorBoard
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger("lightning_logs", name="mgs_quickstart"),
        callbacks=[monitor],
        log_every_n_steps=10,  # per-step values (MGSMonitor's and the mixin's) at steps 9, 19, ...: an epoch is 22 steps
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=128))
    last = monitor.last_metrics
    print(f"val/acc = {float(trainer.callback_metrics['val/acc']):.3f}; MGS on the probe at the end: "
          f"tr K = {last['mgs/trace_epoch']:.4g}, log det K = {last['mgs/logdet_epoch']:.4g}, "
          f"rank = {last['mgs/rank_epoch']:.0f} of {32 * 10}")
    print(f"logs in {trainer.logger.log_dir}; view them with: tensorboard --logdir lightning_logs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1e-3, help="weight of the MGS penalty (0: off)")
    args = parser.parse_args()
    main(args.epochs, args.alpha)
