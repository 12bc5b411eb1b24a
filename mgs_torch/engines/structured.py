"""Structured engine: K and its diagonal from per-layer Gram products, no per-sample Jacobian.

For a layer with input a and output z, ∇_W f_o(x_i) is built from a_i and g_io = ∂f_o(x_i)/∂z_i
(Novak et al. 2022, "structured derivatives"; the "ghost norm" of per-sample-gradient libraries).
One forward, run per sample under ``vmap`` (so every layer sees one sample, whatever the model does
with the batch dimension), adds a zero "tap" to each covered layer's output; ``torch.func.vjp`` with
respect to the taps, vmapped over the k cotangents, gives every g_l in one batched backward (k = q one-hot
cotangents for the exact kernel or trace, k = probes for Hutchinson). Layer rules
(:mod:`~mgs_torch.engines.layers`) turn (a_l, g_l) into factors whose Gram products are summed.

Cost: one forward, one backward at batch k·n (to activations only), and per layer
min(ghost, materialised) products (see :mod:`~mgs_torch.engines.factors`); double backward through
all of it is ordinary autograd. Parameters no rule covers exactly — unknown layer types, layers run
more than once per forward, parameters used outside their layer — get their per-sample gradients
the reference's way, by autograd of the function itself, in the same pass: each such parameter θ is
replaced inside the per-sample forward by θ + t_i, t_i a zero "parameter tap" of θ's shape for sample
i, and the vjp with respect to t_i is ∇θ(c·f(x_i)) for every cotangent c, whatever the model does
with θ (K is additive over parameter blocks: their Gram joins the layers'). One forward and one
backward serve every parameter, so Dropout masks are the same for all of them. ``Plan.routes`` says
which route each parameter took and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .. import _walk
from .._guards import cuda_devices, restore_rng_states, rng_states

from .._problem import Cotangents, KernelProblem, PerModelCache, one_hot_cotangents
from . import jacobian
from .factors import DirectFactor, kernel_with_symmetric_gradient
from .layers import LAYER_RULES, LayerRule, _layer_input, adopt_named_rules


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # local parameter name -> full name
    out_shape: tuple[int, ...] = ()  # the layer's (first) tap for ONE sample (inside the per-sample vmap): its output
    tap_shapes: tuple[tuple[int, ...], ...] = ()  # every tap the rule adds, for ONE sample
    squeeze: bool = False  # drop the per-sample leading 1 before the rule sees the tensors
    clone_input: bool = False


@dataclass
class Plan:
    """Which layers the rules cover and which parameters go to the reference engine (and why)."""

    layers: list[_Layer]
    fallback: dict[str, str] = field(default_factory=dict)  # full parameter name -> reason
    registry_version: int = 0
    rowwise: bool = False  # the model provably keeps sample i in row i everywhere: the plain forward suffices
    self_checks: dict = field(default_factory=dict)  # what mgs_torch.self_check has checked of this plan

    def routes(self) -> dict[str, str]:
        """Parameter name -> how it is computed: ``"rule:<Type>"`` or ``"reference: <reason>"``."""
        out = {f: f"rule:{type(layer.module).__name__}" for layer in self.layers for f in layer.names.values()}
        out.update({f: f"reference: {why}" for f, why in self.fallback.items()})  # per-sample gradients by autograd
        return out


class _ParameterUseMonitor(TorchFunctionMode):
    """Flags watched parameters that take part in an op outside their own layer's forward."""

    def __init__(self, watched: dict[int, str], stack: list[str]):
        super().__init__()
        self.watched, self.stack, self.foreign, self.active = watched, stack, set(), False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            for t in _tensor_arguments(args, kwargs):
                owner = self.watched.get(id(t))
                if owner is not None and (not self.stack or self.stack[-1] != owner):
                    self.foreign.add(owner)
        return func(*args, **kwargs)


