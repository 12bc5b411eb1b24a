"""The self-check on first use: mgs_torch compares a new route with a plain autograd loop before trusting it.

mgs_torch computes J with torch.func transforms, layer rules and exact replacements of ops torch.func gets
wrong; each is tested, but a model can still combine them in a way no test met. So the first time a route is
used for a (model, input signature) — and again whenever it is rebuilt: a plan gone stale, a hook registered,
a forward patched, a rule registered — it is checked on ``SAMPLES`` samples of the batch against a plain
per-sample autograd loop that calls the model itself on each sample and differentiates with respect to its own
Parameters — no ``functional_call``, no op replacements; only PyTorch's math attention backend (for double
backward) and the definitions of :mod:`mgs_torch._plain_loop` where PyTorch's own derivative is wrong:

* rows: for ``PROBES`` Gaussian output directions c per sample, ‖Jᵢᵀc‖² from the engine against ‖gᵢ‖², where
  gᵢ = ∇θ (c · f(xᵢ)) is one ``torch.autograd.grad`` of sample i's own forward;
* kernel (:func:`~mgs_torch.mgs_kernel`, the log-det penalty): the engine's K on those samples contracted with
  the same directions, cᵢᵀ K_ij cⱼ, against gᵢ · gⱼ — its cross-sample entries too;
* gradient (penalties): the whole gradient of the checked quantity with respect to θ, through the engine,
  against the loop's double backward (central differences of the loop in float64 where PyTorch has no double
  backward; not checked below float64 there).

Errors are relative (‖a − b‖ / ‖b‖), compared with a tolerance set by the least precise dtype the forward
computes in: 10⁻⁶ in float64, 10⁻³ in float32; nothing is checked in half precision. TF32 (on by default for
cuDNN convolutions on CUDA, and for matrix products where the user enabled it) keeps only 10 bits of mantissa, so
its round-off alone reaches 10⁻³ (so does oneDNN's bfloat16 for float32 products on CPUs that have it): the check runs
both sides in full float32 (:func:`_full_float32`), which tests the same maths, and the computation after it keeps
the user's settings. On a mismatch of a route
that uses layer rules, the reference engine is checked too: if it agrees, it is used for this model from then on
(one warning); otherwise :class:`SelfCheckError` is raised with the report. Forwards with active Dropout are
checked with its probability set to 0 (both sides deterministic); other random ops make the check inconclusive
(skipped, reported). Cost: ``SAMPLES``·``PROBES`` backward passes of one sample and the engine on ``SAMPLES``
samples, once per route (``benchmarks/bench_self_check.py`` measures it). Switch it off with
:func:`set_self_check` or the environment variable ``MGS_TORCH_SELF_CHECK=0``; :func:`self_check_reports`
lists what was checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._guards import restore_rng_states, rng_states
from ._plain_loop import FloatingDtypes, LoopFormulas, lowest_precision
from ._problem import _DROPOUT_TYPES, KernelProblem, PerModelCache
from ._warnings import warn_once
from .engines import jacobian, structured
from .engines.jacobian import is_randomness_error
from .op_fixes import SelfCheckError, _is_out_of_memory, exact_forwards

__all__ = [
    "SelfCheckError", "SelfCheckReport", "set_self_check", "self_check_enabled", "self_check_disabled", "self_check_reports",
]

SAMPLES = 2
PROBES = 1
TOLERANCES = {torch.float64: 1e-6, torch.float32: 1e-3}
FINITE_DIFFERENCE_TOLERANCE = 1e-5

_enabled = os.environ.get("MGS_TORCH_SELF_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def set_self_check(enabled: bool) -> None:
    """Switch the self-check on first use on or off for this process (default: on, unless the environment
    variable ``MGS_TORCH_SELF_CHECK=0``)."""
    global _enabled
    _enabled = bool(enabled)


def self_check_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def self_check_disabled() -> Iterator[None]:
    """No self-check inside the block (restored after)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@dataclass
