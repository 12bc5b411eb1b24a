"""Regularisation methods compared in the testbench, each with exactly one hyper-parameter.

A method may change the model (dropout), the optimiser (weight decay, Adam) or add a penalty to
the mini-batch loss L̄ = (1/n) Σ_i ℓ(f(x_i), y_i). Penalties are scaled so that their
hyper-parameter α means the same thing at any batch size:

* ``gradnorm_params``: α · ‖∇θ L̄‖² — the squared norm of the mini-batch loss gradient w.r.t. the
  parameters (explicit gradient regularisation; double backward through ``create_graph=True``).
* ``gradnorm_params_norm``: α · ‖∇θ L̄‖ — the paper's "Loss grad." baseline, the norm itself (not
  squared); √(Σ g² + 10⁻¹²) so that its gradient stays finite at a stationary point.
* ``gradnorm_inputs``: α · (1/n) Σ_i ‖∇_{x_i} ℓ_i‖² — the mean squared per-sample input gradient
  (Drucker & LeCun's double backpropagation). Since ℓ_i depends on x_i only, one backward of
  Σ_i ℓ_i gives every ∇_{x_i} ℓ_i.
* ``mgs_trace``: α · tr K / (n·q) — :func:`mgs_torch.mgs_penalty` with ``kind="trace"``,
  ``reduction="mean"``: the mean squared norm of J's rows, K the MGS kernel of the mini-batch.
  (The paper's α for tr K itself is α / (n·q).)
* ``mgs_trace_hutchinson``: the same penalty with ``estimator="hutchinson"`` (one per-sample
  Rademacher probe per step, from the run's own seeded generator): unbiased, ≈ q times cheaper.
* ``mgs_logdet``: α · log det K / (n·q) — ``kind="logdet"``, ``reduction="mean"`` (the mean log
  eigenvalue; a jitter is added automatically, with a one-time warning, if K is singular).

The optimiser is SGD (momentum 0) for every method except ``adam``, whose hyper-parameter is the
learning rate. Weight decay is SGD's L2 term (θ ← θ − η(∇L̄ + λθ)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from mgs_torch import mgs_penalty

__all__ = ["METHODS", "Method", "make_method", "method_names", "default_grid"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Method:
    """A regulariser with one hyper-parameter.

    Attributes:
        name: registry name (see :data:`METHODS`).
        value: the hyper-parameter's value (``None`` for ``unreg``).
        hyper: the hyper-parameter's name, e.g. ``"alpha"`` or ``"weight_decay"``.
        label: a human-readable label for plots and tables.
    """

    name: str
    value: float | None
    hyper: str | None
    label: str

    # -- what the method changes -------------------------------------------------------------
    def dropout(self) -> float:
        """Dropout probability for the model (0 unless this is ``dropout``)."""
        return float(self.value) if self.name == "dropout" else 0.0

    def optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """SGD with learning rate ``lr`` (plus L2 for ``weight_decay``), or Adam at lr = value for ``adam``."""
        if self.name == "adam":
            return torch.optim.Adam(params, lr=float(self.value))
        return torch.optim.SGD(params, lr=lr, weight_decay=float(self.value) if self.name == "weight_decay" else 0.0)

    def penalty(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, loss: Tensor,
                generator: torch.Generator | None = None) -> Tensor | None:
        """The un-weighted penalty g for this mini-batch (differentiable), or ``None``.

        ``loss`` is L̄ = ``loss_fn(model(x), y)`` (mean over the batch), already computed with a
        graph; ``x`` must have ``requires_grad`` for ``gradnorm_inputs`` (see :meth:`needs_input_grad`).
        ``generator`` draws the Hutchinson probes of ``mgs_trace_hutchinson``.
        """
        if self.name in ("gradnorm_params", "gradnorm_params_norm"):
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            sq = sum((g * g).sum() for g in grads)
            return sq if self.name == "gradnorm_params" else torch.sqrt(sq + 1e-12)
        if self.name == "gradnorm_inputs":
            # loss is the batch mean: ∇_{x_i} Σ_j ℓ_j = n · ∇_{x_i} L̄
            (gx,) = torch.autograd.grad(loss * x.shape[0], x, create_graph=True)
            return (gx * gx).sum() / x.shape[0]
        if self.name == "mgs_trace":
            return mgs_penalty(model, x, kind="trace", reduction="mean")
        if self.name == "mgs_trace_hutchinson":
            return mgs_penalty(model, x, kind="trace", estimator="hutchinson", num_probes=1, generator=generator, reduction="mean")
        if self.name == "mgs_logdet":
            return mgs_penalty(model, x, kind="logdet", reduction="mean")
        return None

    @property
    def alpha(self) -> float:
        """The penalty weight α (0 for methods without a penalty)."""
        return float(self.value) if self.name in _PENALTIES else 0.0

    @property
    def needs_input_grad(self) -> bool:
        return self.name == "gradnorm_inputs"

    @property
    def tag(self) -> str:
        """``name`` or ``name=value``, for file names and legends."""
        return self.name if self.value is None else f"{self.name}={self.value:g}"


_PENALTIES = ("gradnorm_params", "gradnorm_params_norm", "gradnorm_inputs", "mgs_trace", "mgs_trace_hutchinson", "mgs_logdet")

# name -> (hyper-parameter name, default value, tuning grid, label)
METHODS: dict[str, tuple[str | None, float | None, tuple[float, ...], str]] = {
    "unreg": (None, None, (), "unregularised"),
    "weight_decay": ("weight_decay", 1e-3, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "weight decay"),
    "dropout": ("p", 0.3, (0.1, 0.3, 0.5, 0.7), "dropout"),
    "gradnorm_params": ("alpha", 0.01, (1e-3, 1e-2, 1e-1, 1.0), "‖∇θL‖² penalty"),
    "gradnorm_inputs": ("alpha", 0.01, (1e-3, 1e-2, 1e-1, 1.0), "‖∇xL‖² penalty"),
    "mgs_trace": ("alpha", 3e-3, (3e-4, 1e-3, 3e-3, 1e-2), "MGS tr K"),
    "mgs_logdet": ("alpha", 3e-3, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "MGS log det K"),
    "adam": ("lr", 1e-3, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3), "Adam"),
    # variants added for the real-MNIST protocol (after the stand-in tables, so their order is unchanged)
    "gradnorm_params_norm": ("alpha", 0.01, (1e-3, 1e-2, 1e-1, 1.0), "‖∇θL‖ penalty"),
    "mgs_trace_hutchinson": ("alpha", 3e-3, (3e-4, 1e-3, 3e-3, 1e-2), "MGS tr K (Hutchinson)"),
}
PAPER_METHODS = ("unreg", "weight_decay", "dropout", "gradnorm_params", "gradnorm_inputs", "mgs_trace", "mgs_logdet")
# The seven of Table 1 with the paper's own "Loss grad." baseline ‖∇θL‖ (not squared): ``"paper-exact"``.
PAPER_EXACT_METHODS = ("unreg", "weight_decay", "dropout", "gradnorm_params_norm", "gradnorm_inputs", "mgs_trace", "mgs_logdet")


def method_names(spec: Iterable[str] | str) -> list[str]:
    """Expand ``"all"`` (the seven of Table 1 and Adam, with ‖∇θL‖²), ``"paper"`` (the seven compared in
    Table 1, ‖∇θL‖² as the loss-gradient baseline) and ``"paper-exact"`` (the seven with the paper's ‖∇θL‖)."""
    groups = {"all": list(PAPER_METHODS) + ["adam"], "paper": list(PAPER_METHODS), "paper-exact": list(PAPER_EXACT_METHODS)}
    names: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        expanded = groups.get(item, [item])
        for n in expanded:
            if n not in METHODS:
                raise ValueError(f"unknown method {n!r}; choose from {tuple(METHODS)} or 'all' / 'paper' / 'paper-exact'")
            if n not in names:
                names.append(n)
    return names


def make_method(name: str, value: float | None = None) -> Method:
    """The method ``name`` with hyper-parameter ``value`` (default: the registry's default)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}")
    hyper, default, _, label = METHODS[name]
    if hyper is None:
        if value is not None:
            raise ValueError(f"method {name!r} has no hyper-parameter, got value {value}")
        return Method(name, None, None, label)
    value = float(default if value is None else value)
    if name == "dropout" and not 0.0 < value < 1.0:
        raise ValueError(f"dropout probability must lie in (0, 1), got {value}")
    if value < 0 or (name == "adam" and value == 0):
        raise ValueError(f"{name}'s {hyper} must be {'positive' if name == 'adam' else 'non-negative'}, got {value}")
    return Method(name, value, hyper, label)


def default_grid(name: str) -> tuple[float, ...]:
    """The tuning grid for ``name`` (empty for ``unreg``)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}")
    return METHODS[name][2]
