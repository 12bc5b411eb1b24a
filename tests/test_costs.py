"""Costs said before they bite (issue 24, item 3): the one-time warning before a large K or log-det,
``chunk_size`` bounding memory on the jacobian route and reported when it splits nothing, and an
allocation failure turned into an error that says what to set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mgs_torch
from helpers import assert_close
from mgs_torch import _costs, _warnings, mgs_kernel, mgs_penalty, mgs_trace
from reference import kernel_loop, penalty_grad_loop

ROOT = Path(__file__).resolve().parents[1]


def _net(q: int = 3, d: int = 4, hidden: int = 5, prelu: bool = False) -> nn.Module:
    torch.manual_seed(0)
    act = nn.PReLU() if prelu else nn.Tanh()  # PReLU has no layer rule: the structured engine's fallback
    return nn.Sequential(nn.Linear(d, hidden), act, nn.Linear(hidden, q)).double()


@pytest.fixture
def fresh_warnings():
    """Forget the one-time warnings of this module, before and after."""
    keys = ("large-kernel", "large-logdet", "idle-chunk")
    _warnings._warned.difference_update(keys)
    yield
    _warnings._warned.difference_update(keys)


def _messages(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------------ a large K is announced


def test_a_large_kernel_is_announced_once_with_its_cost(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_costs, "LARGE_KERNEL_ROWS", 20)  # N = 7·3 = 21 rows: "large" here, cheap to test
    model, x = _net(), torch.randn(7, 4, dtype=torch.float64)
    p = sum(t.numel() for t in model.parameters())
    (message,) = _messages(lambda: mgs_kernel(model, x))
    assert "21 × 21 kernel" in message and "N = n·q = 7·3" in message
    assert f"{21 * 21 * p:.1e}" in message  # N²·p multiply-adds
    assert f"{21.0 ** 3:.1e}" in message  # the eigen-decomposition of mgs_metrics
    assert "outputs='sum'" in message and "mgs_trace" in message
    assert _messages(lambda: mgs_kernel(model, x)) == []  # once per process, never per step
    # at the threshold (N = 20 < 21) and for the trace nothing is said
    _warnings._warned.discard("large-kernel")
    assert _messages(lambda: mgs_kernel(model, x[:6])) == []
    assert _messages(lambda: mgs_trace(model, x)) == []


def test_the_jacobian_route_also_names_the_size_of_j(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_costs, "LARGE_KERNEL_ROWS", 20)
    model, x = _net(), torch.randn(7, 4, dtype=torch.float64)
    p = sum(t.numel() for t in model.parameters())
    (message,) = _messages(lambda: mgs_kernel(model, x, strategy="jacobian"))
    assert f"n·q·p = 7·3·{p:,} numbers" in message


def test_a_large_logdet_penalty_is_announced_once(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_costs, "LARGE_KERNEL_ROWS", 20)
    model, x = _net(hidden=16), torch.randn(7, 4, dtype=torch.float64)
    messages = _messages(lambda: mgs_penalty(model, x, kind="logdet"))
    (message,) = [m for m in messages if "kind='logdet'" in m]
    assert "21 × 21 kernel with its autograd graph" in message and "Cholesky" in message and "kind='trace'" in message
    assert not any("kind='logdet'" in m for m in _messages(lambda: mgs_penalty(model, x, kind="logdet")))
    assert _messages(lambda: mgs_penalty(model, x)) == []  # the trace penalty forms no K


def test_outputs_sum_counts_samples_not_rows(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_costs, "LARGE_KERNEL_ROWS", 20)
    model, x = _net(), torch.randn(7, 4, dtype=torch.float64)
    assert _messages(lambda: mgs_kernel(model, x, outputs="sum")) == []  # 7 × 7
    (message,) = _messages(lambda: mgs_kernel(model, torch.randn(21, 4, dtype=torch.float64), outputs="sum"))
    assert "N = n = 21, outputs='sum'" in message


# ------------------------------------------------------------------------------ chunk_size that splits nothing


@pytest.mark.parametrize(
    "call, chunk, idle",
    [
        # structured, every parameter covered by a rule: chunk_size splits the q = 3 output cotangents
        (lambda m, x, c: mgs_kernel(m, x, strategy="structured", chunk_size=c), 3, True),
        (lambda m, x, c: mgs_kernel(m, x, strategy="structured", chunk_size=c), 2, False),
        # the jacobian route splits the n = 6 samples
        (lambda m, x, c: mgs_kernel(m, x, strategy="jacobian", chunk_size=c), 5, False),
        (lambda m, x, c: mgs_kernel(m, x, strategy="jacobian", chunk_size=c), 6, True),
        (lambda m, x, c: mgs_trace(m, x, strategy="jacobian", chunk_size=c), 6, True),
        # the chunked trace penalty splits the q = 3 outputs (or the probes)
        (lambda m, x, c: mgs_penalty(m, x, chunk_size=c), 3, True),
        (lambda m, x, c: mgs_penalty(m, x, chunk_size=c), 2, False),
        (lambda m, x, c: mgs_penalty(m, x, estimator="hutchinson", num_probes=2, chunk_size=c), 2, True),
    ],
)
def test_a_chunk_that_splits_nothing_is_reported(fresh_warnings, call, chunk, idle):
    model, x = _net(), torch.randn(6, 4, dtype=torch.float64)
    reported = [m for m in _messages(lambda: call(model, x, chunk)) if f"chunk_size={chunk} is at least" in m]
    assert bool(reported) == idle, reported


@pytest.mark.parametrize("chunk, idle", [(11, False), (12, True)])
def test_the_whole_batch_route_splits_the_rows_of_j(fresh_warnings, chunk, idle):
    model, x = _BatchNormNet(), torch.randn(6, 4, dtype=torch.float64)  # n·q = 12 rows
    reported = [m for m in _messages(lambda: mgs_kernel(model, x, chunk_size=chunk, batch_norm="batch")) if "is at least" in m]
    assert bool(reported) == idle and (not idle or "12 rows of J" in reported[0])


def test_uncovered_parameters_are_chunked_with_the_cotangents(fresh_warnings):
    # PReLU's weight has no rule: its per-sample gradients come from the structured engine's own backward
    # (a parameter tap), so chunk_size splits the q = 3 output cotangents there too, and the result is exact
    model, x = _net(prelu=True), torch.randn(6, 4, dtype=torch.float64)
    assert not any("is at least" in m for m in _messages(lambda: mgs_kernel(model, x, strategy="structured", chunk_size=2)))
    (message,) = [m for m in _messages(lambda: mgs_kernel(model, x, strategy="structured", chunk_size=3)) if "is at least" in m]
    assert "3 output cotangents" in message
    assert_close(mgs_kernel(model, x, strategy="structured", chunk_size=2), kernel_loop(model, x))


# ------------------------------------------------------------------------------ the jacobian route, chunked


@pytest.mark.parametrize("chunk", [1, 2, 5, 7])
def test_chunked_jacobian_route_matches_the_loop_per_sample_and_whole_batch(chunk):
    model, x = _net(q=2), torch.randn(5, 4, dtype=torch.float64)
    assert_close(mgs_kernel(model, x, strategy="jacobian", chunk_size=chunk), kernel_loop(model, x))
    bn = _BatchNormNet()  # train mode under batch_norm="batch": the whole-batch route, chunked over rows of J
    expected = kernel_loop(bn, x, whole_batch=True)
    assert_close(mgs_kernel(bn, x, strategy="jacobian", chunk_size=chunk, batch_norm="batch"), expected)
    assert_close(mgs_trace(bn, x, strategy="jacobian", chunk_size=chunk, batch_norm="batch"), expected.trace())


@pytest.mark.parametrize("batch_norm", ["eval", "batch"])
def test_chunked_jacobian_route_differentiates_like_the_loop(batch_norm):
    model = _BatchNormNet() if batch_norm == "batch" else _net(q=2, hidden=12)
    x = torch.randn(4, 4, dtype=torch.float64)
    if batch_norm == "eval":
        model.eval()
    value = mgs_penalty(model, x, kind="logdet", strategy="jacobian", chunk_size=1, batch_norm=batch_norm, reduction="sum")
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    expected = penalty_grad_loop(model, x, "logdet", whole_batch=batch_norm == "batch")
    for p, g, e in zip(params, grads, expected):  # None: K does not depend on it (the last bias)
        zero = torch.zeros_like(p)
        assert_close(zero if g is None else g, zero if e is None else e, rtol=1e-7, atol=1e-9)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    import torch
    from torch import nn
    import mgs_torch

    def status(field):
        return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(40, 1, 16, 16)
    chunk = None if sys.argv[1] == "none" else int(sys.argv[1])
    mgs_torch.mgs_kernel(model, x[:2], strategy="jacobian")  # plans, caches, lazy allocations
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    mgs_torch.mgs_kernel(model, x, strategy="jacobian", chunk_size=chunk)
    p = sum(t.numel() for t in model.parameters())
    print((status("VmHWM") - before) / (40 * 10 * p * 4))  # the peak in units of J's size
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read the peak resident set")
def test_chunk_size_bounds_memory_on_the_jacobian_route():
    """The peak of the jacobian route's K, in units of J (n·q·p floats; here 40·10·67,034·4 B = 107 MB):
    J once plus a chunk's working memory. ``vmap(..., chunk_size=...)`` held the chunks and their
    concatenation at once: this CNN's peak was 1.98 J with ``chunk_size=1`` and 1.08 J without
    (measured 2026-12-03 before the change), so chunking raised the peak instead of bounding it."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def peak(chunk: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, chunk], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    whole, one = peak("none"), peak("1")
    assert 1.0 <= one < 1.25, one  # J, written chunk by chunk into one buffer
    assert one <= whole + 0.05, (one, whole)


