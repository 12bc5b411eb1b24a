"""Structured engine: K and its diagonal from per-layer Gram products, no per-sample Jacobian.

For a layer with input a and output z, ∇_W f_o(x_i) is built from a_i and g_io = ∂f_o(x_i)/∂z_i
(Novak et al. 2022, "structured derivatives"; the "ghost norm" of per-sample-gradient libraries).
One forward adds a zero "tap" to each covered layer's output; ``torch.func.vjp`` with respect to
the taps, vmapped over the k cotangents, gives every g_l in one batched backward (k = q one-hot
cotangents for the exact kernel or trace, k = probes for Hutchinson). Layer rules
(:mod:`~mgs_torch.engines.layers`) turn (a_l, g_l) into factors whose Gram products are summed.

Cost: one forward, one backward at batch k·n (to activations only), and per layer
min(ghost, materialised) products (see :mod:`~mgs_torch.engines.factors`); double backward through
all of it is ordinary autograd. Parameters no rule covers exactly — unknown layer types, layers run
more than once per forward, parameters used outside their layer — are computed by the reference
engine for those parameters only and added (K is additive over parameter blocks). When that
fallback would meet active Dropout (its masks could not match) or the samples interact, the whole
computation goes to the reference engine instead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .._problem import Cotangents, KernelProblem, check_outputs, one_hot_cotangents, restore_rng_states, rng_states
from . import jacobian
from .layers import LAYER_RULES, LayerRule


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # local parameter name -> full name
    out_shape: tuple[int, ...] = ()
    clone_input: bool = False


@dataclass
class Plan:
    """Which layers the rules cover and which parameters go to the reference engine (and why)."""

    layers: list[_Layer]
    fallback: dict[str, str] = field(default_factory=dict)  # full parameter name -> reason
    q: int = 0
    output_shape: tuple[int, ...] = ()


class _ParameterUseMonitor(TorchFunctionMode):
    """Flags watched parameters that take part in an op outside their own layer's forward."""

    def __init__(self, watched: dict[int, str], stack: list[str]):
        super().__init__()
        self.watched, self.stack, self.foreign, self.active = watched, stack, set(), False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            for t in tree_flatten((args, kwargs))[0]:
                owner = self.watched.get(id(t)) if isinstance(t, Tensor) else None
                if owner is not None and (not self.stack or self.stack[-1] != owner):
                    self.foreign.add(owner)
        return func(*args, **kwargs)