def _tensor_arguments(args: tuple, kwargs: dict):
    """The tensors among an op's arguments, one level of lists included (``torch.cat``, RNN weights)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor):
                    yield b


@contextlib.contextmanager
def _watch_parameter_use(model: nn.Module, problem: KernelProblem, layers: dict[str, _Layer]):
    """Yield a monitor whose ``foreign`` set names the layers whose parameters were used elsewhere."""
    stack: list[str] = []
    watched = {id(problem.params[f]): layer.name for layer in layers.values() for f in layer.names.values()}
    monitor = _ParameterUseMonitor(watched, stack)
    handles = []

    def pop(module, args, kwargs, out) -> None:
        stack.pop()

    try:
        for name, mod in _walk.named_modules(model):
            _register(handles, mod.register_forward_pre_hook(lambda m, a, k, name=name: stack.append(name), with_kwargs=True))
            _register(handles, mod.register_forward_hook(pop, with_kwargs=True, always_call=True))
        _register(handles, model.register_forward_pre_hook(lambda *a: setattr(monitor, "active", True), with_kwargs=True, prepend=True))
        _register(handles, model.register_forward_hook(lambda *a: setattr(monitor, "active", False), with_kwargs=True, always_call=True))
        with monitor:
            yield monitor
    finally:
        _remove(handles)


# ids of the hooks the engine registers itself (planning, taps, parameter-use watching): not the user's
_OWN_HOOKS: set[int] = set()


def _register(handles: list, handle) -> None:
    _OWN_HOOKS.add(handle.id)
    handles.append(handle)


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
        _OWN_HOOKS.discard(h.id)


def _foreign(hooks: dict) -> bool:
    return any(k not in _OWN_HOOKS for k in hooks)


def _module_reason(module: nn.Module) -> str | None:
    """Why a module's own state makes its rule inexact (hooks, a patched forward), or None.

    Asked when planning and again at every forward of a planned layer (a hook registered or a forward
    patched after planning makes the plan stale), so the engine's own hooks do not count."""
    if _foreign(module._forward_hooks) or _foreign(module._forward_pre_hooks):
        return f"{type(module).__name__} has forward hooks, which may change what the rule assumes"
    if "forward" in vars(module):
        return f"{type(module).__name__}.forward is replaced on the instance"
    if _foreign(nn.modules.module._global_forward_hooks) or _foreign(nn.modules.module._global_forward_pre_hooks):
        return "global module forward hooks are registered"
    return None


# Module types that map row i of their input to row i of their output and nothing else (the batch on
# dim 0, every sample alone): a plain nn.Sequential of these keeps every layer's rows sample-aligned.
_ROWWISE_TYPES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
    nn.GroupNorm, nn.Identity, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU,
    nn.Softplus, nn.Mish, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)


def _is_rowwise(module: nn.Module) -> bool:
    """True when ``module`` provably treats every row (sample) of its input on its own, by construction:
    an ``nn.Sequential`` (exact type) of such modules, :data:`_ROWWISE_TYPES` (exact types) and
    ``nn.Flatten`` keeping dim 0, with no hooks and no patched ``forward``. A static proof, so the
    structured engine may then skip its per-sample vmap (see :func:`_layer_gradients`)."""
    if _module_reason(module) is not None:  # hooks (its own or global) or a patched forward
        return False
    kind = type(module)
    if kind is nn.Sequential:
        return all(_is_rowwise(child) for child in module)
    if kind is nn.Flatten:
        return module.start_dim >= 1
    return kind in _ROWWISE_TYPES


