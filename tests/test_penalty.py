"""mgs_penalty: values, gradients against finite differences, Hutchinson statistics."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_close, mlp, reference_kernel, small_cnn
from reference import jacobian_loop
from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), torch.randn(3, 3, dtype=torch.float64)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("kind", ["trace", "logdet"])
@pytest.mark.parametrize("outputs", ["full", "sum"])
def test_gradcheck_against_finite_differences(strategy, kind, outputs):
    model, x = _tiny()
    params = tuple(model.parameters())

    def penalty(*_):  # gradcheck perturbs the parameters themselves, in place
        return mgs_penalty(model, x, kind=kind, strategy=strategy, outputs=outputs)

    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_on_a_cnn_with_normalisation_layers():
    model = small_cnn(2)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    params = tuple(model.parameters())
    # fast_mode compares uᵀ J v for random u, v instead of every column: a wrong entry anywhere still changes it
    # (with probability 1), at the cost of a few evaluations instead of one per parameter (1.3 s -> 0.1 s here)
    assert torch.autograd.gradcheck(lambda *_: mgs_penalty(model, x), params, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_hutchinson_gradient_matches_finite_differences_for_fixed_probes():
    model, x = _tiny()
    params = tuple(model.parameters())

    def penalty(*_):
        return mgs_penalty(model, x, estimator="hutchinson", num_probes=3, generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_values_and_reductions(strategy):
    model, x = mlp(3), torch.randn(5, 4, dtype=torch.float64)
    K = reference_kernel(model, x)
    n, N = 5, 15
    assert_close(mgs_penalty(model, x, reduction="sum", strategy=strategy), K.trace())
    assert_close(mgs_penalty(model, x, strategy=strategy), K.trace() / N)
    _, logdet = np.linalg.slogdet(K.detach().numpy())
    assert mgs_penalty(model, x, kind="logdet", reduction="sum", strategy=strategy).item() == pytest.approx(logdet, rel=1e-9)
    Ks = reference_kernel(model, x, outputs="sum")
    _, logdet_s = np.linalg.slogdet(Ks.detach().numpy())
    assert mgs_penalty(model, x, kind="logdet", outputs="sum", strategy=strategy).item() == pytest.approx(logdet_s / n, rel=1e-9)
    assert_close(mgs_penalty(model, x, outputs="sum", strategy=strategy), K.trace() / n)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_hutchinson_is_unbiased(strategy):
    """400 one-probe estimates in one call: the batch repeated 400 times draws independent per-sample probes.

    With per-sample Rademacher probes the estimate is Σ_i v_iᵀ G_i v_i (G_i: sample i's q×q block of K),
    whose variance is 2 Σ_i Σ_{a≠b} G_i[a,b]², known exactly from the reference kernel.
    """
    model, x = small_cnn(3), torch.randn(4, 2, 5, 5, dtype=torch.float64)
    draws, n, q = 400, 4, 3
    K = reference_kernel(model, x).detach()
    exact = K.trace().item()
    assert mgs_trace(model, x).item() == pytest.approx(exact, rel=1e-10)
    blocks = torch.stack([K[i * q:(i + 1) * q, i * q:(i + 1) * q] for i in range(n)])
    std_one = math.sqrt(2 * (blocks ** 2).sum().item() - 2 * (blocks.diagonal(dim1=1, dim2=2) ** 2).sum().item())
    assert std_one > 0
    total = mgs_trace(model, x.repeat(draws, 1, 1, 1), estimator="hutchinson", num_probes=1,
                      generator=torch.Generator().manual_seed(0), strategy=strategy).item()
    mean, sem = total / draws, std_one / math.sqrt(draws)
    assert abs(mean - exact) < 4 * sem, (mean, exact, sem)
    many = mgs_trace(model, x, estimator="hutchinson", num_probes=draws, generator=torch.Generator().manual_seed(1), strategy=strategy)
    assert abs(many.item() - exact) < 4 * sem, (many.item(), exact, sem)


def _loop_hutchinson(model, x, probes, *, whole_batch=False):
    """(1/k) Σ_k Σ_i ‖Σ_a v_kia ∇θ f_a(x_i)‖² from the autograd loop's J, differentiable in θ."""
    k, n, q = probes.shape
    J = jacobian_loop(model, x, create_graph=True, whole_batch=whole_batch).reshape(n, q, -1)
    return torch.einsum("kia,iap->kip", probes, J).pow(2).sum() / k


def _probes(seed, k, n, q):
    """The probes mgs_torch documents: ±1 from ``torch.randint(0, 2, (k, n, q), generator=...)``."""
    return (2.0 * torch.randint(0, 2, (k, n, q), generator=torch.Generator().manual_seed(seed)) - 1.0).double()


class _BatchNormNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "auto"])
@pytest.mark.parametrize("route", ["per-sample", "whole-batch"])
def test_hutchinson_with_fixed_probes_is_exactly_the_estimate_of_the_loop(strategy, route):
    """Not a statistical check: for the probes the generator draws, the value (plain, chunked and
    through mgs_penalty with both reductions) and the penalty gradient equal those of the autograd
    loop's J to rounding. A bias of any size (a 1 % scale, a probe dropped, a wrong divisor) fails."""
    torch.manual_seed(0)
    whole_batch = route == "whole-batch"
    model = (_BatchNormNet().double().train() if whole_batch else mlp(3))
    kw = {"batch_norm": "batch"} if whole_batch else {}
    x = torch.randn(3, 3 if whole_batch else 4, dtype=torch.float64)
    k, n, q = 5, 3, 3
    expected = _loop_hutchinson(model, x, _probes(11, k, n, q), whole_batch=whole_batch)
    params = list(model.parameters())

    def grad(value):  # tr K does not depend on the last bias: a zero gradient, not a missing one
        return [torch.zeros_like(p) if g is None else g for g, p in zip(torch.autograd.grad(value, params, allow_unused=True), params)]

    expected_grads = grad(expected)

    def gen():
        return torch.Generator().manual_seed(11)

    value = mgs_trace(model, x, estimator="hutchinson", num_probes=k, generator=gen(), strategy=strategy, **kw)
    assert_close(value, expected.detach(), rtol=1e-12, atol=0)
    for chunk_size in (None, 2):
        pen = mgs_penalty(model, x, estimator="hutchinson", num_probes=k, generator=gen(), strategy=strategy,
                          reduction="sum", chunk_size=chunk_size, **kw)
        assert_close(pen.detach(), expected.detach(), rtol=1e-12, atol=0)
        for g, e in zip(grad(pen), expected_grads):
            assert_close(g, e, rtol=1e-10, atol=1e-12)
    mean = mgs_penalty(model, x, estimator="hutchinson", num_probes=k, generator=gen(), strategy=strategy, **kw)
    assert_close(mean.detach(), expected.detach() / (n * q), rtol=1e-12, atol=0)
    # the documented default is one probe
    one = _loop_hutchinson(model, x, _probes(11, 1, n, q), whole_batch=whole_batch).detach()
    assert_close(mgs_trace(model, x, estimator="hutchinson", generator=gen(), strategy=strategy, **kw), one, rtol=1e-12, atol=0)
    assert_close(mgs_penalty(model, x, estimator="hutchinson", generator=gen(), strategy=strategy, reduction="sum", **kw).detach(),
                 one, rtol=1e-12, atol=0)


