"""Where the time of an exact tr K goes on a model (issue 22, item 1: "profile first and say where the time goes").

For one model and batch, in one process (medians of ``--repeats``, no graph):
- tr K through mgs_torch's structured engine, its reference engine and the naive ``vmap(jacrev)`` contraction;
- a one-probe Hutchinson estimate through mgs_torch against a plain per-sample ``vmap(vjp)`` probe;
- the floors: a forward at n and at q·n, a plain training step at n;
- the structured engine's parameter routes (layer rules or the reference's parameter taps);
- cProfile of the structured tr K split into the backward pass over the k = q cotangents (autograd's
  ``run_backward``), the per-layer norm contractions (``einsum``/``bmm``/``matmul``), the forward's layers, and the
  rest (mgs_torch's and torch.func's Python: planning checks, the parameter-use watcher, op replacements, pytrees).

    python benchmarks/profile_trace.py --model vit --n 8
    python benchmarks/profile_trace.py --model bert --n 8
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import MODELS, make_input  # noqa: E402
from mgs_torch import mgs_trace  # noqa: E402
from mgs_torch._problem import build_problem  # noqa: E402
from mgs_torch.engines import structured  # noqa: E402

NORMS = ("einsum", "bmm", "matmul", "'mm'", "baddbmm")
FORWARD = ("linear", "conv", "layer_norm", "softmax", "scaled_dot_product", "gelu", "embedding", "max_pool", "relu")


def median_ms(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit", choices=list(MODELS))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MODELS[args.model]().eval()
    x = make_input(args.model, args.n)
    params = {k: v.detach() for k, v in model.named_parameters()}
    q = model(x[:1]).shape[-1]

    problem = build_problem(model, x)
    plan = structured.cached_plan(problem)[0]
    total = sum(p.numel() for p in problem.params.values())
    routes = Counter()
    for name, route in plan.routes().items():
        routes["layer rule" if name not in plan.fallback else "reference (parameter taps)"] += problem.params[name].numel()
    print(f"{args.model}, n = {args.n}, q = {q}, {total:,} parameters; routes by entries: "
          + ", ".join(f"{k} {v / total:.1%}" for k, v in routes.items()))

    def one(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def naive():
        return sum((j**2).sum() for j in vmap(jacrev(one), in_dims=(None, 0))(params, x).values())

    def probe():
        v = torch.randint(0, 2, (args.n, q)).to(x.dtype if x.is_floating_point() else torch.float32) * 2 - 1

        def sample(xi, vi):
            _, pullback = vjp(lambda p: one(p, xi), params)
            return sum((g**2).sum() for g in pullback(vi)[0].values())
        return vmap(sample)(x, v).sum()

    def plain_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), torch.zeros(args.n, dtype=torch.long)).backward()

    def forward(batch):
        with torch.no_grad():
            model(batch)

    xq = x.repeat(q, *([1] * (x.dim() - 1)))
    rows = {
        "tr K, structured": lambda: mgs_trace(model, x, strategy="structured"),
        "tr K, reference (jacobian)": lambda: mgs_trace(model, x, strategy="jacobian"),
        "tr K, naive vmap(jacrev)": naive,
        "Hutchinson tr K (1 probe), mgs_torch": lambda: mgs_trace(model, x, estimator="hutchinson"),
        "Hutchinson, plain vmap(vjp) probe": probe,
        "forward at n": lambda: forward(x),
        "forward at q·n": lambda: forward(xq),
        "plain training step at n": plain_step,
    }
    times = {name: median_ms(function, args.repeats) for name, function in rows.items()}
    print("| what | ms |\n|---|---:|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"structured: {times['tr K, naive vmap(jacrev)'] / times['tr K, structured']:.2f}× faster than naive; "
          f"Hutchinson {times['Hutchinson, plain vmap(vjp) probe'] / times['Hutchinson tr K (1 probe), mgs_torch']:.2f}× "
          f"the plain probe's speed")

    calls = 3
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        mgs_trace(model, x, strategy="structured")
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    whole = sum(entry[2] for entry in stats.values()) / calls  # total internal time per call
    parts = Counter()
    for (filename, _, function), (_, _, internal, _, _) in stats.items():
        label = function if filename == "~" else f"{Path(filename).name}:{function}"
        if "run_backward" in label:
            parts["backward over the q cotangents (autograd)"] += internal
        elif any(k in label for k in NORMS):
            parts["per-layer norm contractions (einsum/bmm/matmul)"] += internal
        elif filename == "~" and any(k in label for k in FORWARD):
            parts["the forward's layers (C++)"] += internal
        elif filename == "~":
            parts["other C++ ops"] += internal
        else:
            parts["Python (mgs_torch, torch.func, torch.nn, pytrees)"] += internal
    print(f"\ncProfile of the structured tr K, {whole * 1e3:.0f} ms per call (profiled):")
    for label, seconds in parts.most_common():
        print(f"  {label}: {seconds / calls * 1e3:.1f} ms ({seconds / calls / whole:.0%})")


if __name__ == "__main__":
    main()
