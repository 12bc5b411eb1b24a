"""Costs said before they bite: a one-time warning before a large K or its log-det is formed, a
``chunk_size`` that cannot split anything reported, and running out of memory turned into an error that
says what to set.

N is the number of rows of K: n·q (``outputs="full"``) or n (``outputs="sum"``); p the number of
differentiated parameters. Forming K costs up to N²·p multiply-adds (its Gram products) and N² numbers
of memory; its eigen-decomposition (``mgs_metrics``) about N³ flops; a log-det penalty a Cholesky
factorisation (N³/3) and its backward (about N³), with K's autograd graph, at every call.
"""

from __future__ import annotations

import torch

from ._problem import KernelProblem
from ._warnings import warn_once
from .op_fixes import _is_out_of_memory

__all__ = ["LARGE_KERNEL_ROWS", "announced"]

#: K with more rows than this (N = n·q, or n with ``outputs="sum"``) gets a one-time warning with its cost
LARGE_KERNEL_ROWS = 4096


def _gib(count: float, itemsize: int) -> str:
    return f"{count * itemsize / 2**30:.2f} GiB"


def _sizes(problem: KernelProblem, outputs: str) -> tuple[int, int, int, torch.dtype]:
    """(N, p, bytes per number, dtype) of this call."""
    first = next(iter(problem.params.values()))
    p = sum(t.numel() for t in problem.params.values())
    rows = problem.n * problem.q if outputs == "full" else problem.n
    return rows, p, first.element_size(), first.dtype


def _is_jacobian(engine) -> bool:
    from .engines import jacobian

    return engine is jacobian


def _j_held(problem: KernelProblem, p: int, itemsize: int) -> str:
    return f"J itself, n·q·p = {problem.n}·{problem.q}·{p:,} numbers ({_gib(problem.n * problem.q * p, itemsize)})"


def warn_if_large(problem: KernelProblem, engine, *, what: str, outputs: str) -> None:
    """Warn once when this call forms a K of more than :data:`LARGE_KERNEL_ROWS` rows (``what`` is
    ``"kernel"`` or ``"logdet"``), with what it will cost."""
    N, p, itemsize, dtype = _sizes(problem, outputs)
    if N <= LARGE_KERNEL_ROWS:
        return
    rows = f"N = n·q = {problem.n}·{problem.q}" if outputs == "full" else f"N = n = {problem.n}, outputs='sum'"
    held = f"; the jacobian route also holds {_j_held(problem, p, itemsize)}" if _is_jacobian(engine) else ""
    if what == "logdet":
        warn_once(
            "large-logdet",
            f"mgs_penalty(kind='logdet') forms a {N:,} × {N:,} kernel with its autograd graph at every call ({rows}): "
            f"up to N²·p = {N * N * p:.1e} multiply-adds to form it and again in backward, a Cholesky factorisation "
            f"(N³/3 = {N**3 / 3:.1e} flops) and its backward (about N³), and several N×N matrices of {_gib(N * N, itemsize)} "
            f"each in {dtype}{held}. The trace penalty (kind='trace') costs about one training step at batch n·q "
            f"instead; for the log-det, fewer samples per call (mgs_max_samples in Lightning) or outputs='sum' (n×n) "
            f"cut N. This warning is shown once.",
        )
        return
    warn_once(
        "large-kernel",
        f"mgs_kernel forms a {N:,} × {N:,} kernel ({rows}): {_gib(N * N, itemsize)} in {dtype} and up to "
        f"N²·p = {N * N * p:.1e} multiply-adds for its Gram products{held}; mgs_metrics on it adds an "
        f"eigen-decomposition of about N³ = {float(N) ** 3:.1e} flops. Cheaper: fewer samples (max_samples in "
        f"MGSMonitor), outputs='sum' (an n×n kernel), or the trace alone (mgs_trace, mgs_penalty(kind='trace')), "
        f"which never forms K. This warning is shown once.",
    )


