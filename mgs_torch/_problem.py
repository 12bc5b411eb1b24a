"""The per-batch setup every engine works on: validated inputs, selected parameters, policies.

A :class:`KernelProblem` fixes what "the Jacobian" means for one call: which parameters are
differentiated (``params``), which tensors are held fixed (``frozen``: the other parameters and
cloned buffers), the inputs, and the model's output size ``q`` per sample. It is complete when
:func:`build_problem` returns it (a validation forward fixes ``q``) and frozen: engines only read it,
and a policy change (a model found to be random) makes a new problem with ``dataclasses.replace``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._dtypes import as_dtype
from .op_fixes import ExactOps

Inputs = Union[Tensor, Sequence[Tensor]]
ParamFilter = Union[None, Callable[[str, nn.Parameter], bool], Iterable[Union[str, nn.Module, nn.Parameter]]]

class NonFiniteOutputError(ValueError):
    """The model produced NaN or inf on the batch, so the kernel is undefined (training diverged?)."""


OUTPUT_MODES = ("full", "sum")
BATCH_NORM_POLICIES = ("eval", "batch")

_BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class KernelProblem:
    """One mini-batch kernel computation, as engines see it.

    Attributes:
        model: the module; called through :func:`torch.func.functional_call` only.
        inputs: positional inputs, batch on dim 0 (already on the model's device and dtype).
        params: name -> tensor for the differentiated parameters (the columns of J).
        frozen: name -> tensor for everything else passed to ``functional_call``.
        n: number of samples; q: outputs per sample (the model's output flattened per sample).
        per_sample: True when each sample's outputs depend on that sample alone (the engines'
            vmap-over-samples route is exact); False when the batch interacts (train-mode BatchNorm
            under ``batch_norm="batch"``), which leaves only the whole-batch Jacobian.
        stochastic: True when a random layer is active in the current mode (Dropout, or a random op
            that vmap met: the engines then retry with a stochastic copy of the problem).
        strict_randomness: raise, rather than retry as stochastic, when vmap meets a random op
            (the structured engine's fallback, whose masks must match its own forward's).
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    params: dict[str, Tensor]
    frozen: dict[str, Tensor]
    n: int
    q: int
    output_shape: tuple[int, ...]
    per_sample: bool = True
    stochastic: bool = False
    modules_of_params: dict[str, str] = field(default_factory=dict)
    buffer_names: frozenset[str] = frozenset()
    signature: tuple = ()
    strict_randomness: bool = False

    def forward(
        self, params: dict[str, Tensor] | None = None, inputs: tuple[Tensor, ...] | None = None, fresh_buffers: bool = False
    ) -> Tensor:
        """Model outputs as an ``(batch, q)`` matrix, with ``params`` substituted for the selected ones.

        ``fresh_buffers`` clones the buffers first: inside a torch.func transform a module may then
        update them in place (train-mode BatchNorm does), which captured tensors do not allow.
        """
        x = self.inputs if inputs is None else inputs
        return self.raw_forward(params, x, fresh_buffers).reshape(x[0].shape[0], -1)

    def raw_forward(self, params=None, inputs=None, fresh_buffers: bool = False):
        """Whatever the model returns (not yet validated or flattened).

        The forward runs under :class:`~mgs_torch.op_fixes.ExactOps`: the ops whose torch.func support
        is wrong are replaced by exact equivalents (only here, where the model's code runs).
        """
        state = {**self.frozen, **(self.params if params is None else params)}
        if fresh_buffers:
            state.update({k: state[k].clone() for k in self.buffer_names})
        with ExactOps():
            return functional_call(self.model, state, self.inputs if inputs is None else inputs)

    def restrict(self, names: Iterable[str], *, strict_randomness: bool = False) -> "KernelProblem":
        """The same problem with only ``names`` differentiated; the rest join ``frozen``."""
        names = set(names)
        keep = {k: v for k, v in self.params.items() if k in names}
        rest = {k: v for k, v in self.params.items() if k not in names}
        return dataclasses.replace(
            self, params=keep, frozen={**self.frozen, **rest}, signature=self.signature + (tuple(sorted(names)),),
            strict_randomness=strict_randomness,
        )


# --------------------------------------------------------------------------------------------
# validation


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
            f"inputs must be a torch.Tensor or a non-empty tuple of tensors with the batch on dim 0 "
            f"(passed to the model as model(*inputs)); got {what}. If your data loader yields "
            f"(inputs, targets), pass only the inputs."
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


def check_input_arity(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Raise a clear TypeError when ``model.forward`` cannot take ``len(inputs)`` positional inputs.

    The common case: a data loader's ``(x, y)`` batch passed whole, where ``model(x, y)`` would fail with
    Python's "takes 2 positional arguments but 3 were given".
    """
    forward = getattr(model, "forward", None)
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):  # builtins, C++ modules: let the forward speak for itself
        return
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(inputs) > len(positional):
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(positional)} input(s) "
            f"({', '.join(p.name for p in positional) or 'none'}) but {len(inputs)} tensors were given as inputs; "
            f"a tuple is passed as model(*inputs). If your data loader yields (inputs, targets), pass only the inputs"
        )


def select_parameters(model: nn.Module, params: ParamFilter = None) -> dict[str, nn.Parameter]:
    """The trainable parameters (``requires_grad``) that ``params`` selects, by name.

    ``params`` is ``None`` (all trainable parameters), a callable ``(name, parameter) -> bool``, or an
    iterable mixing parameter names, name prefixes (``"fc1"`` selects ``"fc1.weight"``), submodules and
    parameter objects.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
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
    return dict(chosen)


def check_outputs(out: object, n: int) -> Tensor:
    """Validate a batched model output and return it; ``q`` is its per-sample size."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}, not a tensor; MGS needs the raw outputs (logits). "
            f"Wrap the model so that forward returns one tensor of shape (batch, ...)"
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
    bad = (~torch.isfinite(out)).sum()
    if bad.item():
        raise NonFiniteOutputError(
            f"the model produced {int(bad)} non-finite outputs (NaN or inf) on this batch; "
            f"the kernel is undefined. Check the inputs and the weights (diverged training?)"
        )
    return out


# --------------------------------------------------------------------------------------------
# building a problem without side effects


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def rng_states(model: nn.Module) -> list[tuple[str, int, Tensor]]:
    """The random states a forward of ``model`` draws from: the CPU's and its CUDA devices'."""
    states = [("cpu", 0, torch.get_rng_state())]
    for index in cuda_devices(model.parameters()):
        states.append(("cuda", index, torch.cuda.get_rng_state(index)))
    return states


def restore_rng_states(states: list[tuple[str, int, Tensor]]) -> None:
    for kind, index, state in states:
        torch.set_rng_state(state) if kind == "cpu" else torch.cuda.set_rng_state(state, index)


@contextlib.contextmanager
def preserved_state(model: nn.Module, batch_norm: str) -> Iterator[None]:
    """Run a kernel computation without side effects on ``model`` or the global RNG.

    Train/eval flags are restored, BatchNorm layers are in eval mode under ``batch_norm="eval"``,
    autocast is off (the kernel is computed in the parameters' dtype or the requested one), and the
    global random state (CPU and the model's CUDA device) is forked, so Dropout masks drawn here do
    not shift the training run's random stream.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = [(m, m.training) for m in model.modules()]
    devices = cuda_devices(model.parameters())
    try:
        if batch_norm == "eval":
            for m in model.modules():
                if isinstance(m, _BATCH_NORM_TYPES):
                    m.eval()
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            for dev in ("cpu", "cuda"):
                if dev == "cpu" or devices:
                    stack.enter_context(torch.autocast(dev, enabled=False))
            stack.enter_context(warnings.catch_warnings())
            # vmap's fallback for ops without a batching rule is correct, only slower: not the user's concern
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def build_problem(
    model: nn.Module,
    inputs: Inputs,
    *,
    params: ParamFilter = None,
    dtype: torch.dtype | None = None,
    create_graph: bool = False,
    batch_norm: str = "eval",
    values: dict[str, Tensor] | None = None,
) -> KernelProblem:
    """Validate the model and inputs and assemble a :class:`KernelProblem`; call inside :func:`preserved_state`
    with options already checked by :class:`~mgs_torch.options.KernelOptions`.

    With ``create_graph=False`` every tensor is detached (no autograd graph is built); otherwise the
    selected and frozen parameters stay connected to the model's parameters, so the kernel can be
    back-propagated to all of them. ``values`` substitutes tensors for parameters by name.
    """
    dtype = as_dtype("dtype", dtype)  # a name ("float64") as a torch.dtype: the one rule, see options.py
    selected = select_parameters(model, params)
    x = as_input_tuple(inputs)
    check_input_arity(model, x)
    device = next(iter(selected.values())).device
    x = tuple(_cast(t.to(device), dtype) for t in x)
    if dtype is None:
        # compute in the parameters' dtype, as model(x) does: a floating input of another dtype fails there too
        pdtypes = {p.dtype for p in selected.values()}
        for i, t in enumerate(x):
            if t.is_floating_point() and len(pdtypes) == 1 and t.dtype not in pdtypes:
                (pdtype,) = pdtypes
                raise TypeError(
                    f"input {i} has dtype {t.dtype} but the model's parameters are {pdtype}, so model(x) would fail "
                    f"too; cast the input (x.to({pdtype})) or pass dtype={pdtype} (or another floating dtype) to "
                    f"compute the kernel in that dtype"
                )

    def prep(t: Tensor) -> Tensor:
        t = _cast(t, dtype)
        return t if create_graph else t.detach()

    values = values or {}
    chosen = {k: prep(values.get(k, p)) for k, p in selected.items()}
    frozen: dict[str, Tensor] = {k: prep(values.get(k, p)) for k, p in model.named_parameters() if k not in selected}
    # buffers are cloned: modules that update buffers in forward (BatchNorm running stats) write to copies
    frozen.update({k: _cast(b.detach().clone(), dtype) for k, b in model.named_buffers()})

    bns = [m for m in model.modules() if isinstance(m, _BATCH_NORM_TYPES)]
    if batch_norm == "eval":
        for m in bns:
            if not m.track_running_stats or m.running_mean is None:
                raise ValueError(
                    f"{type(m).__name__} without running statistics normalises with batch statistics even "
                    f"in eval mode, so a per-sample kernel is undefined; pass batch_norm='batch' for the "
                    f"Jacobian of the whole-batch function"
                )
    per_sample = not any(m.training or not m.track_running_stats or m.running_mean is None for m in bns)
    stochastic = any(isinstance(m, _DROPOUT_TYPES) and m.training and m.p > 0 for m in model.modules())

    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = mname

    buffers = frozenset(k for k, _ in model.named_buffers())
    # what a cached structured plan may depend on: parameter identities, modes, input layout, dtype
    signature = (
        tuple((k, id(p), k in selected) for k, p in model.named_parameters()),
        tuple(m.training for m in model.modules()),
        tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in x),
        dtype,
    )
    n = x[0].shape[0]
    draft = KernelProblem(model, x, chosen, frozen, n, 0, (), per_sample, stochastic, owners, buffers, signature)
    output_shape = validated_output_shape(draft)
    return dataclasses.replace(draft, q=max(1, math.prod(output_shape)), output_shape=output_shape)


def cuda_devices(tensors: Iterable[Tensor]) -> list[int]:
    """The CUDA device indices among ``tensors`` (what a random-state fork must cover)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def validated_output_shape(problem: KernelProblem) -> tuple[int, ...]:
    """One forward without graph or random-state change: validates the outputs, returns their per-sample shape.

    The RNG is forked, so Dropout masks of a following forward are those ``model(X)`` would draw.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(problem.params.values())):
        try:
            out = problem.raw_forward()
        except RuntimeError as err:
            raise_integer_input_hint(problem.inputs, err)
            raise
        return tuple(check_outputs(out, problem.n).shape[1:])


Cotangents = Union[Tensor, Callable[[KernelProblem], Tensor]]


def one_hot_cotangents(problem: KernelProblem) -> Tensor:
    """e_a for every output a, broadcast over samples: (q, n, q); their row norms are diag K."""
    q = problem.q
    return torch.eye(q, device=problem.inputs[0].device).unsqueeze(1).expand(q, problem.n, q)


def raise_integer_input_hint(inputs: tuple[Tensor, ...], err: RuntimeError) -> None:
    """Turn torch's dtype error for an integer input into one that says what to do (else return)."""
    ints = [(i, t.dtype) for i, t in enumerate(inputs) if not t.is_floating_point() and not t.is_complex()]
    if ints and "dtype" in str(err).lower():
        i, dtype = ints[0]
        raise TypeError(
            f"input {i} has the integer dtype {dtype} and the model's forward failed on it ({err}); convert it to "
            f"floating point, e.g. x.float(). Integer inputs are only for models that take indices (nn.Embedding)"
        ) from err