class SelfCheckReport:
    """One self-check: what was compared, how far apart, and what mgs_torch did about it.

    ``outcome``: "ok", "switched to the reference engine", "failed", or "skipped: <why>"."""

    model: str
    route: str
    what: tuple[str, ...]
    samples: int
    probes: int
    dtype: torch.dtype | None = None
    tolerance: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    gradient_check: str = "not asked"
    outcome: str = "ok"
    seconds: float = 0.0

    def __str__(self) -> str:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items()) or "none measured"
        return (
            f"mgs_torch self-check of {self.model} ({self.route}; {', '.join(self.what)} on {self.samples} samples × "
            f"{self.probes} probes, {str(self.dtype).replace('torch.', '')}, tolerance {self.tolerance}): relative errors "
            f"{errors}; gradient {self.gradient_check}; {self.outcome} ({self.seconds * 1e3:.0f} ms)"
        )


# route key -> what has been checked; the structured engine's plans carry their own (a rebuilt plan is new)
_CHECKED = PerModelCache(size=64)
# weak keys: a model collected takes its reports with it (keyed by id(), a new model built at a dead one's
# address showed that model's reports)
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, list[SelfCheckReport]]" = weakref.WeakKeyDictionary()
_MAX_REPORTS = 32


def self_check_reports(model: nn.Module) -> list[SelfCheckReport]:
    """The self-checks run on ``model`` in this process, oldest first (at most the last 32)."""
    return list(_REPORTS.get(model, []))


def _record(model: nn.Module, report: SelfCheckReport) -> None:
    reports = _REPORTS.setdefault(model, [])
    reports.append(report)
    del reports[:-_MAX_REPORTS]


def checked_engine(problem: KernelProblem, engine, *, kernel: bool, gradient: bool):
    """The engine to use for ``problem``: ``engine`` once its route has passed the self-check (run now if it has
    not: ``kernel`` asks for the cross-sample check, ``gradient`` for the penalty gradient's), the reference
    engine where the rules failed it and the reference passed, or :class:`SelfCheckError`."""
    if not _enabled:
        return engine
    what = ("rows",) + (("kernel",) if kernel else ()) + (("gradient",) if gradient else ())
    store, key = _store_for(problem, engine)
    if store.get("overruled"):
        return jacobian
    missing = tuple(w for w in what if w not in store)
    if not missing:
        return engine
    report = _run(problem, engine, what)
    if report.outcome == "ok" or report.outcome.startswith("skipped"):
        store.update(dict.fromkeys(what, True))
        _save(problem, key, store)
        _record(problem.model, report)
        return engine
    if engine is not jacobian and problem.per_sample:
        retry = _run(problem, jacobian, what)
        report.errors.update({f"reference {k}": v for k, v in retry.errors.items()})
        report.seconds += retry.seconds
        if retry.outcome == "ok":
            report.outcome = "switched to the reference engine"
            store["overruled"] = True
            _save(problem, key, store)
            _record(problem.model, report)
            warn_once(
                f"self-check-switched-{type(problem.model).__qualname__}",
                f"{report}\nmgs_torch's layer rules disagree with a plain autograd loop on this model, and its reference "
                f"engine agrees: it uses the reference engine for this model from now on (exact, slower). Please report "
                f"this with the output of mgs_torch.verify(model, x).",
            )
            return jacobian
    report.outcome = "failed"
    _record(problem.model, report)
    raise SelfCheckError(
        f"{report}\nmgs_torch's result on this model disagrees with a plain per-sample autograd loop of the model's own "
        f"ops, so it is not returned. This is a bug in mgs_torch or PyTorch: please report it with the output of "
        f"mgs_torch.verify(model, x). mgs_torch.set_self_check(False) computes it anyway.",
        report,
    )


def _store_for(problem: KernelProblem, engine) -> tuple[dict, tuple]:
    """Where what has been checked for this route is kept: on the structured plan, else per route key."""
    key = (problem.signature, engine.__name__, problem.per_sample)
    if engine is structured and problem.per_sample:
        plan = structured.cached_plan(problem)[0]
        return plan.self_checks, key
    store = _CHECKED.get(problem.model, key)
    return (dict(store) if store else {}), key


def _save(problem: KernelProblem, key: tuple, store: dict) -> None:
    if not (key[1] == structured.__name__ and problem.per_sample):
        _CHECKED.put(problem.model, key, store)


# ------------------------------------------------------------------------------------------------ the check