def test_hutchinson_without_a_generator_draws_from_the_default_generator_only(monkeypatch):
    """No generator=: the probes come from mgs_torch's generator (here reseeded), never the global RNG."""
    from mgs_torch import estimators

    model, x = mlp(3), torch.randn(3, 4, dtype=torch.float64)
    expected = _loop_hutchinson(model, x, _probes(5, 2, 3, 3)).detach()
    for compute in (mgs_trace, lambda *a, **kw: mgs_penalty(*a, reduction="sum", **kw).detach()):
        monkeypatch.setattr(estimators, "_default_generator", torch.Generator().manual_seed(5))
        rng = torch.get_rng_state()
        assert_close(compute(model, x, estimator="hutchinson", num_probes=2), expected, rtol=1e-12, atol=0)
        assert torch.equal(torch.get_rng_state(), rng), "the global RNG was consumed"


def test_the_default_generator_is_seeded_with_zero(monkeypatch):
    """What default_generator's docstring promises: a run that never passes generator= is reproducible."""
    from mgs_torch import estimators

    monkeypatch.setattr(estimators, "_default_generator", None)
    first = estimators.default_generator()
    assert estimators.default_generator() is first  # one stream, advanced call after call
    assert torch.equal(torch.randint(0, 2, (20,), generator=first), torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(0)))