def _per_sample(problem: KernelProblem, body):
    """``vmap`` over samples of ``body(extra, x_batch_of_one)``: each sample runs through the model alone.

    The returned function takes ``(extra, *inputs)``; ``extra`` (``None`` or tensors with the samples on
    dim 0, e.g. the taps) is vmapped along with the inputs.

    This is what makes the layer rules sound whatever the model does with the batch dimension
    (reshapes that fold a sequence into it, time-major layouts, permutations of the batch): inside
    the vmap every layer sees one sample's tensors only (logically, with a leading batch of 1), and
    vmap returns what the hooks captured sample-major. No shape comparison is involved.
    """

    def one(extra, *xs):
        return body(extra, tuple(x.unsqueeze(0) for x in xs))

    def run(extra, *inputs):
        in_dims = (None if extra is None else 0,) + (0,) * len(inputs)
        return vmap(one, in_dims=in_dims, randomness=jacobian._randomness(problem))(extra, *inputs)

    return run


def plan(problem: KernelProblem) -> Plan:
    """Find the layers a rule covers exactly; validate outputs (forwards without a graph).

    A layer is covered when its type has a rule (exact type), its configuration is supported, no
    hook or patched forward changes it, it runs exactly once per sample, its parameters are used
    nowhere else, and, for rules that need one row per sample (convolutions, BatchNorm, GroupNorm),
    it sees each sample as a single row. Everything else goes to the reference engine, with the reason.
    """
    model = problem.model
    candidates: dict[str, _Layer] = {}
    fallback: dict[str, str] = {}
    by_module: dict[str, dict[str, str]] = {}
    version = LAYER_RULES.version
    for full in problem.params:  # build_problem lists every parameter's own module (a tied one under its first name)
        mname = problem.modules_of_params[full]
        by_module.setdefault(mname, {})[full[len(mname) + 1:] if mname else full] = full
    modules = dict(_walk.named_modules(model))
    for mname, module in modules.items():  # children whose parameters the parent's forward uses (its rule covers them)
        rule = LAYER_RULES.get(type(module))
        for child in rule.children if rule is not None else ():
            owned = by_module.pop(f"{mname}.{child}" if mname else child, {})
            if owned:
                by_module.setdefault(mname, {}).update({f"{child}.{p}": full for p, full in owned.items()})
    for mname, local in by_module.items():
        module = modules[mname]
        rule = LAYER_RULES.get(type(module))
        reason = f"no rule for {type(module).__name__}" if rule is None else (rule.unsupported(module) or _module_reason(module))
        uncovered = [p for p in local if rule is not None and p not in rule.params]
        for p in uncovered:
            fallback[local[p]] = f"{type(module).__name__}.{p} is not covered by its rule"
        if reason is not None:
            fallback.update({full: reason for full in local.values() if full not in fallback})
        else:
            candidates[mname] = _Layer(mname, module, rule, {p: f for p, f in local.items() if p not in uncovered})
    if not candidates:
        return Plan([], fallback, version)

    calls: dict[str, int] = {}
    seen: dict[str, tuple] = {}
    refused: dict[str, str] = {}
    nested: set[str] = set()
    level: list = [None]
    handles = []

    def record(name):
        def hook(mod, args, kwargs, out):
            calls[name] = calls.get(name, 0) + 1
            if torch._C._functorch.maybe_current_level() != level[0]:
                # inside a transform the forward runs itself (torch.func.grad for forces = −∂E/∂x): the
                # parameters also enter through that inner backward, which no rule describes
                nested.add(name)
                return
            shapes = candidates[name].rule.tap_shapes(mod, args, kwargs, out)
            if isinstance(shapes, str):
                refused[name] = shapes
                return
            x = _layer_input(args, kwargs)
            first = x[0] if x and isinstance(x[0], Tensor) else None
            seen[name] = (tuple(first.shape) if first is not None else (), tuple(tuple(t) for t in shapes), first,
                          first._version if first is not None else 0)
        return hook

    def body(_, x):
        level[0] = torch._C._functorch.maybe_current_level()
        problem.raw_forward(None, x)
        return torch.zeros(())

    devices = cuda_devices(problem.params.values())
    try:
        for name, layer in candidates.items():
            _register(handles, layer.module.register_forward_hook(record(name), with_kwargs=True, prepend=True))
        with torch.no_grad(), torch.random.fork_rng(devices=devices), _watch_parameter_use(model, problem, candidates) as monitor:
            calls.clear()
            # random ops (FractionalMaxPool draws its regions even in eval mode) may run here: this
            # forward only records which layers run, and the engines' own vmaps detect randomness
            _per_sample(dataclasses.replace(problem, stochastic=True, reseeds=False), body)(None, *problem.inputs)
        per_sample_calls = dict(calls)
    finally:
        _remove(handles)

    layers = []
    for name, layer in candidates.items():
        reason = None
        n_calls = per_sample_calls.get(name, 0)
        if name in nested:
            reason = (f"{type(layer.module).__name__} runs inside a derivative the forward takes itself (torch.func.grad, "
                      f"vjp, jacrev), so its parameters also enter through that derivative")
        elif n_calls != 1:
            reason = f"{type(layer.module).__name__} runs {n_calls} times per forward"
        elif name in monitor.foreign:
            reason = "its parameters are used outside its own forward"
        elif name in refused:
            reason = refused[name]
        elif name not in seen:
            reason = "its input or output is not a tensor"
        else:
            in_shape, shapes, x, v = seen[name]
            out_shape = shapes[0]
            layer.out_shape, layer.tap_shapes = out_shape, shapes
            if not layer.rule.leading_dims_are_positions:
                if in_shape[:1] != (1,) or out_shape[:1] != (1,):
                    reason = (
                        f"{type(layer.module).__name__} sees one sample as {in_shape[0] if in_shape else 0} rows "
                        f"(e.g. a sequence folded into its batch dimension); its rule needs one row per sample"
                    )
                layer.squeeze = True
            layer.clone_input = x is not None and x._version != v  # modified in place after the layer read it
        if reason is not None:
            fallback.update({full: reason for full in layer.names.values()})
            continue
        layers.append(layer)
    # parameter taps are per sample: they need the per-sample forward
    rowwise = not fallback and len(problem.inputs) == 1 and _is_rowwise(model) and all(
        all(shape[:1] == (1,) for shape in layer.tap_shapes) for layer in layers
    )
    return Plan(layers, fallback, version, rowwise)


