"""``verify(model, x)``: check mgs_torch on *your* model against a plain autograd loop, once.

The reference is independent of torch.func: each sample runs through the model on its own and each
of its q outputs is differentiated with one ``torch.autograd.grad`` (so J has n·q rows); K = J Jᵀ, and
the trace penalty's gradient is that loop differentiated once more (``create_graph=True``). Both are
compared with mgs_torch in float64 on a deep copy of the model (your model is not touched), and the
report says which route each parameter took (a layer rule, or the reference engine and why) and which
upstream ops were replaced by exact equivalents (:mod:`mgs_torch.op_fixes`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ._guards import cuda_devices, fresh_caches, preserved_state

from ._problem import build_problem

from ._io import ModelCall, OutputSelector, model_call
from ._validation import Inputs, functional_model, select_parameters
from .engines import engine_for, jacobian, structured
from .kernel import mgs_kernel
from .options import KernelOptions
from ._plain_loop import FloatingDtypes, LoopFormulas, lowest_precision
from .op_fixes import _is_out_of_memory, exact_forwards, explained_failures, recording_replacements
from .penalty import mgs_penalty
from .self_check import self_check_disabled

__all__ = ["verify", "VerifyReport"]


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is True when every checked quantity is within ``tolerance``.

    ``kernel_error`` = ‖K − K_loop‖ / ‖K_loop‖; ``gradient_error`` = ‖g − g_loop‖ / max(‖g_loop‖,
    10⁻⁶ tr K / max(‖θ‖, 1)) for g = ∂ tr K / ∂θ: where the gradient vanishes (tr K constant in θ) it is
    measured against its natural size, not against round-off."""

    strategy: str
    samples: int
    kernel_error: float | None = None
    gradient_error: float | None = None
    tolerance: float = 1e-8
    #: how ``gradient_error`` was measured: "autograd" (the loop differentiated once more), "finite
    #: differences" (where that double backward fails: an op without one upstream, or memory), or "not checked"
    gradient_check: str = "autograd"
    gradient_tolerance: float | None = None
    routes: dict[str, str] = field(default_factory=dict)
    replaced_ops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failure: str | None = None
    samples_interact: float | None = None

    @property
    def ok(self) -> bool:
        """Every check passed, and the model's batched outputs equal those of each sample run alone."""
        gradient_tolerance = self.tolerance if self.gradient_tolerance is None else self.gradient_tolerance
        checked = [(e, t) for e, t in ((self.kernel_error, self.tolerance), (self.gradient_error, gradient_tolerance)) if e is not None]
        return (
            self.failure is None and self.samples_interact is None and bool(checked)
            and all(e <= t for e, t in checked)
        )

    def _gradient_not_checked(self, why: str) -> None:
        self.gradient_check, self.gradient_tolerance = "not checked", None
        self.notes.append(f"penalty gradient not checked: {why}")

    def __str__(self) -> str:
        def fmt(e):
            return "not checked" if e is None else f"{e:.2e}"

        lines = [
            f"mgs_torch.verify: {'OK' if self.ok else 'PROBLEM'} (strategy={self.strategy!r}, {self.samples} samples, float64, tolerance {self.tolerance:g})",
            f"  K                       relative error {fmt(self.kernel_error)}",
            f"  ∂ tr K / ∂θ (penalty)   relative error {fmt(self.gradient_error)}"
            + (f" (central finite differences, tolerance {self.gradient_tolerance:g})" if self.gradient_check == "finite differences" else ""),
        ]
        if self.failure:
            lines.append(f"  failed: {self.failure}")
        if self.samples_interact is not None:
            lines.append(
                f"  samples interact: model(X) differs from each sample run alone by {self.samples_interact:.2e} of "
                f"the outputs' scale (an op over the batch dimension), so the per-sample K above is not the "
                f"kernel of the function model(X) computes; pass batch_norm='batch' for the whole-batch function"
            )
        if self.replaced_ops:
            lines.append(f"  ops replaced by exact equivalents: {', '.join(sorted(self.replaced_ops))}")
        lines.append("  route per parameter:")
        width = max((len(k) for k in self.routes), default=0)
        lines += [f"    {name:<{width}}  {route}" for name, route in self.routes.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _loop_jacobian(model: nn.Module, xs: tuple[Tensor, ...], params: list[Tensor], create_graph: bool, call: ModelCall) -> Tensor:
    """J of the per-sample outputs by plain autograd (``call`` maps ``xs`` onto the model and selects its
    outputs). Each sample runs as a batch of two identical
    copies (the first one's outputs differentiated): PyTorch 2.13's CPU ``batch_norm`` backward is wrong
    at batch size one when the incoming gradient has channels-last strides (a conv stem whose map is
    flattened and transposed into tokens), which would make this reference, not mgs_torch, wrong.
    Instance norm runs as its formula for the same reason (its kernel always uses a batch of one)."""
    with LoopFormulas(), exact_forwards(model), fresh_caches(model):
        return _loop_rows(model, xs, params, create_graph, call)


def _loop_rows(model: nn.Module, xs: tuple[Tensor, ...], params: list[Tensor], create_graph: bool, call: ModelCall) -> Tensor:
    rows = []
    for i in range(xs[0].shape[0]):
        out = call(model, tuple(torch.cat([x[i : i + 1]] * 2) for x in xs))[:1].reshape(-1)
        rows += [_gradient_row(out[a], params, create_graph) for a in range(out.numel())]
    return torch.stack(rows)


def _gradient_row(output: Tensor, params: list[Tensor], create_graph: bool) -> Tensor:
    """∇θ of one output, flattened (zeros where it does not depend on a parameter, or on none)."""
    if not output.requires_grad:
        return _flat([None] * len(params), params)
    return _flat(torch.autograd.grad(output, params, retain_graph=True, create_graph=create_graph, allow_unused=True), params)


def _flat(grads, params: list[Tensor]) -> Tensor:
    """Gradients as one vector, zeros for the parameters autograd reports unused (``None``)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _whole_batch_rows(model: nn.Module, xs: tuple[Tensor, ...], params: list[Tensor], create_graph: bool, call: ModelCall) -> Tensor:
    """J of the whole-batch function: one batched forward, a backward per output of model(X)."""
    with LoopFormulas(), exact_forwards(model), fresh_caches(model):
        out = call(model, xs).reshape(-1)
        return torch.stack([_gradient_row(out[a], params, create_graph) for a in range(out.numel())])


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


def verify(
    model: nn.Module,
    inputs: Inputs,
    *,
    samples: int = 2,
    strategy: str = "auto",
    params=None,
    tolerance: float = 1e-8,
    logits: OutputSelector = None,
) -> VerifyReport:
    """Compare mgs_torch's K and trace-penalty gradient with a per-sample autograd loop on your model.

    Run it once on a new architecture: ``print(mgs_torch.verify(model, x))``. It uses the first
    ``samples`` samples of ``inputs``, a float64 copy of the model in eval mode (random layers would
    make K random), and ``params``, ``logits`` and the forms of ``inputs`` (a tensor, tuple or mapping of
    keyword arguments such as a padded batch with its attention mask) as in :func:`mgs_torch.mgs_kernel`. Cost: samples·q backward passes
    for the reference, twice that for the gradient check. The loop computes ``hardsigmoid`` by its
    formula (PyTorch's derivative is single precision) and, for the gradient check, ``embedding_bag`` too
    (PyTorch cannot differentiate it twice); where its double backward still fails (another such op, or
    memory), the penalty gradient is checked against central finite differences of the loop's tr K
    (``report.gradient_check``; tolerance 10⁻⁴). Never raises for a model mgs_torch cannot
    handle: the report's ``failure`` says what went wrong and which layers fail on their own.
    """
    with self_check_disabled():  # verify is the whole check: it reports the engines as they are
        return _verify(model, inputs, samples=samples, strategy=strategy, params=params, tolerance=tolerance, logits=logits)


def _verify(model: nn.Module, inputs: Inputs, *, samples: int, strategy: str, params, tolerance: float,
            logits: OutputSelector) -> VerifyReport:
    model = functional_model(model)
    tensors, call = model_call(model, inputs, logits)
    xs = tuple(x[:samples] for x in tensors)
    xs = tuple(x.double() if x.is_floating_point() else x for x in xs)
    loop_call = dataclasses.replace(call, transformers=False)  # the reference runs the model's own code, untouched
    ref_model = copy.deepcopy(model).double().eval()
    report = VerifyReport(strategy, xs[0].shape[0], tolerance=tolerance)
    if model.training:
        report.notes.append("checked in eval mode (Dropout and other random layers make K random in train mode)")
    KernelOptions(strategy=strategy, params=params)  # validated before anything runs
    if params is not None:  # modules, Parameters and callables name objects of *your* model, not of the copy
        params = list(select_parameters(model, params))
    try:
        with preserved_state(ref_model, "eval"), explained_failures(ref_model, strategy):
            problem = build_problem(ref_model, call.inputs(xs), params=params, logits=logits, batch_norm="eval")
            report.samples_interact = problem.samples_interact
            whole_batch = not problem.per_sample
            if whole_batch:
                report.notes.append(
                    "the forward cannot run one sample at a time (data-dependent ops): mgs_torch differentiates the "
                    "whole-batch function, and the reference loop does too"
                )
                report.routes = {k: "reference (whole-batch function)" for k in problem.params}
            elif engine_for(strategy, problem) is jacobian:
                why = "strategy='jacobian'" if strategy == "jacobian" else "auto: layer rules cover under half the parameters"
                report.routes = {k: f"reference ({why})" for k in problem.params}
            else:
                report.routes = structured.cached_plan(problem)[0].routes()
            chosen = list(problem.params)
        with recording_replacements() as replaced:
            K = mgs_kernel(ref_model, call.inputs(xs), strategy=strategy, params=params, logits=logits)
        report.replaced_ops = sorted(replaced)
    except Exception as error:  # noqa: BLE001 - verify reports every failure, it never raises one
        report.failure = f"{type(error).__name__}: {error}"
        report.routes.update(_per_layer_failures(ref_model, call.inputs(xs), strategy, logits))
        return report
    low = _lowest_precision(ref_model, xs, loop_call)
    if low is not None:
        report.tolerance = max(tolerance, 100 * torch.finfo(low).eps)
        report.notes.append(
            f"the float64 copy still computes some ops in {str(low).replace('torch.', '')} (casts in the model's forward, "
            f"as LLaMA's RMSNorm and rotary embeddings do), so two exact computations agree only to that rounding: "
            f"checked with tolerance {report.tolerance:.1e}"
        )
    try:
        return _compare_with_the_loop(report, ref_model, xs, chosen, K, whole_batch, low, strategy, params, loop_call, logits)
    except Exception as error:  # noqa: BLE001 - verify reports every failure, it never raises one
        if not _is_out_of_memory(error):
            report.failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            return report
        report.gradient_check, report.gradient_tolerance = "not checked", None
        report.notes.append(f"the check ran out of memory before it finished ({str(error).splitlines()[0][:160]}): check a smaller input")
        return report


def _compare_with_the_loop(report: VerifyReport, ref_model: nn.Module, xs, chosen: list[str], K: Tensor, whole_batch: bool,
                           low: torch.dtype | None, strategy: str, params, call: ModelCall, logits: OutputSelector) -> VerifyReport:
    """K and the trace penalty's gradient against the plain autograd loop, filled into ``report``."""
    named = dict(ref_model.named_parameters())
    plist = [named[k] for k in chosen]
    # one loop with a graph serves K and the gradient check (attention through the math backend); where that
    # graph does not fit in memory, a loop without one checks K and finite differences check the gradient
    rows = functools.partial(_whole_batch_rows if whole_batch else _loop_jacobian, call=call)
    failed_double_backward: BaseException | None = None
    try:
        try:
            with sdpa_kernel(SDPBackend.MATH):
                J = rows(ref_model, xs, plist, create_graph=True)
        except Exception as error:  # noqa: BLE001 - reported, as every failure
            if not _is_out_of_memory(error):
                raise
            failed_double_backward = error
            with sdpa_kernel(SDPBackend.MATH):
                J = rows(ref_model, xs, plist, create_graph=False)
    except Exception as error:  # noqa: BLE001 - reported, as every failure
        report.failure = f"the plain autograd reference itself fails: {type(error).__name__}: {str(error).splitlines()[0]}"
        return report
    report.kernel_error = _relative(K, (J @ J.T).detach())
    trace = float(torch.linalg.vector_norm(J.detach())) ** 2
    theirs = None
    if failed_double_backward is None:
        try:
            theirs = _loop_gradient(J, plist)
        except (RuntimeError, NotImplementedError) as error:  # an op without a double backward upstream, or memory
            failed_double_backward = error
    del J
    if theirs is None and not _is_out_of_memory(failed_double_backward):
        try:  # the same loop with those ops as formulas that have a double backward
            with _SecondOrderFormulas() as used, sdpa_kernel(SDPBackend.MATH):
                J = rows(ref_model, xs, plist, create_graph=True)
                theirs = _loop_gradient(J, plist)
            del J
            report.notes.append(
                f"PyTorch has no double backward for {', '.join(sorted(used))}: for the penalty gradient the loop "
                f"computes {'it' if len(used) == 1 else 'them'} by formula (K is checked against PyTorch's own kernels)"
            )
        except (RuntimeError, NotImplementedError) as error:
            theirs, failed_double_backward = None, error
    if theirs is None:
        report.gradient_check = "finite differences"
        report.gradient_tolerance = max(report.tolerance, FINITE_DIFFERENCE_TOLERANCE)
        report.notes.append(
            f"the plain autograd reference's double backward "
            f"{'ran out of memory (it keeps samples·q graphs)' if _is_out_of_memory(failed_double_backward) else f'fails ({str(failed_double_backward).splitlines()[0][:200]})'}: "
            f"the penalty gradient is checked against central finite differences of the loop's tr K instead"
        )
    try:
        value = mgs_penalty(ref_model, call.inputs(xs), kind="trace", reduction="sum", strategy=strategy, params=params, logits=logits)
        ours = _flat(torch.autograd.grad(value, plist, allow_unused=True), plist)
    except Exception as error:  # noqa: BLE001 - verify reports every failure, it never raises one
        if not _is_out_of_memory(error):
            report.failure = f"the penalty's gradient fails: {type(error).__name__}: {str(error).splitlines()[0]}"
            return report
        report._gradient_not_checked(
            "mgs_torch's penalty ran out of memory in float64 on this input (chunk_size=... bounds it in training; "
            "check a smaller input here)"
        )
        return report
    # relative to the gradient, or to its natural size tr K / ‖θ‖ where it is far smaller: a penalty whose
    # gradient vanishes exactly (tr K constant in θ) would otherwise compare two round-offs of ~1e-17
    theta_norm = float(torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in plist])))
    floor = 1e-6 * trace / max(theta_norm, 1.0)
    if theirs is None:
        if low is not None:
            report._gradient_not_checked(
                f"finite differences are inconclusive here: the forward computes in {str(low).replace('torch.', '')}, "
                f"too coarse for them"
            )
            return report
        try:
            report.gradient_error = _finite_difference_error(ref_model, xs, plist, rows, ours, floor, theta_norm)
        except FiniteDifferencesInconclusive as error:
            report._gradient_not_checked(f"finite differences are inconclusive here: {error}")
        except Exception as error:  # noqa: BLE001 - verify never raises
            report._gradient_not_checked(f"the finite differences fail ({str(error).splitlines()[0][:200]})")
        return report
    theirs = _flat(theirs, plist)
    report.gradient_error = float((ours - theirs).norm()) / max(float(theirs.norm()), floor, 1e-300)
    return report