def test_rademacher_probes_without_a_generator():
    """A public helper: ``generator=None`` draws ±1 probes from the global CPU generator, on the device asked."""
    from mgs_torch.estimators import rademacher_probes

    torch.manual_seed(3)
    probes = rademacher_probes(4, 2, 3, None, torch.device("cpu"))
    assert probes.shape == (4, 2, 3) and probes.device.type == "cpu"
    torch.manual_seed(3)
    assert torch.equal(probes, 2.0 * torch.randint(0, 2, (4, 2, 3)) - 1.0)


def test_hutchinson_same_seed_same_value():
    model, x = mlp(3), torch.randn(5, 4, dtype=torch.float64)

    def est(seed):
        return mgs_penalty(model, x, estimator="hutchinson", num_probes=2, generator=torch.Generator().manual_seed(seed))

    assert est(7).item() == est(7).item()
    assert est(7).item() != est(8).item()
    # the default generator advances: consecutive calls draw new probes
    a, b = mgs_penalty(model, x, estimator="hutchinson"), mgs_penalty(model, x, estimator="hutchinson")
    assert a.item() != b.item()


def test_penalty_is_a_scalar_that_backpropagates_into_grad():
    model, x = mlp(3), torch.randn(5, 4, dtype=torch.float64)
    pen = mgs_penalty(model, x)
    assert pen.dim() == 0 and pen.requires_grad
    pen.backward()
    assert all(p.grad is not None for p in list(model.parameters())[:-1])


def test_minimising_the_trace_penalty_reduces_the_trace():
    torch.manual_seed(0)
    model = mlp(3)
    x = torch.randn(8, 4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = mgs_trace(model, x).item()
    for _ in range(20):
        opt.zero_grad()
        mgs_penalty(model, x).backward()
        opt.step()
    assert mgs_trace(model, x).item() < 0.8 * before


def test_logdet_penalty_survives_a_singular_kernel_with_a_warning():
    model = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 3)).double()
    x = torch.randn(6, 2, dtype=torch.float64)  # p = 9 < n·q = 18: K is singular
    from mgs_torch import _warnings

    _warnings._warned.discard("logdet-jitter")
    with pytest.warns(RuntimeWarning, match="jitter"):
        pen = mgs_penalty(model, x, kind="logdet")
    assert math.isfinite(pen.item())
    pen.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    jittered = mgs_penalty(model, x, kind="logdet", jitter=1e-3, reduction="sum").item()
    K = mgs_kernel(model, x).detach().numpy()
    assert jittered == pytest.approx(np.linalg.slogdet(K + 1e-3 * np.eye(18))[1], rel=1e-9)


def test_float64_penalty_for_a_float32_model():
    model = small_cnn(3).float()
    x = torch.randn(3, 2, 5, 5)
    pen = mgs_penalty(model, x, kind="logdet", dtype=torch.float64)
    assert pen.dtype == torch.float64
    pen.backward()
    assert model.conv1.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("chunk_size", [1, 2, 7])
def test_chunked_recomputation_gives_the_same_value_and_gradient(estimator, chunk_size):
    model, x = small_cnn(3), torch.randn(4, 2, 5, 5, dtype=torch.float64)
    params = list(model.parameters())[:-1]  # the head bias does not enter K

    def penalty(**kw):
        return mgs_penalty(model, x, estimator=estimator, num_probes=5, generator=torch.Generator().manual_seed(0), **kw)

    full, chunked = penalty(), penalty(chunk_size=chunk_size)
    assert_close(chunked, full)
    for g_full, g_chunked in zip(torch.autograd.grad(full, params), torch.autograd.grad(chunked, params)):
        assert_close(g_chunked, g_full)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_chunk_size_bounds_the_logdet_kernel_without_changing_the_penalty(strategy):
    """chunk_size with kind="logdet" chunks the kernel computation only: the value and gradient are
    those of log det K from the loop (the chunked-trace path must not take it over)."""
    model, x = _tiny()
    J = jacobian_loop(model, x, create_graph=True)
    expected = torch.linalg.slogdet(J @ J.T)[1]
    params = list(model.parameters())[:-1]
    value = mgs_penalty(model, x, kind="logdet", chunk_size=2, reduction="sum", strategy=strategy)
    assert_close(value.detach(), expected.detach())
    for g, e in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
        assert_close(g, e)