# Plans are cached per model and problem signature (parameter identities, train/eval flags, input
# layout, dtype) and per version of the rule registry (registering or removing a rule replans at
# once). A cached plan is re-checked on every use: each planned layer must run exactly once per
# sample with its planned output shape and its parameters must be used nowhere else, otherwise the
# plan is rebuilt (a forward whose structure depends on a Python flag).
_PLANS = PerModelCache()


class _StalePlan(Exception):
    """A cached plan no longer matches what the forward does."""


def cached_plan(problem: KernelProblem) -> tuple[Plan, bool]:
    """The plan for ``problem`` (built on first use) and whether it came from the cache."""
    adopt_named_rules(problem.model)
    key = (problem.signature, LAYER_RULES.version)
    p = _PLANS.get(problem.model, key)
    if p is not None:
        return p, True
    p = plan(problem)
    _PLANS.put(problem.model, key, p)
    return p, False


def _with_plan(problem: KernelProblem, compute):
    """``compute(plan, cached)``, rebuilding the plan once if a cached one turns out stale."""
    p, cached = cached_plan(problem)
    rng = rng_states(problem.model)
    try:
        return compute(p, cached)
    except _StalePlan:
        _PLANS.pop(problem.model, (problem.signature, LAYER_RULES.version))
        restore_rng_states(rng)
        return compute(cached_plan(problem)[0], False)


def _needs_reference(problem: KernelProblem, p: Plan) -> bool:
    """No layer covered, or parameter taps in a forward that writes buffers in place (spectral norm's power
    iteration): a tapped parameter is batched per sample, and an in-place write of such a value into an
    unbatched buffer is refused by vmap; the reference engine differentiates the parameters themselves."""
    return not p.layers or (bool(p.fallback) and bool(problem.mutated_buffers))