def _loop_gradient(J: Tensor, plist: list[Tensor]) -> list[Tensor | None]:
    """∂ Σ J² / ∂θ through the loop's graph: all None where J is constant in θ (a linear model), a zero gradient."""
    return torch.autograd.grad((J**2).sum(), plist, allow_unused=True) if J.requires_grad else [None] * len(plist)


class _SecondOrderFormulas(TorchFunctionMode):
    """A 2-D ``embedding_bag`` as the sum, mean or max of the rows it looks up (written here, apart from
    :mod:`mgs_torch.op_fixes`), and ``cdist`` as a difference and a norm: PyTorch cannot differentiate its own twice. Used for the gradient check
    only, so K is still compared with PyTorch's kernel. Records what it replaced in ``used``."""

    def __enter__(self):
        super().__enter__()
        self.used: set[str] = set()
        return self.used

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding_bag:
            self.used.add("embedding_bag")
            return _embedding_bag_formula(*args, **kwargs)
        if func is torch.cdist:
            self.used.add("cdist")
            x1, x2, p = args[0], args[1], (args[2] if len(args) > 2 else kwargs.get("p", 2.0))
            return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)
        return func(*args, **kwargs)


def _embedding_bag_formula(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False, mode="mean",
                           sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """Equal bags (a 2-D index tensor) as looked-up rows reduced over the bag; anything else as PyTorch's op."""
    if input.dim() != 2 or offsets is not None or max_norm is not None or padding_idx is not None:
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                               per_sample_weights, include_last_offset, padding_idx)
    looked_up = weight.index_select(0, input.reshape(-1)).reshape(*input.shape, weight.shape[1])
    if per_sample_weights is not None:
        looked_up = looked_up * per_sample_weights.unsqueeze(-1)
    return looked_up.sum(1) if mode == "sum" else looked_up.mean(1) if mode == "mean" else looked_up.amax(1)


