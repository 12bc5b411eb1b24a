"""Inputs and outputs as users have them: one normalisation used by every entry point.

``inputs`` may be a tensor (``model(x)``), a tuple of tensors (``model(*inputs)``) or a mapping of
keyword arguments (``model(**inputs)``, e.g. a tokenizer's or a data collator's dict): its tensors carry
the batch on dim 0 and other values (``None``, flags, numbers) are passed through unchanged. The model's
return value is read through an *output selector* (``logits=``): a tensor is taken as it is, a mapping
(a Hugging Face ``ModelOutput``, a dict) by its ``"logits"`` entry, and an explicit key, index or
callable picks anything else.

:func:`model_call` turns (inputs, selector) into what the engines take — a tuple of batched tensors,
sliced per sample under ``vmap`` — and a :class:`ModelCall` that maps such a tuple back onto the
model's signature and its output onto one tensor of raw outputs.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Union

from torch import Tensor, nn

from . import _walk
from ._validation import Inputs, as_input_tuple

__all__ = [
    "OutputSelector", "ModelCall", "model_call", "check_selector", "select_output", "take_samples", "map_tensors",
    "batch_size", "uses_transformers",
]

#: ``None`` (a tensor as it is; a mapping's ``"logits"``), a key or attribute name, a tuple index, or a
#: callable ``out -> Tensor`` / ``(out, inputs) -> Tensor``
OutputSelector = Union[None, str, int, Callable[..., Tensor]]


def check_selector(logits: OutputSelector) -> None:
    """Raise a TypeError for a selector that is none of the allowed forms."""
    if logits is None or isinstance(logits, str) or callable(logits):
        return
    if isinstance(logits, int) and not isinstance(logits, bool):
        return
    raise TypeError(
        f"logits= selects the raw outputs from what the model returns: None (a tensor, or the 'logits' entry of a "
        f"ModelOutput/dict), a key or attribute name (str), a tuple index (int) or a callable out -> tensor; "
        f"got {type(logits).__name__}"
    )


def _takes_inputs(fn: Callable) -> bool:
    """Whether a selector callable accepts a second positional argument (the model's inputs)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def _describe(out: object) -> str:
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)} items ({', '.join(type(v).__name__ for v in out)})"
    return type(out).__name__


def select_output(out: object, logits: OutputSelector = None, inputs: object = None) -> Tensor:
    """The raw outputs (logits) in what the model returned, as ``logits=`` selects them.

    ``None``: a tensor as it is, or the ``"logits"`` entry of a mapping (``ModelOutput``, dict). A ``str``:
    that entry of a mapping, else that attribute. An ``int``: that item of a tuple/list. A callable: its
    result, called as ``logits(out)`` or, if it takes two arguments, ``logits(out, inputs)`` with the
    keyword inputs (a dict) or positional inputs (a tuple) of the same samples.
    """
    if logits is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
            return out["logits"]
        raise TypeError(
            f"the model returned {_describe(out)}, not a tensor of raw outputs (logits); pass logits= to say where "
            f"they are: a key or attribute name (logits='start_logits'), a tuple index (logits=0) or a callable "
            f"(logits=lambda out: out.logits[:, -1])"
        )
    if callable(logits):
        chosen = logits(out, inputs) if _takes_inputs(logits) else logits(out)
        what = f"the output selector {getattr(logits, '__name__', type(logits).__name__)}"
    elif isinstance(logits, str):
        if isinstance(out, Mapping):
            if logits not in out:
                raise TypeError(f"logits={logits!r} names no entry of the model's output, a {_describe(out)}")
            chosen = out[logits]
        elif hasattr(out, logits):
            chosen = getattr(out, logits)
        else:
            raise TypeError(f"logits={logits!r} names no entry or attribute of the model's output, a {_describe(out)}")
        what = f"logits={logits!r}"
    else:
        if not isinstance(out, (tuple, list)) or not -len(out) <= logits < len(out):
            raise TypeError(f"logits={logits} indexes a tuple output, but the model returned {_describe(out)}")
        chosen = out[logits]
        what = f"logits={logits}"
    if not isinstance(chosen, Tensor):
        raise TypeError(f"{what} gave {type(chosen).__name__}, not a tensor of raw outputs with the batch on dim 0")
    return chosen


