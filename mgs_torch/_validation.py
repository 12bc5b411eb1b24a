"""Validation of what a user passes to mgs_torch: inputs, the parameter selection, the model's outputs.

Each check raises a ``ValueError``/``TypeError`` that says what was wrong and what to do.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from . import _walk
from ._guards import capturing_cuda_graph

__all__ = [
    "Inputs", "ParamFilter", "NonFiniteOutputError", "OUTPUT_MODES", "BATCH_NORM_POLICIES", "as_input_tuple",
    "select_parameters", "functional_model", "check_outputs", "raise_integer_input_hint", "select_metrics",
]

#: a tensor (``model(x)``), a tuple of tensors (``model(*inputs)``) or a mapping of keyword arguments
#: (``model(**inputs)``; see :mod:`mgs_torch._io`), tensors with the batch on dim 0
Inputs = Union[Tensor, Sequence[Tensor], Mapping[str, Any]]
ParamFilter = Union[None, Callable[[str, nn.Parameter], bool], Iterable[Union[str, nn.Module, nn.Parameter]]]

class NonFiniteOutputError(ValueError):
    """The model produced NaN or inf on the batch, so the kernel is undefined (training diverged?)."""


OUTPUT_MODES = ("full", "sum")
BATCH_NORM_POLICIES = ("eval", "batch")

def as_input_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    """Validate ``inputs`` (a tensor or a tuple/list of tensors, batch on dim 0)."""
    if isinstance(inputs, Tensor):
        items: tuple = (inputs,)
    elif isinstance(inputs, (tuple, list)) and len(inputs) > 0 and all(isinstance(x, Tensor) for x in inputs):
        items = tuple(inputs)
    else:
        what = type(inputs).__name__
        if isinstance(inputs, (tuple, list)):
            what += " of " + ", ".join(sorted({type(x).__name__ for x in inputs})) if inputs else " (empty)"
        raise TypeError(
            f"inputs must be a torch.Tensor, a non-empty tuple of tensors (passed to the model as model(*inputs)) "
            f"or a mapping of keyword arguments (model(**inputs)), tensors with the batch on dim 0; got {what}. "
            f"If your data loader yields (inputs, targets), pass only the inputs."
        )
    for i, x in enumerate(items):
        if x.dim() == 0:
            raise ValueError(f"input {i} is a 0-dimensional tensor; inputs need the batch on dim 0, e.g. x.unsqueeze(0)")
    n = items[0].shape[0]
    if n == 0:
        raise ValueError("the batch is empty (0 samples); the MGS kernel needs at least one sample")
    for i, x in enumerate(items[1:], 1):
        if x.shape[0] != n:
            raise ValueError(f"inputs disagree on the batch size: input 0 has {n} samples, input {i} has {x.shape[0]}")
    return items


def select_metrics(metrics: Sequence[str] | str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The metric names a monitor logs: ``"all"`` (every one of ``allowed``) or a non-empty selection of them."""
    if isinstance(metrics, str):
        if metrics != "all":
            raise ValueError(f"metrics must be 'all' or a sequence of names from {allowed}, got {metrics!r}")
        return allowed
    metrics = tuple(metrics)
    if not metrics or any(m not in allowed for m in metrics):
        raise ValueError(f"metrics must be a non-empty selection of {allowed} (or 'all'), got {metrics!r}")
    return metrics


