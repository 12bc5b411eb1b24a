"""mgs_metrics against numpy, including singular kernels."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import eigensolver_threads, mlp
from mgs_torch import MGSMetrics, kernel_target_alignment, mgs_kernel, mgs_metrics


def random_psd(N, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, rank or N + 3, generator=g, dtype=torch.float64)
    return A @ A.T


def test_well_conditioned_kernel_matches_numpy():
    K = random_psd(12)
    m = mgs_metrics(K)
    sign, logdet = np.linalg.slogdet(K.numpy())
    eig = np.linalg.eigvalsh(K.numpy())[::-1]
    assert sign == 1
    assert m.logdet == pytest.approx(logdet, rel=1e-12)
    assert m.trace == pytest.approx(float(np.trace(K.numpy())), rel=1e-12)
    assert m.rank == 12 and m.size == 12 and not m.singular
    assert m.trace_per_row == pytest.approx(m.trace / 12) and m.logdet_per_row == pytest.approx(m.logdet / 12)
    np.testing.assert_allclose(m.eigenvalues.numpy(), eig, rtol=1e-10)
    assert m.condition_number == pytest.approx(eig[0] / eig[-1], rel=1e-9)
    assert m.max_eigenvalue == pytest.approx(eig[0]) and m.min_eigenvalue == pytest.approx(eig[-1])
    p = eig / eig.sum()
    assert m.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert 1 <= m.effective_rank <= 12


def test_singular_kernel_reports_minus_infinity_and_rank():
    K = random_psd(10, rank=4)
    m = mgs_metrics(K)
    assert m.logdet == -math.inf and m.logdet_per_row == -math.inf
    assert m.rank == 4 == np.linalg.matrix_rank(K.numpy())
    assert m.singular and m.condition_number == math.inf
    assert not any(math.isnan(v) for v in m.as_dict().values())


def test_zero_kernel_is_reported_not_raised():
    m = mgs_metrics(torch.zeros(3, 3))
    assert m.rank == 0 and m.logdet == -math.inf and m.trace == 0 and m.effective_rank == 0


def test_jitter_regularises_a_singular_kernel():
    K = random_psd(8, rank=3)
    m = mgs_metrics(K, jitter=1e-3)
    _, expected = np.linalg.slogdet(K.numpy() + 1e-3 * np.eye(8))
    assert m.logdet == pytest.approx(expected, rel=1e-10) and m.rank == 8
    assert m.trace == pytest.approx(float(K.trace()))  # the trace is of K itself


def test_a_model_with_fewer_parameters_than_rows_gives_a_singular_kernel():
    model = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 3)).double()  # p = 9 < n·q = 18
    K = mgs_kernel(model, torch.randn(6, 2, dtype=torch.float64))
    m = mgs_metrics(K)
    assert m.logdet == -math.inf and m.rank <= 9


def test_float32_kernel_uses_float32_rank_tolerance():
    K = random_psd(6, rank=6).float()
    K32 = K.clone()
    K32[-1] = K32[-2]
    K32[:, -1] = K32[:, -2]  # exactly duplicated row/column: singular up to rounding
    assert mgs_metrics(K32).rank == 5


def test_alignment_full_and_summed_kernels():
    torch.manual_seed(0)
    model = mlp(3)
    x = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2, 0])
    Y = torch.nn.functional.one_hot(labels, 3).double()
    K = mgs_kernel(model, x)
    y = Y.reshape(-1, 1)
    expected = float((y.T @ K @ y) / (torch.linalg.norm(K) * torch.linalg.norm(y @ y.T)))
    assert kernel_target_alignment(K, labels) == pytest.approx(expected)
    assert kernel_target_alignment(K, Y) == pytest.approx(expected)
    assert mgs_metrics(K, targets=labels).alignment == pytest.approx(expected)
    Ks = mgs_kernel(model, x, outputs="sum")
    YY = Y @ Y.T
    expected_sum = float((Ks * YY).sum() / (torch.linalg.norm(Ks) * torch.linalg.norm(YY)))
    assert kernel_target_alignment(Ks, labels) == pytest.approx(expected_sum)
    # regression targets, q = 1
    reg = mlp(1)
    t = torch.randn(5, dtype=torch.float64)
    K1 = mgs_kernel(reg, x)
    e1 = float((t @ K1 @ t) / (torch.linalg.norm(K1) * (t @ t)))
    assert kernel_target_alignment(K1, t) == pytest.approx(e1)


def test_as_dict_has_stable_float_names():
    m = mgs_metrics(random_psd(4), targets=torch.randn(4))
    d = m.as_dict(prefix="mgs/")
    assert set(d) == {
        "mgs/trace", "mgs/logdet", "mgs/rank", "mgs/size", "mgs/trace_per_row", "mgs/logdet_per_row",
        "mgs/effective_rank", "mgs/condition_number", "mgs/min_eigenvalue", "mgs/max_eigenvalue", "mgs/alignment",
    }
    assert all(isinstance(v, float) for v in d.values())
    assert "mgs/alignment" not in mgs_metrics(random_psd(4)).as_dict("mgs/")
    assert isinstance(m, MGSMetrics)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 3), torch.zeros(0, 0)])
def test_non_square_kernel_is_rejected(bad):
    with pytest.raises(ValueError, match="square"):
        mgs_metrics(bad)


def test_non_finite_kernel_is_rejected():
    K = random_psd(3)
    K[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mgs_metrics(K)


def test_mismatched_targets_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        kernel_target_alignment(random_psd(6), torch.randn(4, 5))
    with pytest.raises(ValueError, match="labels must lie"):
        kernel_target_alignment(random_psd(6), torch.tensor([0, 1, 5]))


def test_metrics_bound_the_eigensolver_threads_and_restore_them(monkeypatch):
    seen = eigensolver_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # more than the default cap, so the cap is observable even where tests run one thread
    try:
        K = random_psd(30)
        a, b = mgs_metrics(K), mgs_metrics(K, threads=None)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert a.logdet == pytest.approx(b.logdet) and a.rank == b.rank