# ------------------------------------------------------------------------------ running out of memory


_OOM = "DefaultCPUAllocator: not enough memory: you tried to allocate 10485760000 bytes."


def test_an_allocation_failure_on_the_jacobian_route_says_what_to_set(monkeypatch):
    from mgs_torch.engines import jacobian

    def fail(*args, **kwargs):
        raise RuntimeError(_OOM)

    monkeypatch.setattr(jacobian, "jacobian_rows", fail)
    model, x = _net(), torch.randn(6, 4, dtype=torch.float64)
    p = sum(t.numel() for t in model.parameters())
    with pytest.raises(torch.OutOfMemoryError) as caught:
        mgs_kernel(model, x, strategy="jacobian")
    message = str(caught.value)
    assert "tried to allocate 10485760000 bytes" in message
    assert f"n·q·p = 6·3·{p:,} numbers" in message and "strategy='auto'" in message and "not J" in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(torch.OutOfMemoryError, match="kind='trace' never forms K|strategy='auto'"):
        mgs_penalty(model, x, kind="logdet", strategy="jacobian")


def test_an_allocation_failure_of_the_trace_advises_chunks_and_probes(monkeypatch):
    from mgs_torch.engines import structured

    def fail(*args, **kwargs):
        raise RuntimeError(_OOM)

    monkeypatch.setattr(structured, "row_sq_norms", fail)
    model, x = _net(), torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(torch.OutOfMemoryError, match="chunk_size.*estimator='hutchinson'"):
        mgs_penalty(model, x, strategy="structured")
    monkeypatch.undo()
    assert mgs_penalty(model, x, strategy="structured").isfinite()  # other errors and calls are untouched