def _layer_gradients(problem: KernelProblem, p: Plan, cotangents: Cotangents, chunk_size: int | None, check: bool):
    """Saved tensors and output-gradients (k, n, *out) of every planned layer, the per-sample gradients
    (k, n, *shape) of every parameter no rule covers (``p.fallback``, in its order), and the cotangents used.

    The forward runs per sample under ``vmap`` (see :func:`_per_sample`), each covered layer's output
    plus a zero "tap", each uncovered parameter plus a zero "parameter tap" of its shape; the vjp with
    respect to all taps, vmapped over the k cotangents, gives every layer's output-gradients and every
    uncovered parameter's per-sample gradients in one batched backward. ``check``: the plan came from
    the cache, so watch for parameter use outside the planned layers (a forward that changed since planning).
    """
    dtype = next(iter(problem.params.values())).dtype
    device = problem.inputs[0].device
    n = problem.n
    # a row-wise model (Plan.rowwise) runs as one plain batched forward: row i of every layer is sample i
    shape_of = (lambda shape: shape[1:]) if p.rowwise else (lambda shape: shape)
    zero = torch.zeros((), dtype=dtype, device=device)
    taps = tuple(tuple(zero.expand(n, *shape_of(s)) for s in layer.tap_shapes) for layer in p.layers)
    tapped = list(p.fallback)
    param_taps = tuple(torch.zeros((), dtype=problem.params[f].dtype, device=device).expand(n, *problem.params[f].shape) for f in tapped)
    layers = {layer.name: layer for layer in p.layers}

    def forward(all_taps):
        def body(extra, x):
            tap, ptap = extra
            params = None
            if tapped:  # θ + t_i: the vjp in t_i is sample i's gradient in θ
                params = {**problem.params, **{f: problem.params[f] + t for f, t in zip(tapped, ptap)}}
            saved: list = [None] * len(tap)
            handles = []

            def make_hook(i, layer):
                expected = tuple((n, *shape_of(s)) if p.rowwise else s for s in layer.tap_shapes)

                def hook(mod, args, kwargs, out):
                    if saved[i] is not None or layer.rule.tap_shapes(mod, args, kwargs, out) != expected:
                        raise _StalePlan
                    if _module_reason(mod) is not None:  # a hook or patched forward since planning
                        raise _StalePlan
                    if layer.clone_input:
                        args = tuple(t.clone() if isinstance(t, Tensor) else t for t in args)
                        kwargs = {k: t.clone() if isinstance(t, Tensor) else t for k, t in kwargs.items()}
                    out, saved[i] = layer.rule.tapped(mod, args, kwargs, out, tap[i])
                    return out
                return hook

            try:
                for i, layer in enumerate(p.layers):
                    _register(handles, layer.module.register_forward_hook(make_hook(i, layer), with_kwargs=True, prepend=True))
                out = problem.raw_forward(params, x)
            finally:
                _remove(handles)
            if any(s is None for s in saved) or not isinstance(out, Tensor):
                raise _StalePlan
            return out.reshape(-1), tuple(saved)

        split = (all_taps[: len(taps)], all_taps[len(taps):])
        if p.rowwise:  # no parameter taps here (see plan)
            out, saved = body(split, problem.inputs)
            return out.reshape(n, -1), saved
        return _per_sample(problem, body)(split, *problem.inputs)

    if check and not p.rowwise:  # a row-wise Sequential runs only its own modules: no foreign use possible
        with _watch_parameter_use(problem.model, problem, layers) as monitor:
            out, vjp_fn, saved = vjp(forward, taps + param_taps, has_aux=True)
        if monitor.foreign:
            raise _StalePlan
    else:
        out, vjp_fn, saved = vjp(forward, taps + param_taps, has_aux=True)
    problem.check_outputs(out)
    cot = (cotangents(problem) if callable(cotangents) else cotangents).to(dtype)
    if cot.shape[0] == 1:  # a single probe needs no vmap
        grads = tree_map(lambda g: g.unsqueeze(0), vjp_fn(cot[0])[0])
    else:
        grads = vmap(vjp_fn, chunk_size=chunk_size)(cot)[0]
    grads, param_grads = grads[: len(taps)], grads[len(taps):]
    out_saved, out_grads = [], []
    for layer, s, g in zip(p.layers, saved, grads):
        if layer.squeeze and not p.rowwise:  # (n, 1, ...) -> (n, ...): the layer's own batch of one sample
            s = tuple(t.squeeze(1) if isinstance(t, Tensor) and t.dim() > 1 else t for t in s)
            g = tuple(t.squeeze(2) for t in g)
        out_saved.append(s)
        out_grads.append(g[0] if len(g) == 1 else g)  # a rule with one tap gets its gradient as it is
    return out_saved, out_grads, param_grads, cot


