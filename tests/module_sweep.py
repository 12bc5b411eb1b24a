"""Every ``torch.nn`` module of PyTorch's own module database, as mgs_torch runs it, against the loop.

The layer-level companion of ``opinfo_sweep.py``: ``torch.testing._internal.common_modules.module_db``
lists the nn modules with the constructor arguments and inputs PyTorch's own tests use. For every
(non-loss) module and each of its batched inputs, a model scales the first input by a trainable
θ (so parameter-free layers are differentiated too: pooling, padding, activations) and returns the
module's first output,

    f(x) = module(x ⊙ θ, *other inputs)          (θ shaped like one sample of x),

and :func:`mgs_torch.verify` compares K and the trace-penalty gradient with the plain per-sample
loop, with both strategies. Inputs whose dim 0 is not the batch (time-major attention and RNN
inputs) make samples "interact" as far as mgs_torch can tell; they are listed apart.

Needs ``pip install expecttest hypothesis``. ``python tests/module_sweep.py [--modules Name ...]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import mgs_torch
from sweep_report import CATEGORIES, classify

D = torch.float64


class Scaled(nn.Module):
    """module(x ⊙ θ, *rest), its first tensor output."""

    def __init__(self, module: nn.Module, sample: torch.Tensor):
        super().__init__()
        self.module = module
        self.theta = nn.Parameter(1 + 0.1 * torch.randn_like(sample))

    def forward(self, x, *rest):
        out = self.module(x * self.theta, *rest)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out


def batched(args: tuple, n: int = 3) -> tuple | None:
    """The forward inputs with a batch of ``n`` on dim 0 (a batch of one is replicated with noise)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        return None
    if x.shape[0] >= 2:
        return args
    if any(isinstance(a, torch.Tensor) and a.shape[:1] != (1,) for a in args[1:]):
        return None
    return tuple(torch.cat([a + 0.05 * torch.randn_like(a) if a.is_floating_point() else a for _ in range(n)])
                 if isinstance(a, torch.Tensor) else a for a in args)


def sweep(names: list[str] | None) -> dict[str, int]:
    from torch.testing._internal.common_modules import module_db

    counts = dict.fromkeys(CATEGORIES + ("skipped",), 0)
    for info in module_db:
        name = info.module_cls.__name__
        # losses are not models; fractional max pooling draws random regions each call (K is random)
        if name.endswith("Loss") or name.startswith("FractionalMaxPool") or (names and name not in names):
            continue
        for training in (False,):
            for inp in info.module_inputs_func(info, device="cpu", dtype=D, requires_grad=False, training=training):
                if "no_batch_dim" in (inp.desc or "") or inp.forward_input is None:
                    counts["skipped"] += 1
                    continue
                args = batched(tuple(inp.forward_input.args))
                if args is None or inp.forward_input.kwargs:
                    counts["skipped"] += 1
                    continue
                torch.manual_seed(0)
                try:
                    module = info.module_cls(*inp.constructor_input.args, **inp.constructor_input.kwargs).to(D).eval()
                    model = Scaled(module, args[0][0]).eval()
                    with torch.no_grad():
                        out = model(*args)
                    if (not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != args[0].shape[0]
                            or not torch.isfinite(out).all()):
                        counts["skipped"] += 1
                        continue
                except Exception:  # noqa: BLE001 - this input does not fit our wrapping
                    counts["skipped"] += 1
                    continue
                label = f"{name}[{inp.desc or ''}] {tuple(args[0].shape)}"
                for strategy in ("auto", "jacobian"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        try:
                            report = mgs_torch.verify(model, args, samples=3, strategy=strategy)
                        except (ValueError, TypeError):  # dim 0 is not the batch, or nested inputs (LSTM states)
                            counts["skipped"] += 1
                            break
                    category, detail = classify(report)
                    counts[category] += 1
                    if category != "ok":
                        print(f"{category.upper():8s} {label} {strategy}: {detail}", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", help="class names (default: every non-loss module)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"totals: {sweep(args.modules)}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
