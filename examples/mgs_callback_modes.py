"""What EarlyStopping and ModelCheckpoint do when they watch an MGS value, measured.

    python examples/mgs_callback_modes.py --epochs 20

The quickstart's digit classifier (examples/lightning_quickstart.py: scikit-learn's 8×8 digits, the
MGS trace penalty at the default α = 1e-3) is trained once with ``MGSMonitor`` logging tr K of a fixed
probe batch at every epoch end and ``ModelCheckpoint``s on ``mgs/trace_epoch`` (mode "min" and "max")
and on ``val/loss``; then once each with ``EarlyStopping(monitor="mgs/trace_epoch", mode="min")``, with
``mode="max"`` and with ``MGSEarlyStopping``. Seeded: every run follows the same trajectory until it
stops, so the epochs can be compared. Prints Markdown tables (``docs/lightning.md`` quotes them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_quickstart import DigitNet, digits  # noqa: E402

from mgs_torch.lightning import MGSEarlyStopping, MGSMonitor  # noqa: E402

KEY = "mgs/trace_epoch"


class EpochTable(pl.Callback):
    """tr K of the probe, val/loss and val/acc at the end of every epoch."""

    def __init__(self):
        self.rows: dict[int, dict[str, float]] = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            row = self.rows.setdefault(trainer.current_epoch, {})
            row.update({k: float(trainer.callback_metrics[k]) for k in ("val/loss", "val/acc")})

    def on_train_epoch_end(self, trainer, pl_module):
        if KEY in trainer.callback_metrics:
            self.rows.setdefault(trainer.current_epoch, {})[KEY] = float(trainer.callback_metrics[KEY])


def fit(epochs: int, root: Path, *callbacks: pl.Callback) -> tuple[pl.Trainer, EpochTable]:
    pl.seed_everything(0, verbose=False)
    train, val = digits()
    table = EpochTable()
    monitor = MGSMonitor(probe="train", max_samples=32, log_every_n_steps=0, log_on_epoch_end=True, model_mode="eval")
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=pl.loggers.CSVLogger(root), callbacks=[monitor, table, *callbacks],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitNet(mgs_alpha=1e-3), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=128))
    return trainer, table


def checkpoint_epoch(callback: pl.callbacks.ModelCheckpoint) -> int:
    return int(Path(callback.best_model_path).stem.split("epoch=")[1].split("-")[0])


def main(epochs: int = 20, patience: int = 3) -> dict:
    """Run the comparison; return what it printed as numbers (for the test)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoints = {
            f"ModelCheckpoint(monitor='{KEY}', mode='min')": pl.callbacks.ModelCheckpoint(root / "min", monitor=KEY, mode="min"),
            f"ModelCheckpoint(monitor='{KEY}', mode='max')": pl.callbacks.ModelCheckpoint(root / "max", monitor=KEY, mode="max"),
            "ModelCheckpoint(monitor='val/loss', mode='min')": pl.callbacks.ModelCheckpoint(root / "val", monitor="val/loss", mode="min"),
        }
        _, table = fit(epochs, root / "full", *checkpoints.values())
        kept = {name: checkpoint_epoch(c) for name, c in checkpoints.items()}
        stoppers = {
            f"EarlyStopping(monitor='{KEY}', mode='min', patience={patience})": pl.callbacks.EarlyStopping(KEY, mode="min", patience=patience),
            f"EarlyStopping(monitor='{KEY}', mode='max', patience={patience})": pl.callbacks.EarlyStopping(KEY, mode="max", patience=patience),
            "MGSEarlyStopping() (defaults)": MGSEarlyStopping(),
        }
        stopped = {}
        for i, (name, stopper) in enumerate(stoppers.items()):
            fit(epochs, root / f"stop{i}", stopper)
            stopped[name] = stopper.stopped_epoch or None  # 0: it never stopped

    print(f"| epoch | tr K (probe, {KEY}) | val/loss | val/acc |\n|---:|---:|---:|---:|")
    for epoch, row in sorted(table.rows.items()):
        print(f"| {epoch} | {row[KEY]:.4g} | {row['val/loss']:.3f} | {row['val/acc']:.3f} |")
    print("\n| callback | epoch it stops after / keeps | val/acc there |\n|---|---:|---:|")
    for name, epoch in {**stopped, **kept}.items():
        where = epoch if epoch is not None else epochs - 1
        label = f"{epoch}" if epoch is not None else f"never (ran all {epochs})"
        print(f"| `{name}` | {label} | {table.rows[where]['val/acc']:.3f} |")
    return {"rows": table.rows, "stopped": stopped, "kept": kept}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()
    main(args.epochs, args.patience)
