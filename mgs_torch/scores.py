r"""Per-sample MGS scores: how much gradient energy each sample has, and how much it agrees with the batch.

For a batch of n samples, let :math:`g_i` be sample i's gradient direction(s) in parameter space and

.. math:: S_{ij} = \langle g_i, g_j \rangle \qquad (n \times n)

the sample-level Gram matrix. Two forms of :math:`g_i` are offered:

* **outputs** (no targets): :math:`S_{ij} = \sum_a K_{(i,a),(j,a)} = \sum_a \nabla_\theta f_a(x_i)\cdot\nabla_\theta f_a(x_j)`,
  the output-summed MGS kernel (``mgs_kernel(..., outputs="sum")``, or the diagonal blocks' traces of
  a full kernel K). Label-free: what the network's function does around each sample.
* **loss** (targets given): :math:`g_i = \nabla_\theta \ell(f(x_i), y_i) = J_i^\top w_i` with
  :math:`w_i = \partial\ell/\partial f(x_i)` (softmax − one-hot for cross-entropy, 2(f − y) for squared
  error), so :math:`S_{ij} = w_i^\top K_{ij} w_j` — the Gram of per-sample *loss* gradients, what SGD
  actually adds up.

From S, per sample:

* ``energy[i]`` = :math:`S_{ii}` (for the outputs form, tr of K's i-th diagonal block, Σ_a ‖∇f_a(x_i)‖²);
* ``agreement[i]`` = :math:`\frac{1}{n-1}\sum_{j\ne i} S_{ij}/\sqrt{S_{ii}S_{jj}}`, the mean cosine between
  sample i's gradient and the others' (1: all alike; ≤ 0: it pulls against the batch);
* ``agreement_same_label[i]`` (loss form with class labels): the same mean, over the other samples
  with the same label only (NaN for a sample alone in its class) — a flipped sample's loss gradient
  pulls against those of the samples that truly have its label.

A mislabelled sample is expected to have a large loss-gradient energy and a low (negative) agreement
with the rest of its class; ``examples/RESULTS.md`` measures how well each score flags flipped labels
against the per-sample loss (``mgs-torch scores``).

Cost: one kernel (outputs form: ``mgs_kernel(outputs="sum")``, q output-backward passes at batch n;
loss form: one scalar output per sample, one backward pass at batch n) plus O(n²) for the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._dtypes import as_dtype
from ._linalg import check_square
from ._io import ModelCall, model_call
from ._validation import Inputs
from .kernel import mgs_kernel

__all__ = ["SampleScores", "mgs_sample_scores", "sample_scores_from_gram", "sample_scores_from_kernel", "LOSSES"]

#: losses whose output gradient w_i = ∂ℓ/∂f(x_i) is known
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")


@dataclass(frozen=True)
class SampleScores:
    """Per-sample scores of one batch (float64 CPU tensors of shape (n,), and the (n, n) Gram ``S``)."""

    energy: Tensor
    agreement: Tensor
    gram: Tensor
    form: str  # "outputs" or "loss"
    agreement_same_label: Tensor | None = None

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Median, min and max of each score, as floats for loggers."""
        out = {}
        for name in ("energy", "agreement"):
            v = getattr(self, name)
            out[f"{prefix}sample_{name}_median"] = float(v.median())
            out[f"{prefix}sample_{name}_min"] = float(v.min())
            out[f"{prefix}sample_{name}_max"] = float(v.max())
        return out


def sample_scores_from_gram(S: Tensor, form: str = "outputs", labels: Tensor | None = None) -> SampleScores:
    """``energy`` and ``agreement`` (and ``agreement_same_label`` when ``labels`` are given) from a
    sample-level Gram matrix S (n × n, symmetric PSD)."""
    check_square(S)
    S = S.detach().double().cpu()
    S = 0.5 * (S + S.T)
    n = S.shape[0]
    energy = S.diagonal().clone()
    norms = energy.clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, S / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    cos.fill_diagonal_(0.0)
    agreement = cos.sum(1) / (n - 1) if n > 1 else torch.zeros(n, dtype=torch.float64)
    same_label = None
    if labels is not None:
        lab = labels.detach().cpu().reshape(-1)
        same = lab[:, None] == lab[None, :]
        same.fill_diagonal_(False)
        count = same.sum(1)
        same_label = torch.where(count > 0, (cos * same).sum(1) / count.clamp_min(1), torch.full((n,), float("nan"), dtype=torch.float64))
    return SampleScores(energy=energy, agreement=agreement, gram=S, form=form, agreement_same_label=same_label)