def _run(problem: KernelProblem, engine, what: tuple[str, ...]) -> SelfCheckReport:
    start = time.perf_counter()
    name = engine.__name__.rsplit(".", 1)[-1] + ("" if problem.per_sample else ", whole batch")
    report = SelfCheckReport(type(problem.model).__name__, name, what, min(SAMPLES, problem.n), PROBES)
    rng = rng_states(problem.model)  # the check draws nothing the computation after it would see
    try:
        with torch.enable_grad(), _deterministic(problem) as det, _restored_buffers(problem.model), _full_float32():
            _compare(det, engine, what, report)
    except _Inconclusive as why:
        report.outcome = f"skipped: {why}"
    except (RuntimeError, NotImplementedError) as error:
        if is_randomness_error(error):
            report.outcome = "skipped: the forward draws random numbers outside Dropout modules"
        elif _is_out_of_memory(error):
            report.outcome = "skipped: out of memory"
        else:
            raise
    finally:
        restore_rng_states(rng)
    report.seconds = time.perf_counter() - start
    return report


class _Inconclusive(Exception):
    pass


# (module, attribute) of each per-op float32 precision setting: cuBLAS, cuDNN and oneDNN (CPU)
_FP32_PRECISION_SETTINGS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"),
                            ("mkldnn", "conv"), ("mkldnn", "rnn"))


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Float32 ops in full float32 inside (TF32 off on CUDA, bf16 off on oneDNN CPUs); the settings restored after.

    On an H200 with PyTorch's defaults (TF32 convolutions) both the engine and the autograd loop differed from
    full float32 by about 1.6·10⁻³ on a CIFAR-sized CNN's penalty gradient, above the float32 tolerance, so the
    check failed where nothing was wrong (benchmarks/RESULTS.md, the GPU run of issue #22);
    ``torch.set_float32_matmul_precision("medium")`` lets oneDNN compute CPU matrix products in bfloat16 the same
    way. The per-op settings (``torch.backends.cudnn.conv.fp32_precision`` …, PyTorch ≥ 2.9) are used, never the
    legacy ``allow_tf32`` flags, whose getters raise once the per-op settings disagree."""
    settings = [getattr(getattr(torch.backends, module), op) for module, op in _FP32_PRECISION_SETTINGS]
    saved = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = "ieee"
        yield
    finally:
        for setting, value in zip(settings, saved):
            setting.fp32_precision = value


@contextlib.contextmanager
def _deterministic(problem: KernelProblem) -> Iterator[KernelProblem]:
    """The problem with active Dropout's probability at 0 (both sides then compute one function), strict about
    any other random op (which makes the check inconclusive)."""
    dropouts = [m for m in problem.model.modules() if isinstance(m, _DROPOUT_TYPES) and m.training and m.p > 0]
    saved = [m.p for m in dropouts]
    try:
        for m in dropouts:
            m.p = 0.0
        yield dataclasses.replace(problem, stochastic=False, strict_randomness=True)
    finally:
        for m, p in zip(dropouts, saved):
            m.p = p


_SAVED_BUFFERS: dict[int, list] = {}


@contextlib.contextmanager
def _restored_buffers(model: nn.Module) -> Iterator[None]:
    """The loop calls the model itself, whose forward may write its buffers (running statistics, power
    iterations): they are put back before every sample's forward (:func:`_restore`) and at the end."""
    _SAVED_BUFFERS[id(model)] = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        _restore(model)
        _SAVED_BUFFERS.pop(id(model), None)


def _restore(model: nn.Module) -> None:
    """Put back the buffers a forward wrote, only those (compared by value: PyTorch's batch_norm kernel updates
    running statistics without a version bump), and without a version bump either (through ``.data``, as that
    kernel writes them): a graph that saved the buffer — an earlier sample's, or the user's own training forward
    whose loss the penalty joins (BatchNorm saves its running statistics in both modes) — would otherwise refuse
    its backward ("modified by an inplace operation"). The values are those it saved."""
    for b, value in _SAVED_BUFFERS.get(id(model), []):
        if not torch.equal(b, value):
            b.data.copy_(value)


def _compare(problem: KernelProblem, engine, what: tuple[str, ...], report: SelfCheckReport) -> None:
    dtype = next(iter(problem.params.values())).dtype
    s = report.samples
    sub = problem if not problem.per_sample else dataclasses.replace(problem, inputs=tuple(x[:s] for x in problem.inputs), n=s)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in problem.params.items()}
    sub = dataclasses.replace(sub, params=leaves)
    generator = torch.Generator().manual_seed(0)
    cot = torch.randn(PROBES, sub.n, problem.q, generator=generator, dtype=torch.float64).to(dtype=dtype, device=problem.inputs[0].device)
    if not problem.per_sample:  # the whole-batch function: probes on the first s samples only
        cot[:, s:] = 0

    gradient = "gradient" in what
    real = _real_parameters(problem)
    # J restricted to some parameters (params=) can be ~0 there while the rest of J is not (a norm of two features
    # makes earlier layers flat): then both sides hold round-off, and errors are measured against the whole J's
    # size — tolerance² of it, as the tests do — never against the round-off itself. One loop serves both: it
    # differentiates every trainable parameter, and the selected ones are read from it.
    everything = [p for p in problem.model.parameters() if p.requires_grad]
    restricted = len(everything) != len(real)
    loop, lowest = _loop_gradients(sub, everything if restricted else real, cot, s, create_graph=gradient)
    report.dtype = lowest
    report.tolerance = TOLERANCES.get(lowest)
    if report.tolerance is None:
        raise _Inconclusive(f"the forward computes in {lowest}, too coarse to compare")
    floors = {"rows": 0.0, "kernel": 0.0}
    if restricted:
        full = torch.stack([torch.cat([g.detach().reshape(-1) for g in row]) for row in loop]).to(dtype)
        floors = {"rows": report.tolerance**2 * float((full**2).sum(1).norm()),
                  "kernel": report.tolerance**2 * float((full @ full.T).norm())}
        position = {id(p): i for i, p in enumerate(everything)}
        loop = [tuple(row[position[id(p)]] for p in real) for row in loop]
    flat = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in loop]).to(dtype)  # (PROBES·s, p), probe-major
    theirs_rows = (flat.detach() ** 2).sum(1).reshape(PROBES, s)
    ours_rows = engine.row_sq_norms(sub, cot)[:, :s]
    report.errors["rows"] = _relative(ours_rows.detach(), theirs_rows, floors["rows"])
    if restricted and float(theirs_rows.norm()) <= floors["rows"]:
        gradient = False  # the selected parameters' part of J is round-off: its gradient says nothing
        report.gradient_check = "not checked (the selected parameters' gradients are at round-off level)"
    quantities = [(ours_rows.sum(), (flat**2).sum())]
    if "kernel" in what:
        K = engine.kernel(sub)
        n, q = sub.n, problem.q
        C = torch.zeros(PROBES * s, n * q, dtype=K.dtype, device=K.device)
        for k in range(PROBES):
            for i in range(s):
                C[k * s + i, i * q : (i + 1) * q] = cot[k, i]
        ours_kernel = C @ K @ C.T
        theirs_kernel = flat @ flat.T
        report.errors["kernel"] = _relative(ours_kernel.detach(), theirs_kernel.detach(), floors["kernel"])
        weights = torch.randn(ours_kernel.shape, generator=generator, dtype=torch.float64).to(ours_kernel)
        quantities.append(((ours_kernel * weights).sum(), (theirs_kernel * weights).sum()))
    if gradient:
        report.gradient_check = _compare_gradients(sub, real, cot, s, quantities, list(leaves.values()), report)
    if any(e > report.tolerance for e in report.errors.values()):
        report.outcome = "mismatch"


