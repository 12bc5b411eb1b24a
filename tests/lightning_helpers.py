"""Tiny LightningModules, data and an in-memory logger for the Lightning integration tests."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import Logger  # noqa: E402
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # noqa: E402

from mgs_torch.lightning import MGSRegularizedMixin  # noqa: E402

D, Q = 4, 3  # input features, classes


def make_data(n: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    y = torch.randint(0, Q, (n,), generator=g)
    return TensorDataset(x, y)


def loader(n: int = 32, batch_size: int = 8, shuffle: bool = False, seed: int = 0, dtype=torch.float32) -> DataLoader:
    return DataLoader(make_data(n, seed, dtype), batch_size=batch_size, shuffle=shuffle)


def make_net(dropout: float = 0.0, batch_norm: bool = False, hidden: int = 6) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(D, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, Q))
    return nn.Sequential(*layers)


class PlainNet(pl.LightningModule):
    """A classifier whose forward returns logits; SGD so that weights are easy to reproduce by hand."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False, lr: float = 0.1, double: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = make_net(dropout, batch_norm)
        if double:
            self.net.double()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RegNet(MGSRegularizedMixin, PlainNet):
    """PlainNet with the MGS penalty; mgs_* keyword arguments go to the mixin."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False, lr: float = 0.1, double: bool = False,
                 seed: int = 0, **mgs: Any):
        super().__init__(dropout=dropout, batch_norm=batch_norm, lr=lr, double=double, seed=seed, **mgs)
        self.save_hyperparameters()


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``records`` is a list of (step, {key: value})."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams = params

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def values(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every record that has ``key``."""
        return [(step, m[key]) for step, m in self.records if key in m]


def trainer(tmp_path, *, logger: Any = None, callbacks=(), **kwargs) -> "pl.Trainer":
    """A quiet CPU Trainer with tiny budgets; ``logger=None`` gives a MemoryLogger."""
    options = dict(
        max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=str(tmp_path),
        deterministic=False,
    )
    options.update(kwargs)
    return pl.Trainer(logger=MemoryLogger() if logger is None else logger, callbacks=list(callbacks), **options)


def fit(model, tmp_path, train=None, val=None, **kwargs):
    t = trainer(tmp_path, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
        t.fit(model, train if train is not None else loader(), val)
    return t


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def reference_logdet(K: torch.Tensor) -> float:
    sign, logabsdet = torch.linalg.slogdet(K.double())
    return float(logabsdet) if float(sign) > 0 else -math.inf