@dataclass(frozen=True)
class ModelCall:
    """How a tuple of batched tensors calls the model, and which of its outputs are the raw outputs.

    Attributes:
        keys: ``None`` for a positional call ``model(*tensors)``; else the keyword of each tensor,
            ``model(**dict(zip(keys, tensors)), **static)``.
        static: the mapping's other values (not tensors), passed unchanged.
        logits: the output selector (see :func:`select_output`).
        transformers: the model holds Hugging Face ``transformers`` modules, whose attention-mask helpers
            must build masks explicitly under torch.func transforms (:mod:`mgs_torch.hf._masks`).
    """

    keys: tuple[str, ...] | None = None
    static: tuple[tuple[str, Any], ...] = ()
    logits: OutputSelector = None
    transformers: bool = False

    def arguments(self, tensors: tuple[Tensor, ...]) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` for the model, from tensors ordered as :func:`model_call` returned them."""
        if self.keys is None:
            return tuple(tensors), {}
        return (), {**dict(self.static), **dict(zip(self.keys, tensors))}

    def inputs(self, tensors: tuple[Tensor, ...]) -> Inputs | dict[str, Any]:
        """The inputs in the user's form again (a mapping or a tuple) from such tensors."""
        args, kwargs = self.arguments(tensors)
        return kwargs if self.keys is not None else args

    def select(self, out: object, tensors: tuple[Tensor, ...]) -> Tensor:
        """The raw outputs in the model's return value (see :func:`select_output`)."""
        if self.logits is None and isinstance(out, Tensor):
            return out
        return select_output(out, self.logits, self.inputs(tensors))

    def context(self) -> contextlib.AbstractContextManager:
        """What the model's forward must run under while mgs_torch differentiates it."""
        if not self.transformers:
            return contextlib.nullcontext()
        from .hf._masks import masks_built_under_transforms  # only reached with transformers already imported

        return masks_built_under_transforms()

    def __call__(self, fn: Callable, tensors: tuple[Tensor, ...]) -> Tensor:
        """``fn`` (the model, or a functional call of it) on ``tensors``, its raw outputs selected."""
        args, kwargs = self.arguments(tensors)
        with self.context():
            out = fn(*args, **kwargs)
        return self.select(out, tensors)

    @property
    def key(self) -> tuple:
        """What a cached output shape or plan depends on (the layout and the selector)."""
        static = tuple((k, v if _hashable(v) else ("id", id(v))) for k, v in self.static)
        logits = self.logits if _hashable(self.logits) else ("id", id(self.logits))
        return (self.keys, static, logits)


def _hashable(v: object) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def uses_transformers(model: nn.Module) -> bool:
    """Whether ``model`` holds modules of Hugging Face ``transformers`` (never imports it)."""
    if "transformers" not in sys.modules:
        return False
    return any(type(m).__module__.startswith("transformers.") for m in _walk.modules(model))


def model_call(model: nn.Module, inputs: Inputs | Mapping[str, Any], logits: OutputSelector = None) -> tuple[tuple[Tensor, ...], ModelCall]:
    """Validate ``inputs`` and ``logits``; return the batched tensors and the :class:`ModelCall` that uses them.

    A mapping's tensors must share the batch size on dim 0 (a per-batch constant goes in as a Python
    value); its keys must be keyword arguments of ``model.forward``.
    """
    check_selector(logits)
    transformers = uses_transformers(model)
    if not isinstance(inputs, Mapping):
        tensors = as_input_tuple(inputs)
        _check_positional_arity(model, tensors)
        return tensors, ModelCall(None, (), logits, transformers)
    if not inputs:
        raise TypeError("inputs is an empty mapping; pass the model's keyword inputs, e.g. {'input_ids': ..., 'attention_mask': ...}")
    bad_keys = [k for k in inputs if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"a mapping of inputs is passed as model(**inputs), so its keys must be strings; got {bad_keys!r}")
    keys = tuple(k for k, v in inputs.items() if isinstance(v, Tensor))
    if not keys:
        raise TypeError(
            f"the mapping of inputs (keys {list(inputs)}) holds no tensor; the tensors with the batch on dim 0 are "
            f"what the kernel is taken over"
        )
    tensors = tuple(inputs[k] for k in keys)
    for k, t in zip(keys, tensors):
        if t.dim() == 0:
            raise ValueError(
                f"input {k!r} is a 0-dimensional tensor; every tensor in the mapping needs the batch on dim 0 "
                f"(pass a per-batch constant as a Python number instead)"
            )
    n = tensors[0].shape[0]
    if n == 0:
        raise ValueError("the batch is empty (0 samples); the MGS kernel needs at least one sample")
    sizes = {k: t.shape[0] for k, t in zip(keys, tensors)}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"the tensors of the inputs disagree on the batch size (dim 0): {sizes}; every tensor in the mapping "
            f"needs the batch on dim 0 (pass per-batch constants as Python values, not tensors)"
        )
    _check_keywords(model, list(inputs))
    static = tuple((k, v) for k, v in inputs.items() if not isinstance(v, Tensor))
    return tensors, ModelCall(keys, static, logits, transformers)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):  # builtins, C++ modules: let the forward speak for itself
        return None


def _check_positional_arity(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Raise a clear TypeError when ``model.forward`` cannot take ``len(inputs)`` positional inputs.

    The common case: a data loader's ``(x, y)`` batch passed whole, where ``model(x, y)`` would fail with
    Python's "takes 2 positional arguments but 3 were given".
    """
    params = _forward_parameters(model)
    if params is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(inputs) > len(positional):
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(positional)} input(s) "
            f"({', '.join(p.name for p in positional) or 'none'}) but {len(inputs)} tensors were given as inputs; "
            f"a tuple is passed as model(*inputs). If your data loader yields (inputs, targets), pass only the inputs"
        )


def _check_keywords(model: nn.Module, keys: list[str]) -> None:
    """Raise a clear TypeError when ``model.forward`` takes no keyword argument of some key."""
    params = _forward_parameters(model)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in keys if k not in named]
    if unknown:
        raise TypeError(
            f"{type(model).__name__}.forward takes no keyword argument {', '.join(map(repr, unknown))} (it takes "
            f"{', '.join(named) or 'none'}); a mapping of inputs (got dict with keys {keys}) is passed as "
            f"model(**inputs). Pass a tensor or a tuple for positional inputs, and leave targets out"
        )


def take_samples(inputs: Any, count: int | None) -> Any:
    """The first ``count`` samples of every tensor in ``inputs`` (a tensor, tuple/list or mapping; other
    values unchanged); all of them when ``count`` is None."""
    if count is None:
        return inputs
    return map_tensors(inputs, lambda t: t[:count] if t.dim() > 0 else t)


def map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``inputs`` with ``fn`` applied to each of its tensors (a tensor, tuple/list or mapping, one level)."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(fn(v) if isinstance(v, Tensor) else v for v in inputs)
    return inputs  # the entry point rejects it with its own message


def batch_size(inputs: Any) -> int:
    """The number of samples in ``inputs`` (dim 0 of its first tensor)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values:
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise TypeError(f"no tensor with a batch dimension in the inputs ({type(inputs).__name__})")
