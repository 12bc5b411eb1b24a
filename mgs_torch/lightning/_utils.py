"""Helpers shared by :class:`MGSMonitor` and :class:`MGSRegularizedMixin` (not public API)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import Tensor, nn

try:  # the classic package name first (what pyproject depends on), then the unified one
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
        from lightning.pytorch.utilities.exceptions import MisconfigurationException  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "mgs_torch.lightning needs PyTorch Lightning: pip install 'mgs-torch[lightning]'"
        ) from err

from .._dtypes import as_dtype  # noqa: F401 - the core's rule, re-used by the callback and the mixin
from .._problem import Inputs

__all__ = ["pl", "MisconfigurationException", "MGSConfigurationError"]

_INPUT_KEYS = ("x", "input", "inputs", "features")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MGSConfigurationError(MisconfigurationException, ValueError):
    """An invalid setting of the MGS Lightning integration.

    Both a Lightning ``MisconfigurationException`` (the convention for callbacks) and a
    ``ValueError`` (the core's convention), so either ``except`` catches it.
    """


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise MGSConfigurationError(f"{name} must be one of {allowed}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise MGSConfigurationError(f"{name} must be {what}, got {value!r}")


def check_float(name: str, value: Any, *, minimum: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise MGSConfigurationError(f"{name} must be a finite number{bound}, got {value!r}")


def default_inputs(batch: Any) -> Inputs:
    """The model inputs of a batch: the batch itself if it is a tensor, its first element if it is a
    tuple/list (``(x, y)`` loaders), ``batch[k]`` for the first key k of ``x``/``input``/``inputs``/
    ``features`` if it is a mapping."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"cannot find the model inputs in a batch of type {type(batch).__name__}: the default takes a tensor, "
        f"the first element of a tuple/list, or one of the keys {_INPUT_KEYS} of a dict. Override "
        f"`mgs_inputs(batch)` in your LightningModule (or pass `inputs_fn=` to MGSMonitor)"
    )


def default_targets(batch: Any) -> Tensor | None:
    """The targets of a batch for the kernel–target alignment: the second element of a tuple/list,
    or the first of the keys ``y``/``target``/``targets``/``label``/``labels``; ``None`` otherwise."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in _TARGET_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    return None


def cap_samples(inputs: Inputs, max_samples: int | None) -> Inputs:
    """The first ``max_samples`` samples of every input tensor (all of them when ``None``)."""
    if max_samples is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs[:max_samples]
    if isinstance(inputs, (tuple, list)):
        return tuple(x[:max_samples] if isinstance(x, Tensor) else x for x in inputs)
    return inputs  # the core will reject it with its own message


def compute_dtype(module: nn.Module, trainer: Any, requested: torch.dtype | None) -> torch.dtype | None:
    """The dtype for a kernel: ``requested`` if given; float32 when the parameters are half/bfloat16
    or the Trainer runs a ``*-mixed`` precision with float32 parameters; otherwise ``None`` (the
    parameters' dtype)."""
    if requested is not None:
        return requested
    dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    if dtypes & set(_LOW_PRECISION):
        return torch.float32
    precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
    if "mixed" in precision and dtypes <= {torch.float32}:
        return torch.float32
    return None


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Leave torch's (CPU and CUDA), Python's and NumPy's global random states as they were."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, np_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


@contextlib.contextmanager
def module_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """``mode="eval"``: every submodule in eval mode for the duration; ``"train"``: as it is. Flags restored."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        if mode == "eval":
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def lightning_trainer(module: nn.Module) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (never raises)."""
    return getattr(module, "_trainer", None)
