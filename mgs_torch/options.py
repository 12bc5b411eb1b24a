"""The options of an MGS computation, validated once, in one place.

:class:`KernelOptions` holds what defines K for a call (``mgs_kernel``); :class:`PenaltyOptions` adds
what turns it into a penalty or a trace estimate (``mgs_penalty``, ``mgs_trace``). Both are frozen
dataclasses checked in ``__post_init__``, so a bad value fails where it is given, with a message that
names the allowed values; the Lightning classes hold the same objects (``dataclasses.asdict`` for hparams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ._dtypes import as_dtype
from ._validation import BATCH_NORM_POLICIES, OUTPUT_MODES, Inputs, ParamFilter
from .engines import STRATEGIES
from .estimators import ESTIMATORS, KINDS

__all__ = [
    "KernelOptions", "PenaltyOptions", "REDUCTIONS", "Inputs", "ParamFilter", "check_choice", "check_int", "check_float",
]

REDUCTIONS = ("mean", "sum")


def check_choice(name: str, value, allowed) -> None:
    """``value`` must be one of ``allowed`` (``ValueError`` naming them otherwise)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_int(name: str, value, *, minimum: int, allow_none: bool = False) -> None:
    """``value`` must be an int ≥ ``minimum`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_float(name: str, value, *, minimum: float | None = None) -> None:
    """``value`` must be a finite number (≥ ``minimum`` when given)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


@dataclass(frozen=True)
class KernelOptions:
    """What K = J Jᵀ means for a call: see :func:`mgs_torch.mgs_kernel` for each field."""

    outputs: str = "full"
    params: ParamFilter = None
    strategy: str = "auto"
    chunk_size: int | None = None
    dtype: torch.dtype | None = None
    batch_norm: str = "eval"

    def __post_init__(self):
        check_choice("outputs", self.outputs, OUTPUT_MODES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("batch_norm", self.batch_norm, BATCH_NORM_POLICIES)
        check_int("chunk_size", self.chunk_size, minimum=1, allow_none=True)
        # one dtype rule for the core and the Lightning classes: a floating torch.dtype or its name ("float64")
        object.__setattr__(self, "dtype", as_dtype("dtype", self.dtype))

    def kernel_options(self) -> "KernelOptions":
        """Only the fields that define K (drops penalty fields)."""
        return KernelOptions(**{f.name: getattr(self, f.name) for f in fields(KernelOptions)})

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments of :func:`mgs_torch.mgs_kernel` / :func:`mgs_torch.mgs_penalty`
        (not ``dataclasses.asdict``, which would deep-copy the ``params`` selection)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PenaltyOptions(KernelOptions):
    """K's options plus g and its estimate: see :func:`mgs_torch.mgs_penalty` for each field."""

    kind: str = "trace"
    estimator: str = "exact"
    num_probes: int = 1
    reduction: str = "mean"
    jitter: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_choice("kind", self.kind, KINDS)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        if self.estimator == "hutchinson" and self.kind != "trace":
            raise ValueError("estimator='hutchinson' estimates the trace only; use kind='trace' or estimator='exact'")
        check_int("num_probes", self.num_probes, minimum=1)
        check_float("jitter", self.jitter, minimum=0.0)
