"""mgs_metrics refuses a non-symmetric or clearly non-PSD matrix, or summarises it honestly with
assume_psd=False (issue 11, item 11)."""

from __future__ import annotations

import math

import pytest
import torch

from mgs_torch import mgs_kernel, mgs_metrics


def test_non_symmetric_matrix_is_refused():
    K = torch.eye(4, dtype=torch.float64)
    K[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"not symmetric.*\(K \+ K.T\) / 2"):
        mgs_metrics(K)
    with pytest.raises(ValueError, match="not symmetric"):
        mgs_metrics(K, assume_psd=False)
    m = mgs_metrics((K + K.T) / 2)
    assert m.trace == pytest.approx(4.0)


@pytest.mark.parametrize("K", [-torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))])
def test_indefinite_matrix_is_refused_unless_assume_psd_false(K):
    with pytest.raises(ValueError, match=r"not positive semi-definite.*assume_psd=False"):
        mgs_metrics(K)
    m = mgs_metrics(K, assume_psd=False)
    assert m.trace == pytest.approx(float(K.trace()))
    assert math.isnan(m.logdet) and math.isnan(m.logdet_per_row)  # never a silent -inf for an indefinite matrix
    assert m.rank == 3 and m.min_eigenvalue < 0
    assert m.condition_number == pytest.approx(float(K.diagonal().abs().max() / K.diagonal().abs().min()))


def test_psd_matrix_is_unchanged_by_assume_psd():
    K = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    a, b = mgs_metrics(K), mgs_metrics(K, assume_psd=False)
    assert a.as_dict() == b.as_dict()
    assert a.logdet == pytest.approx(math.log(6.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_kernels_pass_with_rounding_noise(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 10)).to(dtype)
    K = mgs_kernel(model, torch.randn(40, 8, dtype=dtype))  # 400 x 400 of rank <= 86 (parameters): tiny negative λ
    m = mgs_metrics(K)
    assert m.trace > 0 and m.logdet == -math.inf and m.rank <= 86
    assert m.min_eigenvalue <= 0  # rounding puts some of the 314 zero eigenvalues below zero: still accepted
    # a rank-deficient Gram matrix in float32 has eigenvalues slightly below zero from rounding alone
    # rounding-sized symmetric perturbations (10 eps per entry) are accepted too
    eps = torch.finfo(dtype).eps
    noisy = K + 10 * eps * float(K.abs().max()) * (lambda A: (A + A.T) / 2)(torch.randn(*K.shape, dtype=dtype))
    assert mgs_metrics(noisy).trace == pytest.approx(m.trace, rel=1e-4)


def test_a_singular_kernel_still_reports_minus_infinity_and_the_rank():
    J = torch.randn(5, 2, dtype=torch.float64)
    m = mgs_metrics(J @ J.T)
    assert m.logdet == -math.inf and m.rank == 2