FINITE_DIFFERENCE_DIRECTIONS = 3
FINITE_DIFFERENCE_TOLERANCE = 1e-4


class FiniteDifferencesInconclusive(Exception):
    """tr K is not smooth at θ on the scale of the finite-difference steps."""


def _finite_difference_error(model: nn.Module, xs, plist: list[Tensor], rows, ours: Tensor, floor: float, theta_norm: float) -> float:
    """‖e‖/‖g‖ estimated along Gaussian directions v: |D_v trK − ⟨g, v⟩| / max(‖g‖, floor), the largest of
    ``FINITE_DIFFERENCE_DIRECTIONS``. For v ~ N(0, I) the difference ⟨g_true − g, v⟩ is N(0, ‖e‖²), so each
    direction estimates ‖e‖ whatever the number of parameters; D_v trK = ‖v‖ (f(θ + h v̂) − f(θ − h v̂)) / 2h,
    with f the loop's tr K (no double backward), at h = 10⁻⁶ and 10⁻⁷ max(‖θ‖, 1).

    tr K is often not smooth at a network's initial point: ReLU inputs that are exactly 0 (a dead
    neighbourhood through a bias-free convolution and a fresh BatchNorm) and max-pool ties among them make
    J, hence tr K, jump under any perturbation (a timm ResNet: 150× ‖g‖ off at one step, 10⁴× at a
    smaller one, where autograd agrees to 4e-16). Where the two steps disagree by more than the tolerance,
    :class:`FiniteDifferencesInconclusive` is raised rather than a difference reported."""
    generator = torch.Generator().manual_seed(0)
    saved = [p.detach().clone() for p in plist]
    scale = max(float(ours.norm()), floor, 1e-300)

    def trace_at(step: Tensor) -> float:
        with torch.no_grad():
            offset = 0
            for p, p0 in zip(plist, saved):
                p.copy_(p0 + step[offset : offset + p.numel()].reshape(p.shape).to(p))
                offset += p.numel()
        try:
            with torch.random.fork_rng(devices=cuda_devices(plist)), sdpa_kernel(SDPBackend.MATH):
                return float(torch.linalg.vector_norm(rows(model, xs, plist, create_graph=False))) ** 2
        finally:
            with torch.no_grad():
                for p, p0 in zip(plist, saved):
                    p.copy_(p0)

    worst = 0.0
    for _ in range(FINITE_DIFFERENCE_DIRECTIONS):
        v = torch.randn(ours.numel(), generator=generator, dtype=torch.float64)
        unit = v / v.norm()
        coarse, fine = (
            float(v.norm()) * (trace_at(h * unit) - trace_at(-h * unit)) / (2 * h)
            for h in (1e-6 * max(theta_norm, 1.0), 1e-7 * max(theta_norm, 1.0))
        )
        if abs(coarse - fine) > FINITE_DIFFERENCE_TOLERANCE * scale:
            raise FiniteDifferencesInconclusive(
                f"two step sizes give directional derivatives {abs(coarse - fine) / scale:.1e} of ‖g‖ apart, so tr K is "
                f"not smooth at these parameters (ReLU inputs or max-pool ties at exactly 0, common at initialisation); "
                f"check again after a few training steps"
            )
        worst = max(worst, abs(fine - float(ours.double() @ v.to(ours.device))) / scale)
    return worst


def _lowest_precision(model: nn.Module, xs: tuple[Tensor, ...], call: ModelCall) -> torch.dtype | None:
    """The least precise floating dtype below float64 that ``model``'s forward computes in, or None."""
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(model.parameters())), FloatingDtypes() as spy:
        call(model, xs)
    return lowest_precision(spy.seen)


def _per_layer_failures(model: nn.Module, inputs, strategy: str, logits: OutputSelector) -> dict[str, str]:
    """For each module owning trainable parameters: its parameters alone, and whether that works."""
    out = {}
    for name, module in model.named_modules():
        own = [k for k, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        try:
            mgs_kernel(model, inputs, strategy=strategy, params=[module], logits=logits)
            status = "ok on its own"
        except Exception as error:  # noqa: BLE001 - a diagnosis, reported as text
            status = f"FAILS: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        for k in own:
            out[f"{name}.{k}" if name else k] = status
    return out