def functional_model(model: nn.Module) -> nn.Module:
    """The module whose forward MGS differentiates: ``model`` itself, or what a data-parallel
    wrapper holds (``nn.DataParallel``, ``DistributedDataParallel``: the same function and the same
    Parameters, which torch.func cannot call through the wrapper). TorchScript modules are refused
    with advice: torch.func cannot substitute their parameters. So are models with a TorchScript
    submodule: its ops run outside Python, where :class:`~mgs_torch.op_fixes.ExactOps` cannot replace
    the ops whose torch.func derivatives are wrong (a scripted LayerNorm or PReLU gave a penalty
    gradient 0.5–17 % off without any error). A ``torch.compile`` wrapper is unwrapped (the same
    function and Parameters; MGS runs the module eagerly)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script/trace), whose parameters torch.func "
            f"cannot substitute; pass the nn.Module you scripted or traced (it shares the same Parameters)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scripted = [name for name, m in _walk.named_modules(model) if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise TypeError(
            f"{type(model).__name__} contains TorchScript submodules ({', '.join(scripted[:3])}"
            f"{', …' if len(scripted) > 3 else ''}): their ops run outside Python, where mgs_torch cannot replace "
            f"the ops whose torch.func derivatives are wrong (LayerNorm, PReLU, …), so K or the penalty gradient "
            f"could be silently off. Put the original nn.Module there (scripting shares its Parameters) while "
            f"computing MGS"
        )
    return model


def select_parameters(model: nn.Module, params: ParamFilter = None) -> dict[str, nn.Parameter]:
    """The trainable parameters (``requires_grad``) that ``params`` selects, by name.

    ``params`` is ``None`` (all trainable parameters), a callable ``(name, parameter) -> bool``, or an
    iterable mixing parameter names, name prefixes (``"fc1"`` selects ``"fc1.weight"``), submodules and
    parameter objects.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(k, p) for k, p in _walk.named_parameters(model) if p.requires_grad]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            f"the MGS kernel is a Jacobian with respect to trainable parameters"
        )
    if params is None:
        chosen = named
    elif callable(params) and not isinstance(params, nn.Module):
        chosen = [(k, p) for k, p in named if params(k, p)]
    else:
        items = list(params) if not isinstance(params, (str, nn.Module, nn.Parameter)) else [params]
        ids: set[int] = set()
        prefixes: list[str] = []
        for item in items:
            if isinstance(item, nn.Module):
                ids.update(id(p) for p in item.parameters())
            elif isinstance(item, Tensor):
                ids.add(id(item))
            elif isinstance(item, str):
                prefixes.append(item)
            else:
                raise TypeError(f"params entries must be names, modules or parameters; got {type(item).__name__}")
        known = [k for k, _ in named]
        for pre in prefixes:
            if not any(k == pre or k.startswith(pre + ".") for k in known):
                raise ValueError(f"params names {pre!r}, which matches no trainable parameter; known: {known}")
        chosen = [
            (k, p) for k, p in named
            if id(p) in ids or any(k == pre or k.startswith(pre + ".") for pre in prefixes)
        ]
    if not chosen:
        raise ValueError("the params filter selects no trainable parameter; check the names, modules or callable")
    complex_ = [k for k, p in chosen if p.is_complex()]
    if complex_:
        raise TypeError(
            f"complex parameters ({', '.join(complex_)}): the MGS kernel J Jᵀ is defined for real parameters. "
            f"Store each as a real Parameter holding its real and imaginary parts (torch.view_as_complex of a "
            f"(..., 2) real tensor in forward), which gives K over both parts, or leave it out with params=..."
        )
    return dict(chosen)


def check_outputs(out: object, n: int) -> Tensor:
    """Validate a batched model output and return it; ``q`` is its per-sample size."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}, not a tensor; MGS needs the raw outputs (logits). "
            f"Pass logits= (a key, an index or a callable) to say where they are in what the model returns"
        )
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}, expected the batch ({n}) on dim 0: "
            f"shapes (n,), (n, q) or (n, *shape) are supported. Inputs need the batch on dim 0: for a single "
            f"unbatched sample add it with x.unsqueeze(0) (shape (1, ...)), so a sample of 4 features is (1, 4), not (4,)"
        )
    if not out.is_floating_point():
        raise TypeError(f"the model output has dtype {out.dtype}; raw floating-point outputs (logits) are needed")
    if out[0].numel() == 0:
        raise ValueError(f"the model output has shape {tuple(out.shape)}: zero outputs per sample")
    if torch.compiler.is_compiling() or capturing_cuda_graph(out.device):  # counting NaNs needs a host sync (asked
        # first whether it compiles: Dynamo cannot trace torch.cuda.is_current_stream_capturing, a graph break on CUDA)
        return out
    bad = (~torch.isfinite(out)).sum()
    if bad.item():
        raise NonFiniteOutputError(
            f"the model produced {int(bad)} non-finite outputs (NaN or inf) on this batch; "
            f"the kernel is undefined. Check the inputs and the weights (diverged training?)"
        )
    return out


def raise_integer_input_hint(inputs: tuple[Tensor, ...], err: RuntimeError, model: nn.Module | None = None) -> None:
    """Turn torch's dtype error for an integer input into one that says what to do (else return).

    Not for a model with an index-taking layer (``nn.Embedding``, ``nn.EmbeddingBag``): its integer
    inputs are right, and the dtype error is the model's own (raised unchanged).
    """
    if model is not None and any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in _walk.modules(model)):
        return
    ints = [(i, t.dtype) for i, t in enumerate(inputs) if not t.is_floating_point() and not t.is_complex()]
    if ints and "dtype" in str(err).lower():
        i, dtype = ints[0]
        raise TypeError(
            f"input {i} has the integer dtype {dtype} and the model's forward failed on it ({err}); convert it to "
            f"floating point, e.g. x.float(). Integer inputs are only for models that take indices (nn.Embedding)"
        ) from err
