r"""Early stopping without a validation set: stop when the MGS curve stops growing.

The MGS claim (Szolnoky et al.): while a network memorises its (noisy) training labels, tr K of a
fixed probe batch keeps growing; when it stops growing, so does the change in test accuracy. The rule
here watches the relative growth of a monitored value v (tr K / N of a fixed probe batch, once per
epoch) over a window of ``window`` checks,

.. math:: r_t = v_t / v_{t-w} - 1,

and stops once :math:`r_t <` ``threshold`` for ``patience`` consecutive checks, never before
``min_checks`` checks. It is used by :class:`mgs_torch.lightning.MGSEarlyStopping` (one check per
epoch) and by ``mgs-torch stopping`` (the testbench measurement in ``examples/RESULTS.md``), so both
apply exactly the same rule. It needs no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["GrowthPlateau", "growth_plateau_stop"]


class GrowthPlateau:
    """The stopping rule as a small state machine: feed one value per check with :meth:`update`.

    Args:
        threshold: stop when the relative growth over ``window`` checks stays below this (e.g. 0.02 =
            2 %; a negative growth — the value fell — counts as below).
        patience: consecutive checks below the threshold needed to stop (≥ 1).
        window: w, the growth is measured against the value w checks earlier (≥ 1; larger = smoother).
        min_checks: never stop before this many checks (the first epochs of training are noisy).

    A non-finite value resets the count (it is neither growth nor plateau) and is not used as a base.
    """

    def __init__(self, threshold: float = 0.02, patience: int = 3, window: int = 1, min_checks: int = 0) -> None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number (a relative growth, e.g. 0.02), got {threshold!r}")
        for name, value, low in (("patience", patience, 1), ("window", window, 1), ("min_checks", min_checks, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.threshold = float(threshold)
        self.patience = patience
        self.window = window
        self.min_checks = min_checks
        self.values: list[float] = []
        self.growths: list[float | None] = []
        self.wait = 0
        self.stopped_at: int | None = None

    def update(self, value: float) -> bool:
        """Record the next value; True when the rule says stop (and from then on)."""
        value = float(value)
        self.values.append(value)
        growth = None
        if len(self.values) > self.window:
            base = self.values[-1 - self.window]
            if math.isfinite(value) and math.isfinite(base) and base != 0:
                growth = value / base - 1.0 if base > 0 else (value - base) / abs(base)
        self.growths.append(growth)
        if growth is None:
            self.wait = 0
        elif growth < self.threshold:
            self.wait += 1
        else:
            self.wait = 0
        if self.stopped_at is None and self.wait >= self.patience and len(self.values) >= self.min_checks:
            self.stopped_at = len(self.values) - 1
        return self.stopped_at is not None

    @property
    def last_growth(self) -> float | None:
        return self.growths[-1] if self.growths else None

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "growths": list(self.growths), "wait": self.wait, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = list(state.get("values", []))
        self.growths = list(state.get("growths", []))
        self.wait = int(state.get("wait", 0))
        self.stopped_at = state.get("stopped_at")


def growth_plateau_stop(values: Iterable[float], **rule: Any) -> int | None:
    """The index of the check at which :class:`GrowthPlateau` (with ``rule``) stops, or None if it never does."""
    plateau = GrowthPlateau(**rule)
    for i, v in enumerate(values):
        if plateau.update(v):
            return i
    return None