_LIMIT_SCRIPT = textwrap.dedent(
    """
    import re, resource, sys
    from pathlib import Path
    import torch
    from torch import nn
    import mgs_torch

    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(1000, 500), nn.Tanh(), nn.Linear(500, 10))  # p = 505,510
    x = torch.randn(100, 1000)  # J: 100·10·505,510 float32 = 1.9 GiB
    mgs_torch.mgs_kernel(model, x[:2], strategy="jacobian")
    size = int(re.search(r"VmSize:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        mgs_torch.mgs_kernel(model, x, strategy="jacobian")
        print("no error")
    except torch.OutOfMemoryError as error:
        print("OutOfMemoryError:", error)
    K = mgs_torch.mgs_kernel(model, x, strategy="auto")  # what the message advises fits in the same limit
    print("auto", tuple(K.shape))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS as a memory limit is Linux's")
def test_a_real_allocation_failure_becomes_the_error_with_advice():
    """The allocator itself refuses (a 1 GiB address-space limit against J's 1.9 GiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _LIMIT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OutOfMemoryError: mgs_torch ran out of memory" in out.stdout and "strategy='auto'" in out.stdout
    assert "auto (1000, 1000)" in out.stdout


@pytest.mark.parametrize("estimator, extent, what", [("exact", 3, "outputs"), ("hutchinson", 2, "probes")])
def test_an_idle_chunk_of_the_penalty_names_what_it_splits(fresh_warnings, estimator, extent, what):
    """The chunked penalty splits the q output cotangents (exact) or the probes (Hutchinson): the warning says which."""
    model, x = _net(), torch.randn(6, 4, dtype=torch.float64)
    options = {"num_probes": 2} if estimator == "hutchinson" else {}
    call = lambda: mgs_penalty(model, x, estimator=estimator, chunk_size=extent, **options)  # noqa: E731
    (message,) = [m for m in _messages(call) if "is at least" in m]
    assert f"chunk_size={extent} is at least the {extent} {what} it splits" in message