def test_chunked_penalty_revalidates_when_the_output_size_changes():
    """The chunked penalty sizes its cotangents from a freshly validated problem: after the head
    grows (or a hook narrows the outputs) the value is tr K of the new function, not of a cached q."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    assert_close(mgs_penalty(model, x, chunk_size=1, reduction="sum"), reference_kernel(model, x).trace())
    model[2] = nn.Linear(4, 5).double()  # q: 2 -> 5, the same parameter names
    assert_close(mgs_penalty(model, x, chunk_size=1, reduction="sum"), reference_kernel(model, x).trace())
    model.register_forward_hook(lambda module, args, out: out[:, :3])  # q: 5 -> 3 by a hook alone
    assert_close(mgs_penalty(model, x, chunk_size=1, reduction="sum"), reference_kernel(model, x).trace())


def test_chunked_penalty_with_dropout_recomputes_the_same_masks():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    params = list(model.parameters())[:-1]
    torch.manual_seed(0)
    full = mgs_penalty(model, x)
    g_full = torch.autograd.grad(full, params)
    torch.manual_seed(0)
    chunked = mgs_penalty(model, x, chunk_size=1)
    torch.manual_seed(99)  # the global state at backward time must not matter
    g_chunked = torch.autograd.grad(chunked, params)
    assert_close(chunked, full)
    for a, b in zip(g_chunked, g_full):
        assert_close(a, b)


def test_chunked_penalty_gradcheck():
    model, x = _tiny()
    params = tuple(model.parameters())
    assert torch.autograd.gradcheck(lambda *_: mgs_penalty(model, x, chunk_size=1), params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_logdet_backward_through_the_cholesky_inverse_is_exact_to_second_order():
    """log det(K + εI) differentiates through cholesky_inverse(L) (a custom backward): its first and
    second derivatives match finite differences, and the value matches torch.logdet."""
    from mgs_torch._linalg import logdet_psd

    torch.manual_seed(0)
    X = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)

    def logdet_of_gram(X):
        return logdet_psd(X @ X.T, jitter=1e-3)

    assert torch.autograd.gradcheck(logdet_of_gram, (X,))
    assert torch.autograd.gradgradcheck(logdet_of_gram, (X,))
    expected = torch.logdet(X @ X.T + 1e-3 * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(logdet_of_gram(X), expected, rtol=1e-12, atol=0)


def test_symmetric_gram_matches_matmul_to_second_order():
    """X Xᵀ with the one-product backward (Ḡ + Ḡᵀ) X: value, gradient for a non-symmetric cotangent,
    and second derivatives (gradcheck / gradgradcheck), batched and not."""
    from mgs_torch.engines.factors import symmetric_gram

    torch.manual_seed(0)
    for shape in ((5, 3), (2, 4, 3)):
        X = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        cot = torch.randn(*shape[:-1], shape[-2], dtype=torch.float64)
        ours = torch.autograd.grad(symmetric_gram(X), X, cot)[0]
        plain = torch.autograd.grad(X @ X.mT, X, cot)[0]
        assert torch.allclose(symmetric_gram(X), X @ X.mT) and torch.allclose(ours, plain, rtol=1e-13, atol=1e-13)
        assert torch.autograd.gradcheck(symmetric_gram, (X,)) and torch.autograd.gradgradcheck(symmetric_gram, (X,))


def test_hutchinson_probes_from_a_cpu_generator_are_refused_inside_cuda_graph_capture(monkeypatch):
    """A captured CPU draw would be replayed as it is: the error says to pass a registered CUDA generator.
    (Capture itself needs a GPU; it is simulated here, before any CUDA call is made.)"""
    from mgs_torch.estimators import rademacher_probes

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="register_generator_state"):
        rademacher_probes(1, 2, 3, torch.Generator(), "cuda")
    assert rademacher_probes(1, 2, 3, torch.Generator(), "cpu").abs().eq(1).all()  # the CPU path is untouched


@pytest.mark.parametrize("kind", ["trace", "logdet"])
def test_a_penalty_that_does_not_depend_on_the_parameters_has_a_zero_gradient(kind):
    """A linear model's K = X Xᵀ ⊗ I + 1 is constant in θ: backward works and gives zeros."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    for chunk_size in ([None, 1] if kind == "trace" else [None]):  # chunking recomputes the graph in backward
        value = mgs_penalty(model, x, kind=kind, chunk_size=chunk_size)
        grads = torch.autograd.grad(value, list(model.parameters()))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    with torch.no_grad():
        assert not mgs_penalty(model, x, kind=kind).requires_grad
