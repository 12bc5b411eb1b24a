"""Every differentiable PyTorch op, as mgs_torch runs it, against the per-sample autograd loop.

The zoo and the random architectures cover layer families; this covers *ops*, from PyTorch's own
operator database (``torch.testing._internal.common_methods_invocations.op_db``: each op with the
sample inputs PyTorch's own tests use). For every op that supports float64 and a first derivative
(ops without PyTorch's double backward included: their penalty gradient is checked by finite differences) and
each of its first sample inputs, a tiny model applies the op to each sample of a batch,

    f_i(θ) = op(x_i ⊙ θ₀, a₁ ⊙ θ₁, …)[:4]        (a θ on every floating argument, x_i = input + noise),

so the op runs on torch.func's batched tensors inside mgs_torch's per-sample vmap, and
:func:`mgs_torch.verify` compares K and the trace-penalty gradient with the plain loop. Anything above
the tolerance is a finding (a wrong batching rule or derivative: check it by finite differences, then
route it in ``mgs_torch.op_fixes`` and pin it in ``test_upstream_bugs.py``); a refusal is listed.

Needs PyTorch's test dependencies: ``pip install expecttest hypothesis``. Not part of the suite (it
takes minutes). ``python tests/opinfo_sweep.py [--ops name ...] [--samples 4] [--theta all|input]``; docs/testing.md has
the figures of the last run (four samples per op, the default).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import mgs_torch

D = torch.float64
# ops whose values are random, or that take no meaningful gradient through their first input
SKIP = ("normal", "bernoulli", "dropout", "rand", "multinomial", "empty", "new_", "_like", "uniform", "cauchy",
        "exponential", "geometric", "log_normal", "poisson", "nn.functional.rrelu", "as_strided", "resize")


class OpModel(nn.Module):
    """f_i(θ) = op(x_i ⊙ θ₀, a₁ ⊙ θ₁, …, k ⊙ θ_k), its first floating output flattened, first ``q`` entries.

    ``theta="all"`` puts a parameter on every floating tensor argument (weights, biases, masks, keys and
    values: the derivatives an op's first input never reaches); ``"input"`` on the first one only."""

    def __init__(self, op, sample, q: int = 4, theta: str = "all"):
        super().__init__()
        self.op, self.args, self.kwargs, self.q = op, sample.args, sample.kwargs, q
        self.theta = nn.Parameter(1 + 0.1 * torch.randn_like(sample.input))
        floating = lambda v: isinstance(v, torch.Tensor) and v.is_floating_point() and v.layout == torch.strided  # noqa: E731
        self.arg_thetas = nn.ParameterDict({
            str(i): nn.Parameter(1 + 0.1 * torch.randn_like(a)) for i, a in enumerate(self.args) if theta == "all" and floating(a)
        })
        self.kwarg_thetas = nn.ParameterDict({
            k: nn.Parameter(1 + 0.1 * torch.randn_like(v)) for k, v in self.kwargs.items() if theta == "all" and floating(v)
        })

    def one(self, x: torch.Tensor) -> torch.Tensor:
        args = [a * self.arg_thetas[str(i)] if str(i) in self.arg_thetas else a for i, a in enumerate(self.args)]
        kwargs = {k: v * self.kwarg_thetas[k] if k in self.kwarg_thetas else v for k, v in self.kwargs.items()}
        out = self.op(x * self.theta, *args, **kwargs)
        if isinstance(out, (tuple, list)):
            out = next(t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point())
        return out.reshape(-1)[: self.q]

    def forward(self, x):
        return torch.stack([self.one(x[i]) for i in range(x.shape[0])])


def candidates(names: list[str] | None):
    from torch.testing._internal.common_methods_invocations import op_db

    for op in op_db:
        if names and op.name not in names and f"{op.name}.{op.variant_test_name}" not in names:
            continue
        if not op.supports_autograd or D not in op.supported_dtypes("cpu"):
            continue
        if any(s in op.name for s in SKIP):
            continue
        yield op


def report_line(findings: list[str], line: str) -> None:
    findings.append(line)
    print(line, flush=True)


def sweep(names: list[str] | None, samples: int, tol: float, theta: str = "all") -> list[str]:
    findings, counts = [], {
        "ok": 0, "ok without PyTorch double backward": 0, "wrong": 0, "refused": 0, "skipped": 0,
        "random": 0, "not differentiable by PyTorch": 0,
    }
    for op in candidates(names):
        label = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        taken = 0
        for sample in op.sample_inputs("cpu", D, requires_grad=False):
            if taken >= samples:
                break
            x0 = sample.input
            if not isinstance(x0, torch.Tensor) or x0.layout != torch.strided or not x0.is_floating_point() or not 1 <= x0.numel() <= 64:
                continue
            torch.manual_seed(taken)
            try:
                model = OpModel(op.op, sample, theta=theta).eval()
                x = torch.stack([x0 + 0.05 * torch.randn_like(x0) for _ in range(3)])
                with torch.no_grad():
                    out = model(x)
                if not out.is_floating_point() or out.numel() == 0 or not torch.isfinite(out).all():
                    counts["skipped"] += 1
                    continue
            except Exception:  # noqa: BLE001 - the op does not accept this perturbed input
                counts["skipped"] += 1
                continue
            taken += 1
            with torch.no_grad():
                if not torch.equal(model(x), out):  # dropout in training mode, random ops: no kernel to compare
                    counts["random"] += 1
                    continue
            try:  # PyTorch's own first derivative with respect to every θ (a target or running statistics has none)
                torch.autograd.grad(model(x).sum(), list(model.parameters()), allow_unused=True)
            except RuntimeError:
                counts["not differentiable by PyTorch"] += 1
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = mgs_torch.verify(model, x, samples=3, strategy="jacobian", tolerance=tol)
            if any(e is not None and e != e for e in (report.kernel_error, report.gradient_error)):  # NaN: a derivative
                counts["skipped"] += 1  # is infinite at this input (acos at ±1, logaddexp of -inf): nothing to compare
                continue
            if report.failure is not None:
                counts["refused"] += 1
                report_line(findings, f"REFUSED {label} [{tuple(x0.shape)}]: {report.failure.splitlines()[0][:220]}")
            elif not report.ok:
                counts["wrong"] += 1
                report_line(findings, f"WRONG   {label} [{tuple(x0.shape)}, {sample.args and type(sample.args[0]).__name__}]: "
                                f"K {report.kernel_error:.1e}, ∂tr K {report.gradient_error if report.gradient_error is None else f'{report.gradient_error:.1e}'}"
                                f"{' ' + report.notes[-1][:120] if report.notes else ''}")
            elif not op.supports_gradgrad:
                counts["ok without PyTorch double backward"] += 1  # K against the loop, ∂ tr K by finite differences
            else:
                counts["ok"] += 1
    findings.append(f"totals: {counts}")
    return findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", help="op names (default: every candidate)")
    parser.add_argument("--samples", type=int, default=4, help="sample inputs per op (at most)")
    parser.add_argument("--tolerance", type=float, default=1e-8)
    parser.add_argument("--theta", choices=("all", "input"), default="all",
                        help="a parameter on every floating argument of the op (default), or on its first input only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(sweep(args.ops, args.samples, args.tolerance, args.theta)[-1])
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
