r"""MGSEarlyStopping: stop training when the MGS curve stops growing, no validation set needed.

>>> trainer = pl.Trainer(callbacks=[MGSMonitor(probe="train", log_every_n_steps=0, log_on_epoch_end=True),
...                                 MGSEarlyStopping(threshold=0.05, window=5, patience=3)])
"""

from __future__ import annotations

from typing import Any

import torch

from ..stopping import GrowthPlateau
from ._utils import MGSConfigurationError, pl

__all__ = ["MGSEarlyStopping"]

try:  # the reason enum appeared in recent Lightning releases
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
except ImportError:  # pragma: no cover - depends on the Lightning version
    EarlyStoppingReason = None  # type: ignore[assignment]


class MGSEarlyStopping(pl.callbacks.EarlyStopping):
    r"""Stop when the relative growth of an MGS value stays below ``threshold`` for ``patience`` epochs.

    The rule (:class:`mgs_torch.stopping.GrowthPlateau`): with v_e the monitored value at the end of
    epoch e (default ``mgs/trace_per_row_epoch``, tr K / N of :class:`MGSMonitor`'s probe batch),
    r_e = v_e / v_{e−window} − 1, and training stops at the end of the first epoch e ≥ ``min_epochs``
    − 1 after which r has been below ``threshold`` for ``patience`` epochs in a row. It is a Lightning
    ``EarlyStopping`` (same checkpoint state, ``stopped_epoch``, ``verbose``, DDP decision), checked at
    the end of every training epoch, after :class:`MGSMonitor` has logged that epoch's value.

    Use it with an :class:`MGSMonitor` that logs the value at epoch end, preferably on a fixed probe
    batch so that the curve is comparable across epochs::

        MGSMonitor(probe="train", max_samples=32, log_every_n_steps=0, log_on_epoch_end=True, model_mode="eval")

    What it is worth is measured in ``examples/RESULTS.md`` (test accuracy at this stopping point
    against validation-loss early stopping and the last epoch, at 0–80 % label noise), including
    where it does not help.

    Args:
        monitor: the callback-metric key (an MGSMonitor epoch key).
        threshold: relative growth per ``window`` epochs below which an epoch counts as a plateau.
        patience: plateau epochs in a row needed to stop.
        window: epochs the growth is measured over (1: epoch to epoch).

    The defaults (5 % over 5 epochs, patience 3) were chosen by ``mgs-torch stopping --select-on fcn``
    from a small grid by the *validation* accuracy at the stopping point on the digits FCN runs
    (``examples/RESULTS.md``), not by test accuracy.
        min_epochs: never stop before this many epochs were trained.
        verbose, strict: as in ``EarlyStopping``.
    """

    def __init__(
        self,
        monitor: str = "mgs/trace_per_row_epoch",
        *,
        threshold: float = 0.05,
        patience: int = 3,
        window: int = 5,
        min_epochs: int = 0,
        verbose: bool = False,
        strict: bool = True,
    ) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a callback-metric key (str), got {type(monitor).__name__}")
        try:
            self.rule = GrowthPlateau(threshold=threshold, patience=patience, window=window, min_checks=min_epochs)
        except ValueError as err:
            raise MGSConfigurationError(str(err)) from err
        super().__init__(monitor=monitor, patience=patience, mode="max", verbose=verbose, strict=strict,
                         check_finite=False, check_on_train_epoch_end=True)
        self.threshold, self.window, self.min_epochs = float(threshold), window, min_epochs

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode="mgs-growth")

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.monitor.endswith("_epoch"):
            return
        from .callback import MGSMonitor

        if not any(isinstance(c, MGSMonitor) and c.log_on_epoch_end for c in trainer.callbacks):
            raise MGSConfigurationError(
                f"MGSEarlyStopping(monitor={self.monitor!r}) needs an MGSMonitor that logs at epoch end: add "
                f"MGSMonitor(probe='train', log_on_epoch_end=True) to the Trainer's callbacks"
            )

    #: the relative growth of every epoch (None where undefined), as the rule saw it
    @property
    def growths(self) -> list[float | None]:
        return self.rule.growths

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        stop = self.rule.update(float(current))
        self.wait_count = self.rule.wait
        growth = self.rule.last_growth
        if stop:
            if EarlyStoppingReason is not None:
                self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            return True, (
                f"{self.monitor} grew less than {self.threshold:.2%} per {self.window} epoch(s) for {self.patience} "
                f"epochs in a row (last growth {growth if growth is None else f'{growth:.2%}'}). Signaling Trainer to stop."
            )
        return False, None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rule.load_state_dict(state_dict.get("rule", {}))
