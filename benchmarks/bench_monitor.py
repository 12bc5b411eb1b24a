"""What ``MGSMonitor`` at its defaults costs, as a percentage of a training epoch (issue 22, item 4).

For each model a plain Lightning training run (SGD, cross-entropy, no penalty) is timed with and without
``MGSMonitor()`` at its defaults (K of the current batch every ``log_every_n_steps`` steps, float64, the metrics
``mgs_torch.lightning.callback.DEFAULT_METRICS``), on the same random data; runs alternate (off, on, off, on, …)
and the medians of the epoch times are compared. One thread, no logger I/O (Lightning's DummyLogger).

    python benchmarks/bench_monitor.py                              # lenet5, resnet18, vit; 2 epochs of 64 steps, 3 repeats
    python benchmarks/bench_monitor.py --models lenet5 --steps 200 --log-every 50
    python benchmarks/bench_monitor.py --max-overhead 0.05 --steps 200   # MGSMonitor(max_overhead=0.05)

The monitor's cost is one K per logging step: (steps / log_every_n_steps) × (one K of the batch + its metrics),
so its share falls with a longer interval and rises with the model's per-sample Jacobian cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers.logger import DummyLogger  # noqa: E402

from models import LeNet5, ViT, resnet18  # noqa: E402
from mgs_torch.lightning import MGSMonitor  # noqa: E402

SETTINGS = {  # model, input shape, classes, batch size
    "lenet5": (LeNet5, (1, 28, 28), 10, 32),
    "resnet18": (resnet18, (3, 32, 32), 10, 8),
    "vit": (ViT, (3, 32, 32), 10, 8),
}


class Plain(pl.LightningModule):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.epoch_times: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_epoch_start(self):
        self._t = time.perf_counter()

    def on_train_epoch_end(self):
        self.epoch_times.append(time.perf_counter() - self._t)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def epoch_seconds(name: str, steps: int, epochs: int, log_every: int, monitor: bool, max_samples: int | None = None,
                  max_overhead: float | None = None) -> tuple[list[float], int]:
    make, shape, classes, batch = SETTINGS[name]
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * batch, *shape), torch.randint(0, classes, (steps * batch,)))
    model = Plain(make())
    callbacks = [MGSMonitor(max_samples=max_samples, max_overhead=max_overhead)] if monitor else []
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=DummyLogger(), callbacks=callbacks, log_every_n_steps=log_every,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=False))
        fit_seconds = time.perf_counter() - started
    # the monitor's own account: its kernels' seconds (what max_overhead budgets) over the fit's wall time
    own = sum(record["seconds"] for c in callbacks for record in c.history) / fit_seconds
    return model.epoch_times, sum(len(c.history) for c in callbacks), own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=64, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs with and without the monitor, alternating")
    parser.add_argument("--log-every", type=int, default=50, help="the Trainer's log_every_n_steps (Lightning's default: 50)")
    parser.add_argument("--max-samples", type=int, default=None, help="MGSMonitor(max_samples=...) instead of the default (the whole batch)")
    parser.add_argument("--max-overhead", type=float, default=None, help="MGSMonitor(max_overhead=...): its time budget")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {args.steps} steps per epoch, {args.epochs} epochs, log_every_n_steps={args.log_every}, one thread, torch {torch.__version__}")
    options = [f"{k}={v}" for k, v in (("max_samples", args.max_samples), ("max_overhead", args.max_overhead)) if v]
    monitor = f"MGSMonitor({', '.join(options)})"
    print(f"| model | epoch without monitor (s, median) | epoch with {monitor} (s, median) | monitor's share (median epoch) "
          f"| share of the whole fit (median of repeats) | the monitor's own seconds ÷ fit (median) | K computed per epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        off, on, logged, fits, shares = [], [], 0, [], []
        for _ in range(args.repeats):
            without = epoch_seconds(name, args.steps, args.epochs, args.log_every, monitor=False)[0]
            times, logged, share = epoch_seconds(name, args.steps, args.epochs, args.log_every, monitor=True, max_samples=args.max_samples,
                                          max_overhead=args.max_overhead)
            off, on = off + without, on + times
            fits.append(sum(times) / sum(without) - 1)  # the first K (always computed) counts here, once per fit
            shares.append(share)
        t_off, t_on = statistics.median(off), statistics.median(on)
        print(f"| {name} | {t_off:.2f} | {t_on:.2f} | {100 * (t_on - t_off) / t_off:+.1f} % | {100 * statistics.median(fits):+.1f} % "
              f"| {100 * statistics.median(shares):.1f} % | {logged / args.epochs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
