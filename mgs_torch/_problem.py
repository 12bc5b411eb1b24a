"""The per-batch problem every engine works on: validated inputs, selected parameters, policies.

A :class:`KernelProblem` fixes what "the Jacobian" means for one call: which parameters are
differentiated (``params``), which tensors are held fixed (``frozen``: the other parameters and
cloned buffers), the inputs, and the model's output size ``q`` per sample. It is complete when
:func:`build_problem` returns it (a validation forward fixes ``q``) and frozen: engines only read it,
and a policy change (a model found to be random) makes a new problem with ``dataclasses.replace``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from . import _walk
from ._dtypes import as_dtype
from ._guards import BATCH_NORM_TYPES, cuda_devices, fresh_caches, restore_rng_states, rng_states, watch_reseeding
from ._io import ModelCall, OutputSelector, model_call
from ._validation import Inputs, ParamFilter, check_outputs, raise_integer_input_hint, select_parameters
from ._warnings import warn_once
from .op_fixes import ModelForwardError, _is_out_of_memory, autograd_in_forward_error, exact_computation

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
        outputs_checked: the outputs of this very batch were validated by :func:`build_problem`;
            False when ``q`` came from the cache of output shapes, and then the engine validates the
            outputs of its own forward (:meth:`check_outputs`).
        samples_interact: max_i ‖f(X)_i − f(x_i)‖_∞ / max(1, ‖f(X)‖_∞) when the batched forward differs
            from the forward of each sample alone (an op over the batch dimension), else None (see
            :func:`samples_interaction`).
        call_names: (attribute path, name in ``params``/``frozen``) for every distinct (module,
            attribute) holding a parameter or buffer (see :func:`functional_call_names`).
        mutated_buffers: the buffers the forward writes in place (spectral norm's power-iteration
            vectors in train mode, step counters). Every forward here starts from fresh copies of them,
            so each computes what ``model(x)`` computes now, from the model's state as it is.
        held_params: Parameters the forward reaches other than through its modules' attributes (kept in a
            list, a closure, ``functools.partial``), which ``functional_call`` cannot swap: every forward
            substitutes them op by op instead (see :class:`~mgs_torch.op_fixes.ExactOps`).
        call: how ``inputs`` call the model (positionally or as keywords, with the mapping's other
            values) and which of its outputs are the raw outputs (:class:`~mgs_torch._io.ModelCall`).
        reseeds: the forward sets the global random state itself (``torch.manual_seed``,
            ``torch.set_rng_state``, ``fork_rng``): its random draws, if any, cannot be reproduced per sample.
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
    outputs_checked: bool = True
    samples_interact: float | None = None
    call_names: tuple[tuple[str, str], ...] = ()
    mutated_buffers: frozenset[str] = frozenset()
    held_params: frozenset[str] = frozenset()
    call: ModelCall = ModelCall()
    reseeds: bool = False

    def check_outputs(self, out: Tensor) -> None:
        """Validate the (n, q') outputs of an engine's forward when :func:`build_problem` did not.

        Raises :class:`StaleOutputShape` when q' is not the cached q (the forward changed since),
        :class:`~mgs_torch.NonFiniteOutputError` for NaN/inf outputs.
        """
        if self.outputs_checked:
            return
        if out.dim() != 2 or out.shape[1] != self.q:
            raise StaleOutputShape
        check_outputs(out.detach(), self.n)

    def forward(
        self, params: dict[str, Tensor] | None = None, inputs: tuple[Tensor, ...] | None = None, fresh_buffers: bool = False
    ) -> Tensor:
        """Model outputs as an ``(batch, q)`` matrix, with ``params`` substituted for the selected ones.

        ``fresh_buffers`` clones the buffers first: inside a torch.func transform a module may then
        update them in place (train-mode BatchNorm does), which captured tensors do not allow.
        """
        x = self.inputs if inputs is None else inputs
        return self.raw_forward(params, x, fresh_buffers).reshape(x[0].shape[0], -1)

    def raw_forward(self, params=None, inputs=None, fresh_buffers: bool = False, exact_ops: bool = True, buffers=None):
        """The model's raw outputs, as ``self.call`` selects them from what it returns (not yet validated or flattened).

        The forward runs under :func:`~mgs_torch.op_fixes.exact_computation` (``exact_ops``): the ops and
        modules whose torch.func support is wrong are replaced by exact equivalents (only here, where the model's code runs).
        It starts from fresh copies of the buffers the forward writes (all buffers with ``fresh_buffers``);
        ``buffers`` substitutes given tensors for buffers by name.
        """
        state = {**self.frozen, **(self.params if params is None else params)}
        state.update({k: state[k].clone() for k in (self.buffer_names if fresh_buffers else self.mutated_buffers)})
        state.update(buffers or {})
        held = {}
        if self.held_params:
            originals = dict(_walk.named_parameters(self.model))
            held = {id(originals[k]): state[k] for k in self.held_params}
        with fresh_caches(self.model), exact_computation(self.model, held) if exact_ops else contextlib.nullcontext():
            return call_with(self.model, state, self.inputs if inputs is None else inputs, self.call_names, self.call)

    def plain_forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """``model(*inputs)`` itself — its own Parameters and buffers, no substitution, no op replacements — as a
        ``(batch, q)`` matrix: the independent side of the self-check (:mod:`mgs_torch.self_check`)."""
        own = dataclasses.replace(self.call, transformers=False)  # the model's own code, untouched
        with fresh_caches(self.model):  # what a first call computes (see _guards.fresh_caches)
            return own(self.model, inputs).reshape(inputs[0].shape[0], -1)


def functional_call_names(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(attribute path, canonical name) for each distinct (module, attribute) holding a tensor.

    The canonical name is the tensor's name in ``named_parameters()`` / ``named_buffers()`` (which
    list a shared tensor once). A module registered under two names (``nn.Sequential(block, block)``,
    ALBERT-style ``nn.ModuleList([layer] * k)``) is listed once; a parameter tied between two modules
    (``out.weight = emb.weight``) once per module. :func:`call_with` swaps exactly these attributes.
    """
    canonical = {id(t): k for k, t in _walk.named_parameters(model)}
    canonical.update({id(t): k for k, t in _walk.named_buffers(model)})
    names = []
    for mname, module in _walk.named_modules(model):  # each module object once
        prefix = f"{mname}." if mname else ""
        for local, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and id(tensor) in canonical:
                names.append((prefix + local, canonical[id(tensor)]))
    return tuple(names)


def call_with(model: nn.Module, state: dict[str, Tensor], inputs: tuple, names: tuple[tuple[str, str], ...],
              call: ModelCall = ModelCall()) -> Tensor:
    """The model's raw outputs on ``inputs`` (called and selected as ``call`` says) with ``state`` (keyed by
    canonical names) substituted for its tensors.

    Not :func:`torch.func.functional_call`'s own weight tying: for a module registered under two names
    it restores the aliases in the wrong order and leaves the module holding the substituted (detached)
    tensor instead of its Parameter, so training would silently stop updating that layer (PyTorch
    2.13; ``tests/test_upstream_bugs.py``). Each attribute is swapped exactly once here.
    """
    substitute = {path: state[name] for path, name in names if name in state}
    return call(lambda *args, **kwargs: functional_call(model, substitute, args, kwargs, tie_weights=False), inputs)


def _batch_statistics(m: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the batch's statistics, by PyTorch's own rule (``_BatchNorm.forward``):
    in training, or in eval mode when it holds no running statistics (``track_running_stats=False`` at
    construction). A flag set to False later leaves the statistics in place, and eval mode uses them."""
    return m.training or (m.running_mean is None and m.running_var is None)


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def draft_problem(
    model: nn.Module,
    inputs: Inputs,
    *,
    params: ParamFilter = None,
    dtype: torch.dtype | None = None,
    create_graph: bool = False,
    batch_norm: str = "eval",
    values: dict[str, Tensor] | None = None,
    logits: OutputSelector = None,
) -> KernelProblem:
    """The :class:`KernelProblem` of one call before any forward has run (``q`` = 0): the parameters, inputs and
    modes, with every check that needs no forward. Arguments as :func:`build_problem`."""
    dtype = as_dtype("dtype", dtype)  # a name ("float64") as a torch.dtype: the one rule, see options.py
    selected = select_parameters(model, params)
    x, call = model_call(model, inputs, logits)
    device = next(iter(selected.values())).device
    x = tuple(_cast(t.to(device), dtype) for t in x)
    if dtype is None:
        # compute in the parameters' dtype, as model(x) does: a floating input of another dtype fails there too
        pdtypes = {p.dtype for p in selected.values()}
        for i, t in enumerate(x):
            if t.is_floating_point() and len(pdtypes) == 1 and t.dtype not in pdtypes:
                (pdtype,) = pdtypes
                raise TypeError(
                    f"input {i if call.keys is None else repr(call.keys[i])} has dtype {t.dtype} but the model's parameters are {pdtype}, so model(x) would fail "
                    f"too; cast the input (x.to({pdtype})) or pass dtype={pdtype} (or another floating dtype) to "
                    f"compute the kernel in that dtype"
                )

    def prep(t: Tensor) -> Tensor:
        t = _cast(t, dtype)
        return t if create_graph else t.detach()

    values = values or {}
    chosen = {k: prep(values.get(k, p)) for k, p in selected.items()}
    frozen: dict[str, Tensor] = {k: prep(values.get(k, p)) for k, p in _walk.named_parameters(model) if k not in selected}
    # buffers are cloned: modules that update buffers in forward (BatchNorm running stats) write to copies
    frozen.update({k: _cast(b.detach().clone(), dtype) for k, b in _walk.named_buffers(model)})

    bns = [m for m in _walk.modules(model) if isinstance(m, BATCH_NORM_TYPES)]
    if batch_norm == "eval":
        for m in bns:
            if _batch_statistics(m):
                raise ValueError(
                    f"{type(m).__name__} without running statistics normalises with batch statistics even "
                    f"in eval mode, so a per-sample kernel is undefined; pass batch_norm='batch' for the "
                    f"Jacobian of the whole-batch function"
                )
    per_sample = not any(_batch_statistics(m) for m in bns)
    stochastic = any(isinstance(m, _DROPOUT_TYPES) and m.training and m.p > 0 for m in _walk.modules(model))

    owners = {}
    for mname, mod in _walk.named_modules(model):
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = mname

    buffers = frozenset(k for k, _ in _walk.named_buffers(model))
    return KernelProblem(model, x, chosen, frozen, x[0].shape[0], 0, (), per_sample, stochastic, owners, buffers,
                         call_names=functional_call_names(model), call=call)


def build_problem(
    model: nn.Module,
    inputs: Inputs,
    *,
    params: ParamFilter = None,
    dtype: torch.dtype | None = None,
    create_graph: bool = False,
    batch_norm: str = "eval",
    values: dict[str, Tensor] | None = None,
    revalidate: bool = False,
    logits: OutputSelector = None,
) -> KernelProblem:
    """Validate the model and inputs and assemble a :class:`KernelProblem`; call inside :func:`preserved_state`
    with options already checked by :class:`~mgs_torch.options.KernelOptions`.

    With ``create_graph=False`` every tensor is detached (no autograd graph is built); otherwise the
    selected and frozen parameters stay connected to the model's parameters, so the kernel can be
    back-propagated to all of them. ``values`` substitutes tensors for parameters by name.
    The validation forward that fixes ``q`` runs once per (model, signature); ``revalidate`` forces it.
    ``inputs`` and ``logits`` as :func:`mgs_torch._io.model_call` takes them.
    """
    draft = draft_problem(model, inputs, params=params, dtype=dtype, create_graph=create_graph, batch_norm=batch_norm,
                          values=values, logits=logits)
    n, per_sample = draft.n, draft.per_sample
    # what a cached structured plan may depend on: parameter identities, modes, input layout, dtype
    signature = (
        tuple((k, id(p), k in draft.params) for k, p in _walk.named_parameters(model)),
        tuple(m.training for m in _walk.modules(model)),
        tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in draft.inputs),
        as_dtype("dtype", dtype),
        forward_structure(model),
        draft.call.key,
    )
    draft = dataclasses.replace(draft, signature=signature)
    if n == 1 and not per_sample:
        _refuse_a_batch_of_one(draft)
    cached = None if revalidate else _OUTPUT_SHAPES.get(model, signature)
    checked = cached is None
    if checked:
        cached = validated_output_shape(draft)
        _OUTPUT_SHAPES.put(model, signature, cached)
    output_shape, interact, refusal, mutated, held, reseeds = cached
    if refusal is not None and per_sample:
        per_sample = False  # the only exact route left: the whole-batch function
        warn_once(
            f"whole-batch-{type(model).__qualname__}",
            f"{type(model).__name__}'s forward cannot run one sample at a time under torch.func's vmap ({refusal}), "
            f"so mgs_torch differentiates the whole-batch function instead: K[(i,a),(j,b)] = ∇θ f(X)_ia · ∇θ f(X)_jb, "
            f"exact for the function model(X) computes, but about n times the cost of the per-sample route. For the "
            f"per-sample route, write the data-dependent step with tensor ops: torch.where instead of a Python `if` "
            f"on a tensor, masks instead of boolean indexing, no .item().",
        )
    if interact is not None:
        if batch_norm == "batch":
            per_sample = False  # the whole-batch function, as for train-mode BatchNorm
        else:
            warn_once(
                f"samples-interact-{type(model).__qualname__}",
                f"{type(model).__name__}'s outputs on the batch differ from its outputs for each sample run "
                f"alone (largest difference {interact:.2e} of the outputs' scale): samples interact in its "
                f"forward (an op over the batch dimension: a mean, softmax, sort or normalisation over dim 0, "
                f"batch statistics). MGS's K is defined per sample, so mgs_torch differentiates each sample "
                f"run alone, which is not the function model(X) computes. Make forward act on each sample "
                f"independently, or pass batch_norm='batch' to differentiate the whole-batch function instead "
                f"(K[(i,a),(j,b)] = ∇θ f(X)_ia · ∇θ f(X)_jb; n times costlier).",
            )
    return dataclasses.replace(
        draft, q=max(1, math.prod(output_shape)), output_shape=output_shape, outputs_checked=checked,
        per_sample=per_sample, samples_interact=interact, mutated_buffers=mutated, held_params=held, reseeds=reseeds,
    )


def forward_structure(model: nn.Module) -> tuple:
    """What decides the function a forward computes besides parameters, modes and inputs: every module's
    identity and type (a parametrization changes the type), its forward and forward-pre hooks, a
    ``forward`` replaced on the instance, and the global module hooks. Part of every cache key, so a
    hook registered or a forward patched after a first call makes mgs_torch plan (and self-check) anew."""
    from torch.nn.modules import module as module_lib

    hooks = tuple(
        tuple(getattr(module_lib, name, {}))
        for name in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs")
    )
    return hooks, tuple(
        (id(m), type(m), tuple(m._forward_pre_hooks), tuple(m._forward_hooks), id(vars(m).get("forward")))
        for m in _walk.modules(model)
    )


class StaleOutputShape(Exception):
    """An engine's forward returned another number of outputs than the cached shape says: rebuild."""


class PerModelCache:
    """Values per model (held weakly) and key, at most ``size`` keys per model (the oldest goes first)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._store: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, key):
        return self._store.get(model, {}).get(key)

    def put(self, model: nn.Module, key, value) -> None:
        entries = self._store.setdefault(model, {})
        if key not in entries and len(entries) >= self.size:
            entries.pop(next(iter(entries)))
        entries[key] = value

    def pop(self, model: nn.Module, key) -> None:
        self._store.get(model, {}).pop(key, None)


# The per-sample output shape of a model, per problem signature: the validation forward runs once per
# shape (as the structured plans are cached); later calls validate the outputs of the engine's own forward.
_OUTPUT_SHAPES = PerModelCache()


def with_fresh_outputs(model: nn.Module, compute):
    """``compute(revalidate)``: first with cached output shapes, again (from the same random state) with
    a fresh validation forward if an engine found the cached shape stale."""
    rng = rng_states(model)
    try:
        return compute(False)
    except StaleOutputShape:
        restore_rng_states(rng)
        return compute(True)


def validated_output_shape(problem: KernelProblem) -> tuple:
    """One forward without graph or random-state change: validates the outputs; returns their
    per-sample shape, the two results of :func:`samples_interaction`, the buffers the forward
    writes in place (:attr:`KernelProblem.mutated_buffers`) and the Parameters it reaches other than through
    its modules' attributes (:attr:`KernelProblem.held_params`).

    The RNG is forked, so Dropout masks of a following forward are those ``model(X)`` would draw.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(problem.params.values())):
        buffers = {k: problem.frozen[k].clone() for k in problem.buffer_names}
        versions = {k: b._version for k, b in buffers.items()}
        spy = _HeldParameters({id(p): k for k, p in _walk.named_parameters(problem.model)})
        try:
            with spy, watch_reseeding() as reseeding:
                out = problem.raw_forward(buffers=buffers)
        except RuntimeError as err:
            raise_integer_input_hint(problem.inputs, err, problem.model)
            _raise_if_the_model_fails_alone(problem, err)
            raise
        mutated = frozenset(k for k, b in buffers.items() if b._version != versions[k])
        held = frozenset(spy.used)
        out = check_outputs(out, problem.n)
        problem = dataclasses.replace(problem, mutated_buffers=mutated, held_params=held)
        return (tuple(out.shape[1:]),) + samples_interaction(problem, out.reshape(problem.n, -1)) + (mutated, held, bool(reseeding))


class _HeldParameters(TorchFunctionMode):
    """Names the model's own Parameters that reach an op of a forward run through ``functional_call`` — which
    swaps the tensors held by module attributes, so those arrived another way (a list, a closure)."""

    def __init__(self, originals: dict[int, str]):
        super().__init__()
        self.originals, self.used = originals, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            for t in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(t, Tensor) and id(t) in self.originals:
                    self.used.add(self.originals[id(t)])
        return func(*args, **kwargs)


def _raise_if_the_model_fails_alone(problem: KernelProblem, err: RuntimeError) -> None:
    """The validation forward (no graph) failed: if the plain forward (no op replacements, no transform,
    gradients on as in training) fails too, the model's forward is at fault, and :class:`ModelForwardError`
    says so; if it runs only with gradients on, the forward differentiates with torch.autograd itself
    (:func:`~mgs_torch.op_fixes.autograd_in_forward_error`). Out-of-memory errors keep their type (see
    :func:`~mgs_torch.op_fixes.explained_failures`)."""
    if _is_out_of_memory(err):
        return
    with torch.enable_grad():
        try:
            problem.raw_forward(fresh_buffers=True, exact_ops=False)
        except RuntimeError as own:
            raise ModelForwardError(
                f"{type(problem.model).__name__}'s forward fails on these inputs before anything is differentiated, "
                f"as model(x) would: {type(own).__name__}: {str(own).strip().splitlines()[0]}. Check that model(x) "
                f"runs (input shapes and dtypes, parameters on one device and dtype)."
            ) from own
        try:
            problem.raw_forward(fresh_buffers=True)
        except RuntimeError:
            return  # not a matter of gradient mode: the caller explains the original error
    raise autograd_in_forward_error(problem.model, err) from err


def _refuse_a_batch_of_one(problem: KernelProblem) -> None:
    """A train-mode BatchNorm over one value per channel has no batch statistics: ``model(x)`` raises
    there, and so must MGS (the exact replacement of ``batch_norm`` in :class:`~mgs_torch.op_fixes.ExactOps`
    does not check it). Runs the model's own forward once, on copies of the buffers, for a batch of one only."""
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(problem.params.values())):
        try:
            problem.raw_forward(fresh_buffers=True, exact_ops=False)
        except ValueError as own:
            if "Expected more than 1 value per channel" not in str(own):
                raise
            raise ValueError(
                f"batch_norm='batch' on a batch of one sample: BatchNorm in training mode normalises with the "
                f"batch's statistics, which one sample does not have, and {type(problem.model).__name__}(x) raises "
                f"the same ({own}). Pass at least two samples, or use the running statistics: batch_norm='eval' "
                f"(the default) or model.eval()."
            ) from own


def _data_dependent(error: Exception) -> str | None:
    """The first line of a vmap refusal of a data-dependent forward (a Python ``if`` on a tensor,
    ``.item()``, boolean-mask indexing, ``nonzero``: anything whose result shape or control flow
    depends on values), else None."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    markers = ("data-dependent", ".item()", "dynamic shape")
    return first if first.startswith("vmap:") and any(m in text for m in markers) else None


def samples_interaction(problem: KernelProblem, batched: Tensor) -> tuple[float | None, str | None]:
    """Whether f(X)_i, the batched forward's outputs, equal f(x_i), each sample run alone (vmapped);
    and whether the forward can run alone at all.

    Returns ``(difference, refusal)``. ``difference`` is max |f(X)_i − f(x_i)| / max(1, max |f(X)|)
    when it exceeds √ε of the outputs' dtype (far above the rounding of batched against per-sample
    kernels), else None. Samples interact through any op over the batch dimension (x − x.mean(0),
    softmax(dim=0), batch statistics): the per-sample kernel then describes another function than the
    one trained. Not checked (None) for one sample, random forwards, whole-batch problems, or a
    forward vmap cannot run. ``refusal`` is vmap's reason when the forward is data-dependent and
    cannot run one sample at a time (see :func:`_data_dependent`); the engines then differentiate
    the whole-batch function.
    """
    if not problem.per_sample or not batched.is_floating_point():
        return None, None

    def alone(*xs: Tensor) -> Tensor:
        return problem.forward(inputs=tuple(x.unsqueeze(0) for x in xs)).squeeze(0)

    try:
        single = vmap(alone, randomness="different" if problem.stochastic else "error")(*problem.inputs)
    except Exception as error:  # noqa: BLE001 - random ops, unsupported layers: the engines explain those
        return None, _data_dependent(error)
    if problem.n < 2 or problem.stochastic or single.shape != batched.shape:
        return None, None
    scale = max(1.0, batched.abs().max().item())
    difference = (single.to(batched.dtype) - batched).abs().max().item() / scale
    tolerance = torch.finfo(batched.dtype).eps ** 0.5
    return (difference if not difference <= tolerance else None), None


Cotangents = Union[Tensor, Callable[[KernelProblem], Tensor]]


def one_hot_cotangents(problem: KernelProblem) -> Tensor:
    """e_a for every output a, broadcast over samples: (q, n, q); their row norms are diag K."""
    q = problem.q
    return torch.eye(q, device=problem.inputs[0].device).unsqueeze(1).expand(q, problem.n, q)
