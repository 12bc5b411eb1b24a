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
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # type: ignore[no-redef]
        from lightning.pytorch.utilities.exceptions import MisconfigurationException  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "mgs_torch.lightning needs PyTorch Lightning (>= 2.6): pip install 'pytorch-lightning>=2.6', or, in a clone "
            "of mgs_torch, pip install -e '.[lightning]'"
        ) from err

from .. import options
from .._io import take_samples
from ..options import Inputs

__all__ = ["pl", "MisconfigurationException", "MGSConfigurationError", "rank_zero_info", "rank_zero_warn"]

_INPUT_KEYS = ("x", "input", "inputs", "features")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MGSConfigurationError(MisconfigurationException, ValueError):
    """An invalid setting of the MGS Lightning integration.

    Both a Lightning ``MisconfigurationException`` (the convention for callbacks) and a
    ``ValueError`` (the core's convention), so either ``except`` catches it.
    """


@contextlib.contextmanager
def configuration_errors(prefix: str = "") -> Iterator[None]:
    """Re-raise the core's validation errors as Lightning's: a ``ValueError`` becomes
    :class:`MGSConfigurationError`, and ``prefix`` is put before the option name the message starts with."""
    try:
        yield
    except MGSConfigurationError:
        raise
    except ValueError as err:
        raise MGSConfigurationError(f"{prefix}{err}") from err
    except TypeError as err:
        if not prefix:
            raise
        raise TypeError(f"{prefix}{err}") from err


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    with configuration_errors():
        options.check_choice(name, value, allowed)


def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    with configuration_errors():
        options.check_int(name, value, minimum=minimum, allow_none=allow_none)


def check_float(name: str, value: Any, *, minimum: float | None = None) -> None:
    with configuration_errors():
        options.check_float(name, value, minimum=minimum)


def default_inputs(batch: Any) -> Inputs:
    """The model inputs of a batch: the batch itself if it is a tensor, its first element if it is a
    tuple/list (``(x, y)`` loaders), ``batch[k]`` for the first key k of ``x``/``input``/``inputs``/
    ``features`` if it is a mapping, else the mapping without its target keys (``y``, ``target``,
    ``targets``, ``label``, ``labels``) as keyword inputs (a tokenizer's or collator's dict: ``model(**inputs)``)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        inputs = {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
        if any(isinstance(v, Tensor) for v in inputs.values()):
            return inputs
    raise TypeError(
        f"cannot find the model inputs in a batch of type {type(batch).__name__}: the default takes a tensor, "
        f"the first element of a tuple/list, one of the keys {_INPUT_KEYS} of a dict, or a dict's tensors other than "
        f"its targets {_TARGET_KEYS} as keyword inputs. Override "
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
    """The first ``max_samples`` samples of every input tensor (all of them when ``None``), in a tensor,
    tuple or mapping of keyword inputs."""
    return take_samples(inputs, max_samples)


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