def _real_parameters(problem: KernelProblem) -> list[Tensor]:
    """The model's own Parameters for the problem's differentiated ones, in the same order."""
    named = dict(problem.model.named_parameters())
    return [named[k] for k in problem.params]


def _compare_gradients(sub, real, cot, s, quantities, leaves, report) -> str:
    """∂/∂θ of each checked quantity through the engine against the loop's double backward."""
    for index, (ours, theirs) in enumerate(quantities):
        label = "gradient" if index == 0 else "kernel gradient"
        mine = _gradient(ours, leaves)
        try:
            reference = _gradient(theirs, real).to(mine)
        except RuntimeError:  # no double backward for one of the model's own ops (embedding_bag, ...)
            if report.dtype != torch.float64 or index > 0:
                return "not checked (the model's own ops have no double backward; finite differences need float64)"
            report.errors[label] = _finite_difference_error(sub, real, cot, s, mine)
            if report.errors[label] > FINITE_DIFFERENCE_TOLERANCE:
                report.outcome = "mismatch"
            return "finite differences"
        scale = max(float(reference.norm()), 1e-6 * float(theirs.detach().abs()) / max(_norm(real), 1.0), 1e-300)
        report.errors[label] = float((mine - reference).norm()) / scale
    return "autograd"


def _gradient(value: Tensor, params: list[Tensor]) -> Tensor:
    """∂ value / ∂ params, flattened; zero where ``value`` does not depend on them (tr K constant in θ)."""
    if not value.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    return _flat(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True), params)


