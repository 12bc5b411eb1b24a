"""PyTorch's own first derivatives in float64, op by op, against finite differences.

mgs_torch and its reference loop both use PyTorch's derivatives; where one of them is imprecise, both
are, and only an independent check notices. This sweep takes every op of PyTorch's operator database
(``torch.testing._internal.common_methods_invocations.op_db``) that supports float64 autograd, on up to
three of its sample inputs, and compares ⟨u, J v⟩ from autograd (a VJP with random u, dotted with random v)
with a 5-point central difference of ⟨u, f(x + s v)⟩ at two steps (10⁻⁴, 10⁻⁵). A pair is reported when both
steps agree with each other to 10⁻¹⁰ (the function is smooth there) but not with autograd to 10⁻⁹.

Its first run (torch 2.13 and 2.14.1) reported one op whose derivative is imprecise: ``hardsigmoid``,
whose CPU derivative multiplies by a single-precision 1/6 (3·10⁻⁸; pinned in ``test_upstream_bugs.py``,
computed by formula in mgs_torch and in ``verify``). The others it reports differ by definition, not by
precision, and are listed in ``BY_DEFINITION``.

Needs ``pip install expecttest hypothesis``. ``python tests/derivative_sweep.py`` (about a minute).
"""

from __future__ import annotations

import time
import warnings

import torch
from torch.utils._pytree import tree_flatten

BY_DEFINITION = {  # op name: why its autograd derivative is not the finite difference of the function
    "cholesky": "derivative of the symmetric part: the sample input is perturbed in non-symmetric directions",
    "linalg.cholesky": "same", "linalg.cholesky_ex": "same", "linalg.eigh": "same", "linalg.pinv": "same (hermitian)",
    "cov": "a float32 weight input (aweights): part of the op runs in single precision",
    "as_strided": "overlapping views: one storage element read several times", "as_strided_scatter": "same",
    "nn.functional.max_unpool1d": "indices chosen by a pooling whose ties move under perturbation",
    "nn.functional.max_unpool2d": "same", "nn.functional.max_unpool3d": "same",
    "bfloat16": "rounds to a lower precision: a step function", "half": "same",
    "normal": "random: the function changes with each call",
    "nn.functional.cosine_embedding_loss": "a ±1 target compared with 1: perturbing it changes the branch",
}


def rows(samples_per_op: int = 3):
    from torch.testing._internal.common_methods_invocations import op_db

    for op in op_db:
        if not op.supports_autograd or torch.float64 not in op.supported_dtypes("cpu"):
            continue
        try:
            samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=True))[:samples_per_op]
        except Exception:  # noqa: BLE001 - an op whose samples do not build here
            continue
        for sample in samples:
            yield op, sample


def compare(op, sample) -> tuple[float, float] | None:
    """(autograd vs finite differences, finite differences at two steps), relative; None if not comparable."""
    leaves = [t for t in tree_flatten((sample.input, sample.args, sample.kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return None

    def f(*values):
        swap = {id(leaf): v for leaf, v in zip(leaves, values)}

        def rep(t):
            if isinstance(t, torch.Tensor):
                return swap.get(id(t), t)
            return type(t)(rep(x) for x in t) if isinstance(t, (list, tuple)) else t

        out = op(rep(sample.input), *(rep(a) for a in sample.args), **{k: rep(v) for k, v in sample.kwargs.items()})
        return [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point()]

    outs = f(*leaves)
    if not outs or not all(torch.isfinite(o).all() for o in outs):
        return None
    us = [torch.randn_like(o) for o in outs]
    vs = [torch.randn_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(outs, leaves, us, allow_unused=True)
    autograd = sum(float((g * v).sum()) for g, v in zip(grads, vs) if g is not None)

    def phi(s):
        with torch.no_grad():
            return sum(float((o * u).sum()) for o, u in zip(f(*(leaf.detach() + s * v for leaf, v in zip(leaves, vs))), us))

    def stencil(h):
        return (-phi(2 * h) + 8 * phi(h) - 8 * phi(-h) + phi(-2 * h)) / (12 * h)

    coarse, fine = stencil(1e-4), stencil(1e-5)
    scale = max(abs(fine), 1e-3 * sum(float(g.norm()) * float(v.norm()) for g, v in zip(grads, vs) if g is not None), 1e-12)
    return min(abs(autograd - coarse), abs(autograd - fine)) / scale, abs(coarse - fine) / scale


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    t0, checked, reported = time.perf_counter(), 0, []
    for op, sample in rows():
        try:
            result = compare(op, sample)
        except Exception:  # noqa: BLE001 - samples that need integer or structured inputs
            continue
        if result is None:
            continue
        checked += 1
        error, consistency = result
        if error > 1e-9 and consistency < 1e-10:
            known = BY_DEFINITION.get(op.name)
            reported.append(op.name)
            print(f"{'by definition' if known else 'IMPRECISE':13s} {op.name} {op.variant_test_name}: autograd {error:.1e} "
                  f"from finite differences{f' ({known})' if known else ''}", flush=True)
    new = sorted(set(reported) - set(BY_DEFINITION))
    print(f"{checked} op/sample pairs compared in {time.perf_counter() - t0:.0f} s; imprecise derivatives: {new or 'none'}")


if __name__ == "__main__":
    main()