def _layer_input(args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
    return args if args else tuple(kwargs.values())


def plan(problem: KernelProblem) -> Plan:
    """Run one forward without a graph to find the layers a rule covers exactly; validate outputs.

    The forward forks the RNG, so the computation's own forward draws the Dropout masks that
    ``model(X)`` would draw from the current random state.
    """
    model = problem.model
    candidates: dict[str, _Layer] = {}
    fallback: dict[str, str] = {}
    by_module: dict[str, dict[str, str]] = {}
    for full in problem.params:
        mname = problem.modules_of_params.get(full)
        if mname is None:  # tied parameter listed under another name
            fallback[full] = "shared with another module"
            continue
        by_module.setdefault(mname, {})[full[len(mname) + 1:] if mname else full] = full
    modules = dict(model.named_modules())
    for mname, local in by_module.items():
        module = modules[mname]
        rule = LAYER_RULES.get(type(module))
        reason = f"no rule for {type(module).__name__}" if rule is None else rule.unsupported(module)
        uncovered = [p for p in local if rule is not None and p not in rule.params]
        for p in uncovered:
            fallback[local[p]] = f"{type(module).__name__}.{p} is not covered by its rule"
        if reason is not None:
            fallback.update({full: reason for full in local.values()})
        else:
            candidates[mname] = _Layer(mname, module, rule, {p: f for p, f in local.items() if p not in uncovered})
    if not candidates:
        problem.validation_forward()
        return Plan([], fallback, problem.q, problem.output_shape)

    stack: list[str] = []
    calls: dict[str, int] = {}
    versions: dict[str, tuple] = {}
    watched = {id(problem.params[f]): layer.name for layer in candidates.values() for f in layer.names.values()}
    monitor = _ParameterUseMonitor(watched, stack)
    handles = []

    def pre(name):
        def hook(mod, args, kwargs):
            stack.append(name)
        return hook

    def post(name):
        def hook(mod, args, kwargs, out):
            stack.pop()
            if name in candidates:
                calls[name] = calls.get(name, 0) + 1
                x = _layer_input(args, kwargs)
                if isinstance(out, Tensor) and x:
                    candidates[name].out_shape = tuple(out.shape[1:])
                    versions[name] = (x[0], x[0]._version, isinstance(out, Tensor) and out.shape[:1] == x[0].shape[:1])
        return hook

    def root_pre(mod, args, kwargs):
        monitor.active = True

    def root_post(mod, args, kwargs, out):
        monitor.active = False

    try:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(post(name), with_kwargs=True))
        handles.append(model.register_forward_pre_hook(root_pre, with_kwargs=True, prepend=True))
        handles.append(model.register_forward_hook(root_post, with_kwargs=True))
        with monitor:
            problem.validation_forward()
    finally:
        for h in handles:
            h.remove()

    layers = []
    for name, layer in candidates.items():
        reason = None
        if calls.get(name, 0) != 1:
            reason = f"{type(layer.module).__name__} runs {calls.get(name, 0)} times per forward"
        elif name in monitor.foreign:
            reason = "its parameters are used outside its own forward"
        elif name not in versions or not versions[name][2]:
            reason = "its output is not a tensor with the batch on dim 0"
        if reason is not None:
            fallback.update({full: reason for full in layer.names.values()})
            continue
        x, v, _ = versions[name]
        layer.clone_input = x._version != v  # modified in place after the layer read it
        layers.append(layer)
    return Plan(layers, fallback, problem.q, problem.output_shape)


# Plans are cached per model and problem signature (parameter identities, train/eval flags, input
# layout, dtype): the discovery forward and its parameter-use monitor then run once per shape. A
# cached plan is re-checked on every use: each planned layer must run exactly once with its planned
# output shape, otherwise the plan is rebuilt.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Plan]]" = weakref.WeakKeyDictionary()
_MAX_PLANS_PER_MODEL = 16


class _StalePlan(Exception):
    """A cached plan no longer matches what the forward does."""


def _cached_plan(problem: KernelProblem) -> tuple[Plan, bool]:
    plans = _PLANS.setdefault(problem.model, {})
    p = plans.get(problem.signature)
    if p is not None:
        problem.q, problem.output_shape = p.q, p.output_shape
        return p, True
    p = plan(problem)
    if len(plans) >= _MAX_PLANS_PER_MODEL:
        plans.pop(next(iter(plans)))
    plans[problem.signature] = p
    return p, False


def _with_plan(problem: KernelProblem, compute):
    """``compute(plan, cached)``, rebuilding the plan once if a cached one turns out stale."""
    p, cached = _cached_plan(problem)
    rng = rng_states(problem.model)
    try:
        return compute(p, cached)
    except _StalePlan:
        _PLANS[problem.model].pop(problem.signature, None)
        restore_rng_states(rng)
        return compute(_cached_plan(problem)[0], False)


def _fallback_problem(problem: KernelProblem, p: Plan) -> KernelProblem:
    sub = problem.restrict(p.fallback)
    sub.strict_randomness = True  # random ops there must send the whole computation to the reference
    return sub


def _needs_reference(problem: KernelProblem, p: Plan) -> bool:
    return not p.layers or not problem.per_sample or (problem.stochastic and bool(p.fallback))