def _factors(problem, p, cotangents, chunk_size, check) -> tuple[list, Tensor]:
    """Every selected parameter's factor (layer rules, then the tapped parameters' per-sample gradients),
    and the cotangents (evaluated once q is known)."""
    saved, grads, param_grads, cot = _layer_gradients(problem, p, cotangents, chunk_size, check)
    factors = []
    for layer, s, g in zip(p.layers, saved, grads):
        factors += layer.rule.factors(layer.module, s, g, set(layer.names)).values()
    factors += [DirectFactor(g.reshape(*g.shape[:2], -1)) for g in param_grads]
    return factors, cot


def _merge_direct(factors: list) -> list:
    """Explicit per-sample gradients (biases, normalisation affines) side by side in one factor: the
    sum of their Grams is the Gram of their concatenation, one product instead of one per parameter."""
    direct = [f for f in factors if type(f) is DirectFactor]
    if len(direct) < 2:
        return factors
    merged = DirectFactor(torch.cat([f.grads.flatten(2) for f in direct], -1))
    return [f for f in factors if type(f) is not DirectFactor] + [merged]


# Random ops that no Dropout module announced make vmap raise; the shared retry then marks the problem
# stochastic and starts again (each sample then draws its own numbers, once, for every parameter).
@jacobian.retry_if_random
def row_sq_norms(problem: KernelProblem, cotangents: Cotangents, *, chunk_size: int | None = None) -> Tensor:
    """‖Σ_a c[k,i,a] ∇θ f_a(x_i)‖² per probe k and sample i, summed layer by layer: (k, n)."""

    if not problem.per_sample:
        return jacobian.row_sq_norms(problem, cotangents, chunk_size=chunk_size)

    def compute(p: Plan, cached: bool) -> Tensor:
        if _needs_reference(problem, p):
            return jacobian.row_sq_norms(problem, cotangents, chunk_size=chunk_size)
        factors, _ = _factors(problem, p, cotangents, chunk_size, cached)
        return sum(f.row_sq_norms() for f in factors)

    return _with_plan(problem, compute)


@jacobian.retry_if_random
def kernel(problem: KernelProblem, *, outputs: str = "full", chunk_size: int | None = None) -> Tensor:
    """K (rows ordered (sample, output)) or its output-summed form, as a sum of per-layer Grams."""

    if not problem.per_sample:
        return jacobian.kernel(problem, outputs=outputs, chunk_size=chunk_size)

    def compute(p: Plan, cached: bool) -> Tensor:
        if _needs_reference(problem, p):
            return jacobian.kernel(problem, outputs=outputs, chunk_size=chunk_size)
        factors, _ = _factors(problem, p, one_hot_cotangents, chunk_size, cached)
        merged = _merge_direct(factors)
        return kernel_with_symmetric_gradient(lambda: sum(f.kernel(outputs) for f in merged))

    return _with_plan(problem, compute)
