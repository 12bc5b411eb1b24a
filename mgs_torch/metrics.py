"""Scalar summaries of an MGS kernel K (symmetric PSD, N = n·q rows or n rows when output-summed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from ._linalg import check_square
from ._threads import cpu_threads

__all__ = ["MGSMetrics", "mgs_metrics", "kernel_target_alignment"]


@dataclass(frozen=True)
class MGSMetrics:
    """Metrics of one kernel; every number is a Python float/int, ``-inf``/``inf`` where singular.

    Attributes:
        trace: tr K = Σ λ_k.
        logdet: log det K = Σ log λ_k (natural log); ``-inf`` when K is numerically singular
            (some λ_k ≤ tol), never NaN.
        rank: numerical rank, #{λ_k > tol} with tol = ``rtol``·λ_max (default rtol = N·eps(dtype of K)).
        size: N, the number of rows of K.
        trace_per_row: tr K / N.  logdet_per_row: log det K / N.
        effective_rank: exp(−Σ p_k log p_k), p_k = λ_k / Σλ (Roy & Vetterli, 2007); between 1 and N.
        condition_number: λ_max / λ_min; ``inf`` when singular.
        min_eigenvalue, max_eigenvalue: extremes of the spectrum.
        alignment: kernel–target alignment ⟨K, yyᵀ⟩_F / (‖K‖_F ‖yyᵀ‖_F) when targets were given.
        jitter: ε added to the diagonal before the spectrum was taken.
        eigenvalues: the spectrum, descending, float64 on the CPU (not part of :meth:`as_dict`).
    """

    trace: float
    logdet: float
    rank: int
    size: int
    trace_per_row: float
    logdet_per_row: float
    effective_rank: float
    condition_number: float
    min_eigenvalue: float
    max_eigenvalue: float
    alignment: float | None = None
    jitter: float = 0.0
    eigenvalues: Tensor = field(default=None, repr=False, compare=False)

    @property
    def singular(self) -> bool:
        """True when log det K is −∞ (rank < size)."""
        return self.rank < self.size

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The scalar fields as ``{prefix + name: float}`` for loggers (alignment only when set)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("eigenvalues", "jitter") or value is None:
                continue
            out[prefix + f.name] = float(value)
        return out


def _target_matrix(targets: Tensor, n_rows: int) -> Tensor:
    """Targets as a matrix Y with n_rows rows (full kernel) or n rows (output-summed kernel)."""
    t = targets.detach()
    n = t.shape[0]
    if t.dim() == 1 and not t.is_floating_point():
        # class labels: one-hot with q = N/n classes (full kernel) or max label + 1 (summed kernel)
        classes = n_rows // n if n_rows != n else int(t.max()) + 1
        if int(t.max()) >= classes or int(t.min()) < 0:
            raise ValueError(f"labels must lie in [0, {classes}) for a kernel of {n_rows} rows and {n} samples")
        Y = torch.nn.functional.one_hot(t.long(), classes).double()
    else:
        Y = t.double().reshape(n, -1)
    if Y.numel() == n_rows:  # full kernel: one long vector ordered (sample, output)
        return Y.reshape(n_rows, 1)
    if Y.shape[0] == n_rows:  # summed kernel: YYᵀ over samples
        return Y
    raise ValueError(
        f"targets of shape {tuple(targets.shape)} do not match a kernel with {n_rows} rows: give one row per "
        f"sample, with q values per sample for the full kernel (or class labels)"
    )


def kernel_target_alignment(K: Tensor, targets: Tensor) -> float:
    """⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F) (Cristianini et al., 2002); uncentred, in [-1, 1]."""
    check_square(K)
    Y = _target_matrix(targets, K.shape[0])
    K64 = K.detach().double().cpu()
    Y = Y.cpu()
    num = float(torch.sum((Y.T @ K64) * Y.T))
    den = float(torch.linalg.matrix_norm(K64)) * float(torch.linalg.matrix_norm(Y @ Y.T))
    return num / den if den > 0 else float("nan")


def mgs_metrics(
    K: Tensor,
    *,
    targets: Tensor | None = None,
    jitter: float = 0.0,
    rtol: float | None = None,
    threads: int | None = 1,
    assume_psd: bool = True,
) -> MGSMetrics:
    """Trace, log-determinant, rank, spectrum summaries and alignment of a kernel from :func:`mgs_kernel`.

    The spectrum is taken in float64 on the CPU (``eigvalsh``, O(N³)); log det uses a Cholesky
    factorisation (equal to ``slogdet`` for positive-definite K) and is ``-inf`` with the numerical
    rank when K + jitter·I is singular. Never raises for a singular K; raises ``ValueError`` for a
    non-square or non-finite one.

    K must be symmetric: ``max|K − Kᵀ| ≤ sqrt(eps)·max|K|`` (eps of K's dtype; rounding in a float32
    kernel stays far below this), else ``ValueError`` — a non-symmetric matrix is not a kernel, and
    symmetrising it silently would hide the mistake (pass ``(K + K.T) / 2`` if that is what you mean).

    ``assume_psd=True`` (default): K must be positive semi-definite, as every J Jᵀ is; an eigenvalue
    below ``−sqrt(eps)·max|λ|`` (far beyond rounding) raises ``ValueError`` instead of returning a
    negative trace or a meaningless log det. ``assume_psd=False``: any symmetric matrix is accepted
    and summarised as it is; where it has a negative eigenvalue, ``logdet`` (and its per-row form) is
    NaN, the rank counts |λ| > tol and the condition number is max|λ| / min|λ|.

    ``threads`` caps the CPU threads of the factorisations (``None``: torch's setting). The default,
    one, is deliberate: when the cores are shared with other work (a training run, a data loader),
    LAPACK's multi-threaded eigensolver was measured 20–1000× slower than a single thread
    (N = 1280 and 320 on 2 busy cores), while on idle cores more threads gain little at these sizes.
    """
    check_square(K)
    Kd = K.detach()
    if not bool(torch.isfinite(Kd).all()):
        raise ValueError("K has non-finite entries (NaN/inf); the model outputs or weights have diverged")
    N = Kd.shape[0]
    K64 = Kd.double().cpu()
    eps = torch.finfo(Kd.dtype if Kd.is_floating_point() else torch.float64).eps
    scale = float(K64.abs().max())
    asym = float((K64 - K64.T).abs().max())
    if asym > math.sqrt(eps) * scale:
        raise ValueError(
            f"K is not symmetric (max |K - K.T| = {asym:.3g}, max |K| = {scale:.3g}); an MGS kernel J Jᵀ is. Pass the "
            f"output of mgs_kernel, or symmetrise it yourself with (K + K.T) / 2 if that is what you mean"
        )
    K64 = 0.5 * (K64 + K64.T)
    trace = float(K64.diagonal().sum())
    if jitter:
        K64 = K64 + float(jitter) * torch.eye(N, dtype=torch.float64)
    with cpu_threads(threads):
        eig = torch.linalg.eigvalsh(K64).flip(0)
    lam_max = float(eig[0])
    lam_abs = float(eig.abs().max())
    lam_min = float(eig[-1])
    if lam_min < -math.sqrt(eps) * lam_abs and assume_psd:
        raise ValueError(
            f"K is not positive semi-definite: its smallest eigenvalue is {lam_min:.3g} (largest |λ| {lam_abs:.3g}), far "
            f"below rounding; every MGS kernel J Jᵀ is PSD. Pass the output of mgs_kernel, or assume_psd=False to "
            f"summarise an indefinite symmetric matrix (log det is then NaN)"
        )
    if rtol is None:
        rtol = N * eps
    tol = rtol * max(abs(lam_max), lam_abs)
    indefinite = not assume_psd and lam_min < -tol
    rank = int((eig.abs() > tol).sum()) if indefinite else int((eig > tol).sum())
    if indefinite:
        absolute = eig.abs()
        logdet = math.nan
        cond = float(absolute.max() / absolute.min()) if float(absolute.min()) > tol else math.inf
    elif rank == N:
        with cpu_threads(threads):
            L, info = torch.linalg.cholesky_ex(K64)
        logdet = float(2.0 * torch.log(L.diagonal()).sum()) if int(info) == 0 else float(torch.log(eig).sum())
        cond = lam_max / lam_min
    else:
        logdet, cond = -math.inf, math.inf
    pos = eig.clamp_min(0)
    total = float(pos.sum())
    if total > 0:
        p = pos[pos > 0] / total
        eff_rank = math.exp(float(-(p * torch.log(p)).sum()))
    else:
        eff_rank = 0.0
    return MGSMetrics(
        trace=trace,
        logdet=logdet,
        rank=rank,
        size=N,
        trace_per_row=trace / N,
        logdet_per_row=logdet / N,
        effective_rank=eff_rank,
        condition_number=cond,
        min_eigenvalue=lam_min,
        max_eigenvalue=lam_max,
        alignment=None if targets is None else kernel_target_alignment(Kd, targets),
        jitter=float(jitter),
        eigenvalues=eig,
    )
