"""A one-probe Hutchinson penalty step against a plain step, per model, and where the extra time goes (issue 22, item 2).

Per model and batch size, four training steps (cross-entropy + α·penalty, SGD), timed interleaved in one process,
process CPU time, median of ``--repeats``:

- plain: the cross-entropy step alone, the denominator of every ratio;
- mgs_torch: ``mgs_penalty(model, x, estimator="hutchinson")`` (one probe, ``strategy="auto"``);
- per-sample probe, naive: the same estimator written straightforwardly in torch.func — per-sample gradients of
  ⟨f(x_i), v_i⟩ by ``vmap(grad)``, Σ_i ‖·‖², double backward (the estimator's own cost without mgs_torch);
- whole-batch probe, naive: ‖Jᵀv‖² of one vector-Jacobian product over the whole batch, double backward (the
  cheapest unbiased estimate of tr K, far noisier: its cross-sample terms do not cancel per draw).

Before timing, mgs_torch's and the naive per-sample estimate are compared on the same Rademacher probe (relative
1e-4); a model where they differ is reported and not timed. Then torch.profiler splits one step of each of the
plain and the mgs_torch step into operator families (ms per step, self CPU time), which shows what the penalty
adds: the second forward, the probe's backward, the per-sample norms and the double backward.

Models run in eval mode (BatchNorm on running statistics, no Dropout), so every route computes the same function,
and every step under SDPA's math kernel (the fused CPU attention kernels have no double backward), as bench_mgs.py.

    OMP_NUM_THREADS=1 python benchmarks/hutchinson_steps.py --models lenet5 fcn resnet resnet18 vit --n 8 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import MODELS, make_input  # noqa: E402
from mgs_torch import mgs_penalty  # noqa: E402
from mgs_torch.estimators import rademacher_probes  # noqa: E402

ALPHA = 1e-3
METHODS = ("plain", "mgs_torch", "per-sample probe, naive", "whole-batch probe, naive")
FAMILIES = (  # operator name fragments -> family, first match wins
    ("convolution", "convolution"),
    ("attention", "attention"),
    ("softmax", "attention"),
    ("pool", "pooling"),
    ("mm", "matmul"),
    ("einsum", "matmul"),
    ("linear", "matmul"),
    ("norm", "normalisation"),
)


def naive_per_sample_probe(model, x, v):
    """Σ_i ‖∇θ ⟨f(x_i), v_i⟩‖², per-sample gradients by vmap(grad) over functional_call, differentiable in θ."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def probed(p, xi, vi):
        return (functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0) * vi).sum()

    grads = vmap(grad(probed), in_dims=(None, 0, 0))(params, x, v)
    return sum(g.pow(2).sum() for g in grads.values())


def naive_whole_batch_probe(model, x, v):
    """‖Jᵀv‖² for one probe over the whole batch (one vector-Jacobian product), differentiable in θ."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    g = torch.autograd.grad(out, params, v, create_graph=True)
    return sum(t.pow(2).sum() for t in g)


def make_steps(name: str, n: int, seed: int = 0):
    torch.manual_seed(seed)
    base = MODELS[name]().eval()
    x = make_input(name, n)
    y = torch.randint(0, 10, (n,))
    q = base(x).shape[-1]
    steps = {}
    for method in METHODS:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)

        @sdpa_kernel(SDPBackend.MATH)
        def step(model=model, opt=opt, gen=gen, method=method):
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            if method == "mgs_torch":
                loss = loss + ALPHA * mgs_penalty(model, x, estimator="hutchinson", reduction="sum", generator=gen)
            elif method != "plain":
                v = rademacher_probes(1, n, q, gen, x.device)[0]
                penalty = (naive_per_sample_probe if method.startswith("per-sample") else naive_whole_batch_probe)(model, x, v)
                loss = loss + ALPHA * penalty
            loss.backward()
            opt.step()

        steps[method] = step
    return base, x, q, steps


@sdpa_kernel(SDPBackend.MATH)
def agreement(base, x, q) -> float:
    """Relative difference of mgs_torch's and the naive per-sample estimate on the same probe."""
    ours = mgs_penalty(base, x, estimator="hutchinson", reduction="sum", generator=torch.Generator().manual_seed(5))
    v = rademacher_probes(1, x.shape[0], q, torch.Generator().manual_seed(5), x.device)[0]
    theirs = naive_per_sample_probe(base, x, v)
    return float(((ours - theirs).abs() / theirs.abs()).detach())


def family(op: str) -> str:
    for fragment, fam in FAMILIES:
        if fragment in op:
            return fam
    return "other ops"


def op_families(step, total_ms: float, steps: int = 2) -> dict[str, float]:
    """Self CPU ms per step by operator family (aten ops under torch.profiler), and the rest of the unprofiled step
    time ``total_ms``: Python, the autograd engine, dispatch."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            out[family(event.key)] += event.self_cpu_time_total / 1e3 / steps
    out["outside aten ops"] = max(0.0, total_ms - sum(out.values()))
    return {k: v for k, v in out.items() if v >= 0.05}


def interleaved_cpu_times(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Each call twice to warm up (plans, self-checks, allocator), then ``repeats`` rounds of every call in turn:
    the process CPU time of each call, in seconds (less sensitive to other work on the cores than wall time)."""
    for call in calls.values():
        call(), call()
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            started = time.process_time()
            call()
            times[key].append(time.process_time() - started)
    return times


def measure(name: str, n: int, repeats: int, profile_ops: bool) -> None:
    base, x, q, steps = make_steps(name, n)
    rel = agreement(base, x, q)
    if rel > 1e-4:
        print(f"| {name} | {n} | mismatch: mgs_torch and the naive per-sample probe differ by {rel:.1e} | | | |", flush=True)
        return
    times = interleaved_cpu_times(steps, repeats)
    med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    plain = med["plain"]
    cells = " | ".join(f"{med[m]:.1f} ms ({med[m] / plain:.1f}×)" for m in METHODS[1:])
    print(f"| {name} | {n} | {plain:.1f} ms | {cells} | {rel:.0e} |", flush=True)
    if profile_ops:
        fam_plain, fam_mgs = op_families(steps["plain"], plain), op_families(steps["mgs_torch"], med["mgs_torch"])
        keys = sorted(set(fam_plain) | set(fam_mgs), key=lambda k: -fam_mgs.get(k, 0.0))
        parts = ", ".join(f"{k} {fam_plain.get(k, 0.0):.1f} → {fam_mgs.get(k, 0.0):.1f}" for k in keys)
        PROFILES.append(f"| {name} | {n} | {parts} |")


PROFILES: list[str] = []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "fcn", "resnet", "resnet18", "vit"], choices=list(MODELS))
    ap.add_argument("--n", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="time the steps only, no operator families")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# one-probe Hutchinson step against a plain step: torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {args.repeats}, process CPU time, eval mode")
    print("| model | n | plain step | " + " | ".join(METHODS[1:]) + " | mgs_torch vs naive, same probe |")
    print("|---|---:|---:|" + "---:|" * (len(METHODS) - 1) + "---:|")
    for name in args.models:
        for n in args.n:
            measure(name, n, args.repeats, not args.no_profile)
    if PROFILES:
        print("\n# ms per step by operator family, plain → mgs_torch Hutchinson step: aten ops' self CPU time under "
              "torch.profiler (2 steps), and the rest of the unprofiled median (Python, autograd engine, dispatch)")
        print("| model | n | families |")
        print("|---|---:|---|")
        print("\n".join(PROFILES))


if __name__ == "__main__":
    main()
