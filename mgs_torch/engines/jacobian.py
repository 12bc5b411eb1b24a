"""Reference engine: explicit Jacobians from :mod:`torch.func`, contracted into K.

Always correct for any module the per-sample function can be vmapped over (the torch.func NTK
tutorial's "Jacobian contraction"). Two routes:

* per-sample (the default): ``vmap(jacrev(f))`` over samples, ``f`` the model on one sample.
  Cost: n·q per-sample backward passes, memory n·q·p for J; K = J Jᵀ costs (n·q)²·p.
* whole-batch (when samples interact, e.g. BatchNorm with batch statistics): one batched forward
  and ``vmap`` of its vjp over the n·q one-hot cotangents. Cost: n·q backward passes of the whole
  batch (n times the per-sample route), exact for the batch function.

``chunk_size`` here counts samples (per-sample route) or rows of J (whole-batch route) processed at
once: it bounds the working memory of the backward passes. K needs every row of J, so :func:`kernel`
always holds J whole (n·q·p numbers, written chunk by chunk into one buffer, never concatenated);
:func:`row_sq_norms` keeps only the norms, so there memory is bounded by the chunk.

Contract shared with every engine (see :mod:`mgs_torch.engines`):
``kernel(problem, outputs=..., chunk_size=...) -> K`` and
``row_sq_norms(problem, cotangents, chunk_size=...) -> (k, n)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.func import jacrev, vjp, vmap

from .._guards import restore_rng_states, rng_states

from .._problem import Cotangents, KernelProblem, StaleOutputShape
from ..op_fixes import UnsupportedLayerError


def _single_sample_fn(problem: KernelProblem):
    def f(params: dict[str, Tensor], *xs: Tensor) -> Tensor:
        return problem.forward(params, tuple(x.unsqueeze(0) for x in xs)).squeeze(0)

    return f


def _randomness(problem: KernelProblem) -> str:
    # active Dropout draws an independent mask per sample; other random ops are caught by
    # vmap's "error" mode and retried as stochastic (see ``retry_if_random``)
    if problem.stochastic and problem.reseeds and problem.per_sample:
        raise UnsupportedLayerError(
            f"{type(problem.model).__name__}'s forward sets the global random state itself (torch.manual_seed, "
            f"torch.set_rng_state or torch.random.fork_rng) and draws random numbers (Dropout or another random op): "
            f"each call of the model then draws from that fixed state, which the per-sample route cannot reproduce "
            f"for one sample at a time, so its K would not be that of model(x). Seed once outside the forward, or "
            f"compute MGS without the randomness (model.eval(), or Dropout probability 0)."
        )
    return "different" if problem.stochastic else "error"


def is_randomness_error(error: RuntimeError) -> bool:
    """vmap refused a random op (e.g. ``F.dropout`` in a custom layer) in its "error" mode."""
    return "randomness" in str(error) and "vmap" in str(error)


def retry_if_random(compute):
    """Run ``compute(problem, ...)``; if the model turns out random, rerun on a stochastic copy."""

    def run(problem: KernelProblem, *args, **kwargs):
        if torch.compiler.is_compiling():  # no random-state copies in a traced graph (see mgs_torch._compiled)
            return compute(problem, *args, **kwargs)
        rng = rng_states(problem.model)
        try:
            return compute(problem, *args, **kwargs)
        except RuntimeError as error:
            if problem.stochastic or problem.strict_randomness or not is_randomness_error(error):
                raise
            restore_rng_states(rng)
            return compute(dataclasses.replace(problem, stochastic=True), *args, **kwargs)

    run.__doc__, run.__name__ = compute.__doc__, compute.__name__
    return run


def _with_outputs(f):
    """``f`` returning ``(out, out)``: the second, detached, comes back from ``jacrev(..., has_aux=True)``."""

    def g(*args):
        out = f(*args)
        return out, out.detach()

    return g


def _contract(jac: dict[str, Tensor], n: int, q: int, outputs: str) -> Tensor:
    """K from per-parameter Jacobians of shape (n·q, *param_shape), rows ordered (sample, output)."""
    K = None
    for j in jac.values():
        j = j.reshape(n, q, -1)
        if outputs == "full":
            flat = j.reshape(n * q, -1)
            part = flat @ flat.T
        else:
            part = torch.einsum("iap,jap->ij", j, j)
        K = part if K is None else K.add_(part)  # in place: an addition saves nothing for backward
    return K


def chunks(count: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(count)`` in steps of ``chunk_size`` (one range for None)."""
    step = count if chunk_size is None else max(1, chunk_size)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def _rows_in_one_buffer(block, count: int, chunk_size: int | None, rows_per_item: int = 1) -> dict[str, Tensor]:
    """``{name: (count·rows_per_item, ...)}`` from ``block(start, stop)``, the rows of items ``start:stop``,
    called per chunk of ``chunk_size`` items, each chunk written into one
    preallocated buffer as it comes: never the chunks and their concatenation at once (which is what
    ``vmap(..., chunk_size=...)`` builds, doubling J's memory). Differentiable (slice assignment)."""
    ranges = chunks(count, chunk_size)
    if len(ranges) == 1:
        return block(0, count)
    rows: dict[str, Tensor] = {}
    for start, stop in ranges:
        for name, part in block(start, stop).items():
            if name not in rows:
                rows[name] = part.new_empty((count * rows_per_item, *part.shape[1:]))
            rows[name][start * rows_per_item : stop * rows_per_item] = part
    return rows