def sample_scores_from_kernel(K: Tensor, num_samples: int) -> SampleScores:
    """The outputs-form scores from an MGS kernel: a full one (n·q rows ordered (sample, output)) or an
    output-summed one (n rows)."""
    check_square(K)
    N = K.shape[0]
    if not isinstance(num_samples, int) or num_samples < 1 or N % num_samples:
        raise ValueError(f"num_samples must divide the kernel's {N} rows (n·q rows, or n), got {num_samples!r}")
    q = N // num_samples
    S = K.detach().reshape(num_samples, q, num_samples, q).diagonal(dim1=1, dim2=3).sum(-1) if q > 1 else K.detach()
    return sample_scores_from_gram(S, "outputs")


def _output_gradients(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """w_i = ∂ℓ(f(x_i), y_i)/∂f(x_i), (n, q), for a per-sample loss."""
    f = outputs.detach().reshape(outputs.shape[0], -1)
    if loss == "cross_entropy":
        if targets.is_floating_point() or targets.dim() != 1:
            raise ValueError("loss='cross_entropy' needs class labels: an integer tensor of shape (n,)")
        if int(targets.min()) < 0 or int(targets.max()) >= f.shape[1]:
            raise ValueError(f"labels must lie in [0, {f.shape[1]}) for a model with {f.shape[1]} outputs")
        return torch.softmax(f, dim=1) - nn.functional.one_hot(targets.long().to(f.device), f.shape[1]).to(f.dtype)
    y = targets.detach().to(f).reshape(f.shape)
    return 2.0 * (f - y)


class _LossDirection(nn.Module):
    """x, w -> Σ_a w_a f_a(x): one scalar per sample whose gradient is sample i's loss gradient
    (``call`` maps the input tensors onto ``model`` and selects its raw outputs)."""

    def __init__(self, model: nn.Module, call: ModelCall):
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, w: Tensor, *inputs: Tensor) -> Tensor:
        out = self.call(self.model, inputs)
        return (out.reshape(out.shape[0], -1) * w).sum(1)


def mgs_sample_scores(
    model: nn.Module,
    inputs: Inputs,
    *,
    targets: Tensor | None = None,
    loss: str = "cross_entropy",
    **kernel_kwargs,
) -> SampleScores:
    """Per-sample gradient energy and agreement on a batch (see the module docstring for the formulas).

    Args:
        model, inputs: as for :func:`mgs_torch.mgs_kernel` (raw outputs, batch on dim 0).
        targets: ``None``: the outputs form (label-free). Given: the loss form, the Gram of per-sample
            loss gradients, with ``loss`` ``"cross_entropy"`` (class labels) or ``"mse"`` (targets
            shaped like the outputs).
        kernel_kwargs: ``params``, ``strategy``, ``chunk_size``, ``dtype``, ``batch_norm``, ``logits`` of ``mgs_kernel``.

    Leaves the model as it was (what ``mgs_kernel`` guarantees). Cost: see the module docstring.
    """
    if "outputs" in kernel_kwargs:
        raise TypeError("mgs_sample_scores chooses the kernel's outputs itself; do not pass outputs=")
    if targets is None:
        S = mgs_kernel(model, inputs, outputs="sum", **kernel_kwargs)
        return sample_scores_from_gram(S, "outputs")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    logits = kernel_kwargs.pop("logits", None)
    x, call = model_call(model, inputs, logits)
    if not isinstance(targets, Tensor) or targets.shape[0] != x[0].shape[0]:
        raise ValueError(f"targets must be a tensor with one row per sample ({x[0].shape[0]}), got {getattr(targets, 'shape', type(targets).__name__)}")
    was_training = [m.training for m in model.modules()]
    try:
        with torch.no_grad():
            if kernel_kwargs.get("batch_norm", "eval") == "eval":
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            devices = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"][:1]
            with torch.random.fork_rng(devices=devices):
                outputs = call(model, x)
    finally:
        for m, flag in zip(model.modules(), was_training):
            m.training = flag
    dtype = as_dtype("dtype", kernel_kwargs.get("dtype"))
    w = _output_gradients(outputs, targets, loss)
    w = w.to(dtype or next(p for p in model.parameters() if p.requires_grad).dtype)
    params = kernel_kwargs.pop("params", None)
    S = mgs_kernel(_LossDirection(model, call), (w, *x), params=_prefixed(params), **kernel_kwargs)
    return sample_scores_from_gram(S, "loss", labels=targets if loss == "cross_entropy" else None)


def _prefixed(params):
    """A ``params`` filter for ``model`` re-targeted at the wrapper, whose parameters are ``model.*``."""
    if params is None:
        return None
    if callable(params) and not isinstance(params, nn.Module):
        return lambda name, p: params(name.removeprefix("model."), p)
    items = [params] if isinstance(params, (str, nn.Module, nn.Parameter)) else list(params)
    return [f"model.{p}" if isinstance(p, str) else p for p in items]
