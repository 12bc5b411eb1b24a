"""Where the time of one MGS training step goes: torch.profiler's operator table (CPU or CUDA).

    PYTHONPATH=. python benchmarks/profile_step.py --model cifar_cnn --n 128 --variant trace [--device cuda]
        [--transposed-conv [on|off|auto]] (mgs_torch.op_fixes' transposed-convolution backward, for an A/B;
                                       default auto: on in the exact trace step on CUDA only, as in the library)
        [--route materialize|ghost]   (force one Gram route for every convolution, for tuning the cost model)
        [--time-only]                 (the median step time, no operator table)
        [--kernels]                   (which operator, called from which autograd node, with which input
                                       shapes, launched the slowest kernels: how a kernel is identified)

Prints the median time of 10 steps, then the operator table of 3 profiled steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mgs import median_ms  # noqa: E402
from cuda_graphs import make_step  # noqa: E402
from models import MODELS, make_input  # noqa: E402

from mgs_torch.engines import factors  # noqa: E402
from mgs_torch.op_fixes import use_transposed_convolution_backward  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_cnn", choices=list(MODELS))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--variant", default="trace", choices=["plain", "trace", "hutchinson", "logdet"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--transposed-conv", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="use_transposed_convolution_backward(True / False / None); bare --transposed-conv means on")
    ap.add_argument("--route", choices=["auto", "materialize", "ghost"], default="auto",
                    help="force the materialised or the ghost Gram route for every convolution (default: the cost model's choice)")
    ap.add_argument("--time-only", action="store_true", help="print the median step time only")
    ap.add_argument("--kernels", action="store_true",
                    help="also attribute the slowest kernels (CUDA) or leaf operators (CPU) to their callers and input shapes")
    args = ap.parse_args(argv)
    use_transposed_convolution_backward({"on": True, "off": False, "auto": None}[args.transposed_conv])
    if args.route != "auto":  # what the structured engine's cost model would otherwise decide per convolution
        forced = args.route == "ghost"
        factors.ConvFactor.ghost_is_cheaper = lambda self, quantity: forced
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MODELS[args.model]().to(device)
    x = make_input(args.model, args.n, device)
    y = torch.randint(0, 10, (args.n,), device=device)
    step = make_step(model, torch.optim.SGD(model.parameters(), lr=1e-6), x, y, args.variant)
    label = f"{args.model} n={args.n} {args.variant} on {args.device}" + ("" if args.transposed_conv == "auto" else f", transposed-conv {args.transposed_conv}")
    label += f", route={args.route}" if args.route != "auto" else ""
    print(f"# {label}: median of 10 steps {median_ms(step, 10, device, warmup=3):.2f} ms")
    if args.time_only:
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.kernels) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# {label}, 3 steps")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.kernels:
        print(f"# {label}: the slowest kernels and what launched them, per step")
        print(format_kernel_sources(kernel_sources(prof.events(), steps=3), rows_shown=args.rows))


def kernel_sources(events, steps: int = 1) -> list[tuple[float, int, str, str, str]]:
    """Device time per (kernel, launching operator chain, input shapes), in ms per step, slowest first.

    A CUDA kernel is charged to the operator that launched it; its chain of callers (the autograd node
    such as ``ConvolutionBackwardBackward0`` included) and the operator's input shapes tell which layer and
    which derivative it belongs to. Without device kernels (a CPU run) each leaf operator's own CPU time is
    charged the same way. Rows: (ms per step, calls per step, kernel or operator, caller chain, input shapes).
    """
    totals: dict[tuple[str, str, str], list[float]] = {}
    has_kernels = any(getattr(e, "kernels", None) for e in events)
    for evt in events:
        if has_kernels:
            units = [(k.name, k.duration) for k in evt.kernels]
        elif not evt.cpu_children:
            units = [(evt.name, evt.self_cpu_time_total)]
        else:
            units = []
        if not units:
            continue
        chain, parent = [], evt.cpu_parent
        while parent is not None and len(chain) < 6:
            chain.append(parent.name)
            parent = parent.cpu_parent
        shapes = str([list(s) for s in (evt.input_shapes or []) if s])
        for name, duration_us in units:
            row = totals.setdefault((name, " < ".join([evt.name] + chain), shapes), [0.0, 0])
            row[0] += duration_us / 1000 / steps
            row[1] += 1
    rows = [(ms, round(calls / steps), name, chain, shapes) for (name, chain, shapes), (ms, calls) in totals.items()]
    return sorted(rows, key=lambda r: -r[0])


def format_kernel_sources(rows, rows_shown: int = 25) -> str:
    """The rows of ``kernel_sources`` as a Markdown table (names cut to 90 characters)."""
    lines = ["| ms/step | calls/step | kernel (or CPU operator) | launched by < callers | input shapes |",
             "|---:|---:|---|---|---|"]
    for ms, calls, name, chain, shapes in rows[:rows_shown]:
        lines.append(f"| {ms:.2f} | {calls} | {name[:90]} | {chain[:200]} | {shapes[:120]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
