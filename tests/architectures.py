"""The comparison every architecture file makes (torchvision, timm, Hugging Face): mgs_torch's K and
trace-penalty gradient against the independent per-sample autograd loop of ``reference.py``."""

from __future__ import annotations

import warnings

import torch

from reference import flat_gradients, kernel_loop, penalty_grad_loop, relative_error, trainable
from mgs_torch import mgs_kernel, mgs_penalty


def loop_reference(model, x) -> tuple[torch.Tensor, torch.Tensor]:
    """K and ∂ tr K/∂θ (all trainable parameters, concatenated) by the autograd loop."""
    grads = penalty_grad_loop(model, x, "trace")
    return kernel_loop(model, x).detach(), flat_gradients(grads, trainable(model)).detach()


def assert_matches_the_loop(model, x, strategy: str, reference: tuple[torch.Tensor, torch.Tensor], tol: float,
                            grad_tol: float | None = None) -> None:
    """K and the penalty gradient of ``strategy`` within ``tol`` (``grad_tol`` for the gradient) of ``reference``."""
    K_ref, grad_ref = reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = mgs_kernel(model, x, strategy=strategy)
        value = mgs_penalty(model, x, strategy=strategy, reduction="sum")
    grad = flat_gradients(torch.autograd.grad(value, trainable(model), allow_unused=True), trainable(model))
    errors = {"K": relative_error(K, K_ref), "∂ tr K": relative_error(grad, grad_ref)}
    tols = {"K": tol, "∂ tr K": tol if grad_tol is None else grad_tol}
    assert all(errors[k] <= tols[k] for k in errors), f"strategy={strategy!r}: relative errors {errors}, tolerances {tols}"
