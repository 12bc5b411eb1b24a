"""The fixed probe batch of :class:`~mgs_torch.lightning.MGSMonitor` (``probe="train"``/``"val"``)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch

from ._utils import MGSConfigurationError, MisconfigurationException, pl, preserved_global_rng

__all__ = ["draw_probe_batch", "DEFAULT_PROBE_SIZE"]

DEFAULT_PROBE_SIZE = 64


def probe_loader(trainer: "pl.Trainer", probe: str) -> Any:
    """The Trainer's training or validation loader (for its dataset and collate_fn)."""
    if probe == "train":
        loaders = trainer.train_dataloader
    else:
        loaders = trainer.val_dataloaders
        val_loop = getattr(trainer.fit_loop.epoch_loop, "val_loop", None)
        if loaders is None and val_loop is not None:  # set up lazily (no sanity check ran yet): set it up now
            with preserved_global_rng(), contextlib.suppress(MisconfigurationException):  # no val data at all
                val_loop.setup_data()
            loaders = trainer.val_dataloaders
        if loaders is None and val_loop is not None:
            # validation switched off (limit_val_batches=0) leaves no public route to the loader the user
            # passed: its data source is the one place it is kept
            source = getattr(val_loop, "_data_source", None)
            if source is not None and source.is_defined():
                with preserved_global_rng():
                    loaders = source.dataloader()
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        where = "train_dataloaders" if probe == "train" else "val_dataloaders"
        hook = "train_dataloader" if probe == "train" else "val_dataloader"
        raise MGSConfigurationError(
            f"MGSMonitor(probe={probe!r}) found no {probe} data: pass {where}= to trainer.fit, define "
            f"{hook}() in the LightningModule or DataModule, or use probe='current'"
        )
    return loaders


def draw_probe_batch(trainer: "pl.Trainer", probe: str, max_samples: int | None, seed: int) -> tuple[Any, int]:
    """A batch of ``max_samples`` samples (default: the loader's batch size) of the train/val data set,
    chosen at random with ``seed`` and collated with the loader's ``collate_fn``, drawn without touching
    the loaders or the global random streams. Returns the batch and its intended size."""
    loader = probe_loader(trainer, probe)
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    size = max_samples or getattr(loader, "batch_size", None) or DEFAULT_PROBE_SIZE
    with preserved_global_rng():  # random transforms in the dataset must not shift the run's streams
        if dataset is not None and collate is not None and not isinstance(dataset, torch.utils.data.IterableDataset):
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(dataset), generator=gen)[:size].tolist()
            return collate([dataset[i] for i in order]), size
        if dataset is not None and collate is not None:
            return collate(list(itertools.islice(iter(dataset), size))), size
        return next(iter(loader)), size  # not a torch DataLoader: its first batch
