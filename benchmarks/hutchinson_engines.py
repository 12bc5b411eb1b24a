"""Which engine a one-probe Hutchinson tr K should take: the structured engine against the reference (issue 22).

``strategy="auto"`` sends every call whose parameters the layer rules mostly cover to the structured engine. For
few-probe Hutchinson the reference engine (per-sample gradients by ``vmap(vjp)``) holds only n·k·p numbers, so it
could be the faster route. This script measures both, and the plain torch.func probe (per-sample gradients by
``vmap(grad)``, Σ‖·‖², none of mgs_torch's checks; issue 22 asks Hutchinson tr K to be at least as fast), in one
process, calls interleaved, CPU time of the process (less sensitive to other work on the cores than wall time),
the lower quartile of ``--repeats``:

    python benchmarks/hutchinson_engines.py --models lenet5 fcn resnet bert vit --n 8 32
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hutchinson_steps import interleaved_cpu_times, naive_per_sample_probe  # noqa: E402
from models import MODELS, make_input  # noqa: E402
from mgs_torch import mgs_trace  # noqa: E402
from mgs_torch.estimators import rademacher_probes  # noqa: E402

ENGINES = ("structured", "jacobian")


def lower_quartile_ms(times: list[float]) -> float:
    return sorted(times)[len(times) // 4] * 1e3


def measure(name: str, n: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = make_input(name, n)
    calls = {s: (lambda s=s: mgs_trace(model, x, strategy=s, estimator="hutchinson")) for s in ENGINES}
    q, gen = model(x).shape[-1], torch.Generator().manual_seed(0)

    def plain_probe():  # the straightforward torch.func estimate: vmap(grad) per-sample gradients, no checks
        with warnings.catch_warnings():  # SDPA's fused CPU kernels have no vmap rule: a per-sample loop, faster
            warnings.simplefilter("ignore")  # here than the math kernel (ViT 102 against 110 ms, BERT 16 against 19)
            return naive_per_sample_probe(model, x, rademacher_probes(1, n, q, gen, x.device)[0]).detach()

    calls["plain probe"] = plain_probe
    return {s: lower_quartile_ms(t) for s, t in interleaved_cpu_times(calls, repeats).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "fcn", "resnet", "bert", "vit"], choices=list(MODELS))
    ap.add_argument("--n", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | n | structured (ms) | reference (ms) | plain vmap(grad) probe (ms) | reference ÷ structured "
          "| plain probe ÷ structured |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        for name in args.models:
            ms = measure(name, n, args.repeats)
            print(f"| {name} | {n} | {ms['structured']:.1f} | {ms['jacobian']:.1f} | {ms['plain probe']:.1f} "
                  f"| {ms['jacobian'] / ms['structured']:.2f} | {ms['plain probe'] / ms['structured']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
