"""Log-determinants of positive semi-definite kernels, honest about singularity."""

from __future__ import annotations

import torch
from torch import Tensor

from ._guards import capturing_cuda_graph
from ._warnings import warn_once


def check_square(K: Tensor) -> None:
    if not isinstance(K, Tensor):
        raise TypeError(f"K must be a tensor, got {type(K).__name__}")
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"K must be a non-empty square matrix, got shape {tuple(K.shape)}")


class _LogdetFromCholesky(torch.autograd.Function):
    """2 Σ log L_ii for the Cholesky factor L of K + εI (given), with d/dK = (K + εI)⁻¹ =
    cholesky_inverse(L): one triangular inversion and product (about n³ flops) where the generic
    Cholesky backward takes a product and two triangular solves (about 4 n³). Under create_graph
    the inverse is recomputed from K differentiably, so higher derivatives stay exact."""

    @staticmethod
    def forward(K: Tensor, L: Tensor, eps: float) -> Tensor:
        return 2.0 * torch.log(L.diagonal()).sum()

    @staticmethod
    def setup_context(ctx, inputs, output):
        K, L, eps = inputs
        ctx.save_for_backward(K, L)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad: Tensor):
        K, L = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradient is wanted: differentiate through K
            L = torch.linalg.cholesky(K + ctx.eps * torch.eye(K.shape[0], dtype=K.dtype, device=K.device))
        return grad * torch.cholesky_inverse(L), None, None


def logdet_psd(K: Tensor, jitter: float = 0.0, max_tries: int = 6) -> Tensor:
    """log det(K + εI) via Cholesky, 2 Σ log L_ii, differentiable (d = tr((K+εI)⁻¹ dK)).

    ε starts at ``jitter``; if K + εI is not numerically positive definite, ε grows from
    1e-10·mean(diag K) by factors of 100 (at most ``max_tries`` times) and a warning is issued once.
    Raises ``ValueError`` if no such ε works (K has non-finite entries or is far from PSD).

    While a CUDA graph is being captured, where no host sync is allowed, ε stays at ``jitter`` and
    the result is NaN (not an error) when K + εI is not numerically positive definite.
    """
    check_square(K)
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    if torch.compiler.is_compiling() or capturing_cuda_graph(K.device):  # no host sync: no retry
        L, info = torch.linalg.cholesky_ex((K + jitter * eye if jitter else K).detach())
        value = _LogdetFromCholesky.apply(K, L, float(jitter))
        return torch.where(info == 0, value, torch.full_like(value, float("nan")))
    scale = float(K.detach().diagonal().mean().abs()) or 1.0
    first = max(float(jitter), 1e-10 * scale)
    schedule = [float(jitter)] + [first * 100.0**i for i in range(max_tries)]
    for eps in schedule:
        L, info = torch.linalg.cholesky_ex((K + eps * eye if eps else K).detach())
        if int(info) == 0:
            if eps != float(jitter):
                warn_once(
                    "logdet-jitter",
                    f"MGS kernel not positive definite; added jitter {eps:.3g}·I for its log-determinant "
                    f"(pass a larger jitter to silence this)",
                )
            return _LogdetFromCholesky.apply(K, L, eps)
    raise ValueError(
        f"the MGS kernel is not positive semi-definite even with jitter {schedule[-1]:.3g}; it may contain "
        f"NaN/inf (check the model outputs) — log det is undefined"
    )