def _layer_gradients(problem: KernelProblem, p: Plan, cotangents: Cotangents, chunk_size: int | None, check: bool):
    """Saved tensors, output-gradients (k, n, *out) of every planned layer, and the cotangents used.

    ``check``: the plan came from the cache, so verify it against this forward and validate outputs.
    """
    dtype = next(iter(problem.params.values())).dtype
    device = problem.inputs[0].device
    taps = tuple(torch.zeros((), dtype=dtype, device=device).expand(problem.n, *layer.out_shape) for layer in p.layers)

    def forward(taps):
        saved: list = [None] * len(taps)
        handles = []

        def make_hook(i, layer):
            def hook(mod, args, kwargs, out):
                if saved[i] is not None or not isinstance(out, Tensor) or tuple(out.shape[1:]) != layer.out_shape:
                    raise _StalePlan
                x = _layer_input(args, kwargs)
                if layer.clone_input:
                    x = tuple(t.clone() for t in x)
                saved[i] = layer.rule.capture(mod, x)
                return layer.rule.output(mod, x, out) + taps[i]
            return hook

        try:
            for i, layer in enumerate(p.layers):
                handles.append(layer.module.register_forward_hook(make_hook(i, layer), with_kwargs=True))
            out = problem.forward()
        finally:
            for h in handles:
                h.remove()
        if any(s is None for s in saved):
            raise _StalePlan
        return out, tuple(saved)

    out, vjp_fn, saved = vjp(forward, taps, has_aux=True)
    if check:
        check_outputs(out, problem.n)
    cot = (cotangents(problem) if callable(cotangents) else cotangents).to(dtype)
    if cot.shape[0] == 1:  # a single probe needs no vmap
        grads = tuple(g.unsqueeze(0) for g in vjp_fn(cot[0])[0])
    else:
        grads = vmap(vjp_fn, chunk_size=chunk_size)(cot)[0]
    return saved, grads, cot


def _factors(problem, p, cotangents, chunk_size, check) -> tuple[list, Tensor]:
    """Every planned parameter's factor, and the cotangents (evaluated once q is known)."""
    saved, grads, cot = _layer_gradients(problem, p, cotangents, chunk_size, check)
    factors = []
    for layer, s, g in zip(p.layers, saved, grads):
        factors += layer.rule.factors(layer.module, s, g, set(layer.names)).values()
    return factors, cot


# Random ops that no Dropout module announced make the fallback (a strict sub-problem) raise; the
# shared retry then marks the problem stochastic and starts again, now on the reference alone, so
# covered and fallback parameters never see different masks.
@jacobian.retry_if_random
def row_sq_norms(problem: KernelProblem, cotangents: Cotangents, *, chunk_size: int | None = None) -> Tensor:
    """‖Σ_a c[k,i,a] ∇θ f_a(x_i)‖² per probe k and sample i, summed layer by layer: (k, n)."""

    def compute(p: Plan, cached: bool) -> Tensor:
        if _needs_reference(problem, p):
            return jacobian.row_sq_norms(problem, cotangents, chunk_size=chunk_size)
        factors, cot = _factors(problem, p, cotangents, chunk_size, cached)
        total = sum(f.row_sq_norms() for f in factors)
        if p.fallback:  # the same probes for the parameters the reference covers
            total = total + jacobian.row_sq_norms(_fallback_problem(problem, p), cot, chunk_size=chunk_size)
        return total

    return _with_plan(problem, compute)


@jacobian.retry_if_random
def kernel(problem: KernelProblem, *, outputs: str = "full", chunk_size: int | None = None) -> Tensor:
    """K (rows ordered (sample, output)) or its output-summed form, as a sum of per-layer Grams."""

    def compute(p: Plan, cached: bool) -> Tensor:
        if _needs_reference(problem, p):
            return jacobian.kernel(problem, outputs=outputs, chunk_size=chunk_size)
        factors, _ = _factors(problem, p, one_hot_cotangents, chunk_size, cached)
        total = sum(f.kernel(outputs) for f in factors)
        if p.fallback:
            total = total + jacobian.kernel(_fallback_problem(problem, p), outputs=outputs, chunk_size=chunk_size)
        return total

    return _with_plan(problem, compute)