@retry_if_random
def jacobian_rows(problem: KernelProblem, *, chunk_size: int | None = None) -> dict[str, Tensor]:
    """J as ``{name: (n·q, *param_shape)}``, rows ordered (sample, output); ``chunk_size`` samples
    (per-sample route) or rows (whole-batch route) at a time."""
    n, q = problem.n, problem.q
    if problem.per_sample:
        f = _with_outputs(_single_sample_fn(problem))
        in_dims = (None,) + (0,) * len(problem.inputs)
        per_sample = vmap(jacrev(f, has_aux=True), in_dims=in_dims, randomness=_randomness(problem))
        outs = []

        def samples(start: int, stop: int) -> dict[str, Tensor]:
            jac, out = per_sample(problem.params, *(x[start:stop] for x in problem.inputs))
            if out.shape[1:] != (q,):  # the cached q no longer fits this forward: rebuild (before reshaping J)
                raise StaleOutputShape
            outs.append(out)
            return {k: v.reshape((stop - start) * q, *v.shape[2:]) for k, v in jac.items()}

        rows = _rows_in_one_buffer(samples, n, chunk_size, rows_per_item=q)
        problem.check_outputs(torch.cat(outs))
        return rows
    out, vjp_fn = vjp(lambda p: problem.forward(p, fresh_buffers=True).reshape(-1), problem.params)
    problem.check_outputs(out.reshape(n, -1))
    return _rows_in_one_buffer(lambda a, b: vmap(vjp_fn)(_one_hot_rows(a, b, out))[0], n * q, chunk_size)


def _one_hot_rows(start: int, stop: int, out: Tensor) -> Tensor:
    """Rows ``start:stop`` of the identity of ``out``'s size: the cotangents of those rows of J."""
    rows = torch.zeros(stop - start, out.numel(), dtype=out.dtype, device=out.device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return rows


def kernel(problem: KernelProblem, *, outputs: str = "full", chunk_size: int | None = None) -> Tensor:
    """K = J Jᵀ ((n·q)×(n·q)) or, with ``outputs="sum"``, Σ_a K[(i,a),(j,a)] (n×n)."""
    jac = jacobian_rows(problem, chunk_size=chunk_size)
    return _contract(jac, problem.n, problem.q, outputs)


@retry_if_random
def row_sq_norms(problem: KernelProblem, cotangents: Cotangents, *, chunk_size: int | None = None) -> Tensor:
    """‖Σ_a c[k,i,a] ∇θ f_a(x_i)‖² for every probe k and sample i: a (k, n) tensor.

    ``cotangents`` is a (k, n, q) tensor or a function of the (validated) problem returning one.
    With one-hot cotangents (k = q) these are the diagonal entries of K, so their sum is tr K.
    """
    if callable(cotangents):
        cotangents = cotangents(problem)
    cotangents = cotangents.to(next(iter(problem.params.values())).dtype)
    n, q = problem.n, problem.q
    k = cotangents.shape[0]
    if problem.per_sample:
        f = _single_sample_fn(problem)

        def one_sample(params: dict[str, Tensor], c: Tensor, *xs: Tensor) -> tuple[Tensor, Tensor]:
            out, vjp_fn = vjp(lambda p: f(p, *xs), params)
            if out.shape != c.shape[1:]:  # the cached q no longer fits this forward: rebuild
                raise StaleOutputShape
            grads = vmap(vjp_fn)(c)[0]
            return sum((g.reshape(c.shape[0], -1) ** 2).sum(1) for g in grads.values()), out.detach()

        in_dims = (None, 1) + (0,) * len(problem.inputs)
        norms, out = vmap(one_sample, in_dims=in_dims, chunk_size=chunk_size, randomness=_randomness(problem))(
            problem.params, cotangents, *problem.inputs
        )
        problem.check_outputs(out)
        return norms.T
    # whole batch: probe (k, i) is the cotangent c[k, i] on sample i and zero elsewhere
    out, vjp_fn = vjp(lambda p: problem.forward(p, fresh_buffers=True), problem.params)
    problem.check_outputs(out)
    eye = torch.eye(n, dtype=out.dtype, device=out.device)
    cots = torch.einsum("kia,ij->kija", cotangents.to(out.dtype), eye).reshape(k * n, n, q)
    norms = []
    for start, stop in chunks(k * n, chunk_size):  # only the chunk's gradients are alive at a time
        grads = vmap(vjp_fn)(cots[start:stop])[0]
        norms.append(sum((g.reshape(stop - start, -1) ** 2).sum(1) for g in grads.values()))
    return torch.cat(norms).reshape(k, n)
