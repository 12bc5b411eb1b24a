"""The exact tr K through the per-sample-gradient libraries a user would otherwise reach for (issue #22, item 6).

tr K = Σ_i Σ_a ‖∇θ f_a(x_i)‖²: for each output a, the per-sample gradients of Σ_i f_a(x_i), squared and summed.

- BackPACK (``pip install backpack-for-pytorch``): ``BatchL2Grad`` on a copy of the model passed through
  ``extend``; one forward and q backward passes (``retain_graph``), each leaving ``param.batch_l2``, the
  per-sample squared norms.
- Opacus (``pip install opacus``): ``GradSampleModule(copy, loss_reduction="sum")``; q forwards and q backward
  passes (its hooks take one stored activation per backward), each leaving ``param.grad_sample``.

Both run on a deep copy of the model (their hooks stay off the model the other methods time), with every
BatchNorm on its running statistics, as mgs_torch (and the naive route) read BatchNorm: that is what makes a
per-sample gradient defined. A peer whose layers it does not cover raises while being prepared or on its first
call; ``prepare`` returns the reason instead, and the benchmark records the row as unsupported. A peer that runs
but leaves a trainable parameter without its per-sample quantity (BackPACK skips parameters held directly by a
module it has no extension for) is also unsupported: its sum would be silently short.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from typing import Callable

import torch
from torch import nn

PEERS = {"BackPACK BatchL2Grad": "backpack", "Opacus per-sample grads": "opacus"}
"""Row label -> the module that must import for the row to exist."""


def available() -> dict[str, str | None]:
    """Row label -> None where the peer imports, else why not (the benchmark prints it and skips the row)."""
    out = {}
    for label, module in PEERS.items():
        try:
            importlib.import_module(module)
            out[label] = None
        except Exception as exc:  # noqa: BLE001 - absent, or broken beside this torch
            out[label] = f"{module} not importable ({type(exc).__name__}: {exc})"
    return out


def _running_stats(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _check_covered(params: list[nn.Parameter], attr: str) -> None:
    missing = [i for i, p in enumerate(params) if getattr(p, attr, None) is None]
    if missing:
        raise NotImplementedError(f"{len(missing)} of {len(params)} trainable parameters got no {attr}")


def backpack_trace(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """tr K of ``model`` through BackPACK's BatchL2Grad (the model itself is left unextended)."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    net = extend(_running_stats(copy.deepcopy(model)))
    params = [p for p in net.parameters() if p.requires_grad]

    def trace(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        q = out.shape[1]
        total = out.new_zeros(())
        for a in range(q):
            last = a == q - 1
            for p in params:
                p.batch_l2 = None
            with backpack(BatchL2Grad(), retain_graph=not last):
                torch.autograd.backward(out[:, a].sum(), retain_graph=not last, inputs=params)
            _check_covered(params, "batch_l2")
            total = total + sum(p.batch_l2.sum() for p in params)
        for p in params:
            p.grad = p.batch_l2 = None
        return total.detach()

    return trace


def opacus_trace(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """tr K of ``model`` through Opacus' GradSampleModule (hooks on a copy, removed with it)."""
    from opacus import GradSampleModule

    net = _running_stats(copy.deepcopy(model))
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    params = [p for p in net.parameters() if p.requires_grad]

    def trace(x: torch.Tensor) -> torch.Tensor:
        out = gsm(x)
        total = out.new_zeros(())
        for a in range(out.shape[1]):
            if a:
                out = gsm(x)  # Opacus pops one stored activation per backward: a fresh forward for each output
            torch.autograd.backward(out[:, a].sum(), inputs=params)
            _check_covered(params, "grad_sample")
            total = total + sum((p.grad_sample**2).sum() for p in params)
            gsm.zero_grad(set_to_none=True)
        return total.detach()

    return trace


PREPARE = {"BackPACK BatchL2Grad": backpack_trace, "Opacus per-sample grads": opacus_trace}


def prepare(label: str, model: nn.Module, x: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-4):
    """(callable to time, None) when the peer's tr K on ``x`` equals ``reference`` to ``rtol``, else (None, why):
    'unsupported: ...' where it refuses the model, 'mismatch: ...' where it runs but disagrees."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the libraries' advice on first use (privacy, hooks), once per copy
            trace = PREPARE[label](model)
            value = trace(x)
    except Exception as exc:  # noqa: BLE001 - each library has its own way of refusing a layer
        return None, f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    ref = float(reference)
    if not abs(float(value) - ref) <= rtol * abs(ref):
        return None, f"mismatch: tr K {float(value):.6g} against {ref:.6g}"
    return (lambda: trace(x)), None