def chunk_extent(problem: KernelProblem, engine, cotangents: int, *, rows_of_j: bool) -> tuple[int, str]:
    """How many things ``chunk_size`` splits on this call, and what they are.

    The structured engine back-propagates ``cotangents`` output cotangents (q one-hot, or the probes)
    in chunks (the parameters no layer rule covers included: their per-sample gradients come from the
    same backward), or, with no layer covered, hands everything to the reference; the jacobian engine
    vmaps over the samples (per-sample route) or over the rows of J (whole batch: n·q for J, n·k for row norms)."""
    n = problem.n
    if _is_jacobian(engine) or not problem.per_sample:
        if problem.per_sample:
            return n, "samples"
        return (n * problem.q, "rows of J") if rows_of_j else (n * cotangents, "rows of its probes")
    from .engines import structured

    plan = structured.cached_plan(problem)[0]
    if not plan.layers:  # all of it goes to the reference, chunked over samples
        return n, "samples"
    return cotangents, "output cotangents" if rows_of_j else "cotangents"


def warn_if_idle_chunk(chunk_size: int | None, extent: int, what: str) -> None:
    """Report (once) a ``chunk_size`` at least as large as everything it could split: it changes nothing."""
    if chunk_size is not None and chunk_size >= extent > 0:
        warn_once(
            "idle-chunk",
            f"chunk_size={chunk_size} is at least the {extent} {what} it splits on this call, so it bounds nothing: "
            f"the computation runs as one chunk, as with chunk_size=None. Pass a smaller chunk_size to bound memory "
            f"(1 bounds it most, at the most recomputation). This warning is shown once.",
        )


def _advice(problem: KernelProblem, engine, what: str, outputs: str, chunk_size: int | None) -> str:
    N, p, itemsize, dtype = _sizes(problem, outputs)
    k_size = f"K ({N:,} × {N:,}, {_gib(N * N, itemsize)} in {dtype})"
    if what == "trace":
        return (
            f"tr K needs no K, only the backward passes of the q = {problem.q} outputs at batch n = {problem.n}. "
            f"Set chunk_size (mgs_penalty: the graph of chunk_size outputs at a time, recomputed in backward; "
            f"1 bounds it most), estimator='hutchinson' (one probe per sample instead of q outputs), or pass fewer samples."
        )
    if _is_jacobian(engine):
        return (
            f"The jacobian route holds {_j_held(problem, p, itemsize)}, and {k_size}; chunk_size bounds only "
            f"the backward passes' working memory there, not J. Set strategy='auto' (per-layer Gram products: "
            f"no J for the layers with rules), params=... (fewer columns of J), outputs='sum' (an n×n K), or pass "
            f"fewer samples."
        )
    return (
        f"Forming {k_size} keeps every layer's output-gradients for all q = {problem.q} outputs. Set chunk_size "
        f"(fewer cotangents back-propagated at once; now {chunk_size}), outputs='sum' (an n×n K), params=... "
        f"(fewer layers), or pass fewer samples; for a penalty, kind='trace' never forms K."
    )


class announced:
    """Around one engine call: the large-K warning (``what`` in ``"kernel"``, ``"logdet"``), the idle-chunk
    report (``cotangents``: how many cotangents the engine gets, default q), and an allocation failure
    re-raised as ``torch.OutOfMemoryError`` whose message says what this call holds and what to set.

    A class, not a generator: the warnings then point past mgs_torch's own frames at the user's line."""

    def __init__(
        self, problem: KernelProblem, engine, *, what: str, outputs: str = "full", chunk_size: int | None = None,
        cotangents: int | None = None,
    ) -> None:
        self.problem, self.engine, self.what, self.outputs, self.chunk_size = problem, engine, what, outputs, chunk_size
        self.cotangents = problem.q if cotangents is None else cotangents

    def __enter__(self) -> None:
        problem, chunk_size, k = self.problem, self.chunk_size, self.cotangents
        if self.what in ("kernel", "logdet"):
            warn_if_large(problem, self.engine, what=self.what, outputs=self.outputs)
        if chunk_size is not None and chunk_size >= min(k, problem.n):  # only then can it be idle
            warn_if_idle_chunk(chunk_size, *chunk_extent(problem, self.engine, k, rows_of_j=self.what != "trace"))

    def __exit__(self, kind, error, traceback) -> None:
        if not isinstance(error, (RuntimeError, MemoryError)) or not _is_out_of_memory(error):
            return  # anything else propagates as it is
        raise torch.OutOfMemoryError(
            f"mgs_torch ran out of memory ({str(error).strip().splitlines()[0][:200]}). "
            f"{_advice(self.problem, self.engine, self.what, self.outputs, self.chunk_size)}"
        ) from error