def _loop_gradients(problem: KernelProblem, real: list[Tensor], cot: Tensor, s: int, create_graph: bool):
    """gᵢ = ∇θ (c · f(xᵢ)) for every probe and sample (probe-major) by plain autograd: the model itself called on
    each sample, differentiated with respect to its own Parameters ``real``; and the least precise floating dtype
    the forward computed in."""
    model_dtypes = {p.dtype for p in real if p.is_floating_point()}
    cast = next(iter(model_dtypes)) if len(model_dtypes) == 1 else None

    def as_model_input(x: Tensor) -> Tensor:
        return x.detach().to(cast) if cast is not None and x.is_floating_point() else x.detach()

    inputs = tuple(as_model_input(x) for x in problem.inputs)
    rows = []
    with FloatingDtypes() as spy, LoopFormulas(), sdpa_kernel(SDPBackend.MATH), exact_forwards(problem.model):
        outputs = []
        if problem.per_sample:
            for i in range(s):
                # a batch of two copies, the first one's outputs: PyTorch's CPU batch_norm backward is wrong at batch
                # size one for channels-last gradients; a sample alone where samples interact
                twice = problem.samples_interact is None
                xs = tuple(torch.cat([x[i : i + 1]] * 2) if twice else x[i : i + 1] for x in inputs)
                _restore(problem.model)
                outputs.append(problem.plain_forward(xs)[0])
        else:
            _restore(problem.model)
            out = problem.plain_forward(inputs)
            outputs = [out[i] for i in range(s)]
        for k in range(cot.shape[0]):
            for i in range(s):
                if not outputs[i].requires_grad:
                    rows.append(tuple(torch.zeros_like(p) for p in real))
                    continue
                grads = torch.autograd.grad(outputs[i], real, cot[k, i].to(outputs[i].dtype), retain_graph=True,
                                            create_graph=create_graph, allow_unused=True)
                rows.append(tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, real)))
    return rows, lowest_precision(spy.seen) or torch.float64


def _finite_difference_error(sub, real: list[Tensor], cot, s, mine: Tensor) -> float:
    """|D_v Σ‖gᵢ‖² − ⟨∇, v⟩| / (‖∇‖‖v‖) along a Gaussian direction v: central differences of the loop (float64),
    the model's Parameters moved and put back."""
    v = torch.randn(mine.numel(), generator=torch.Generator().manual_seed(1), dtype=mine.dtype).to(mine.device)
    h = 1e-6 * max(_norm(real), 1.0) / float(v.norm())
    saved = [p.detach().clone() for p in real]

    def value_at(step: float) -> float:
        offset = 0
        for p, p0 in zip(real, saved):
            p.data.copy_(p0 + step * v[offset : offset + p.numel()].reshape(p.shape).to(p))
            offset += p.numel()
        try:
            rows, _ = _loop_gradients(sub, real, cot, s, create_graph=False)
            return float(sum((g.detach().double() ** 2).sum() for row in rows for g in row))
        finally:
            for p, p0 in zip(real, saved):  # through .data: no version bump for the user's graph that saved p
                p.data.copy_(p0)

    directional = (value_at(h) - value_at(-h)) / (2 * h)
    return abs(directional - float(mine.double() @ v.double())) / max(float(mine.norm()) * float(v.norm()), 1e-300)


def _flat(grads, params: list[Tensor]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _norm(params: list[Tensor]) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params)))


def _relative(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    return float((a - b).norm()) / max(float(b.norm()), floor, 1e-300)
