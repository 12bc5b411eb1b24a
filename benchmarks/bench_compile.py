"""A training step with the MGS penalty under ``torch.compile`` against the same step run eagerly (issue 22, item 3).

For each model and step (plain; exact trace penalty; one-probe Hutchinson penalty), in one process: the loss function
``cross_entropy(model(x), y) + α·mgs_penalty(model, x)`` is compiled (Inductor, the default backend), Dynamo's
graph and break count are recorded, the compiled loss and gradients are compared with the eager step's at the same
weights (relative error; the Hutchinson rows draw their probes from the global random stream in both, with
Inductor's ``fallback_random``, so the two see the same probes), and then eager and compiled steps (loss, backward,
SGD step) are timed alternately: medians of ``--repeats``. Under compile mgs_torch takes the reference route (see
``mgs_torch/_compiled.py``); eagerly it takes the structured engine, so "compiled ÷ eager" compares two engines as
well as two executions. The ``strategy='structured'`` rows run the penalty eagerly inside the compiled step (a graph
break on each side of it) and compile the rest.

    python benchmarks/bench_compile.py --threads 1 --models lenet5 fcn --batch 8 32 --repeats 7
    python benchmarks/bench_compile.py --device cuda --models lenet5 cifar_cnn --batch 32 128   (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mgs_torch import mgs_penalty  # noqa: E402
from models import MODELS, make_input  # noqa: E402

ALPHA = 0.01
STEPS = {
    "plain": None,
    "exact trace penalty": {},
    "Hutchinson penalty (1 probe)": {"estimator": "hutchinson"},
    "exact trace penalty, strategy='structured'": {"strategy": "structured"},
    "Hutchinson penalty, strategy='structured'": {"estimator": "hutchinson", "strategy": "structured"},
}


def loss_function(model, penalty, eager: bool, device: torch.device = torch.device("cpu")):
    """The step's loss; an eager Hutchinson step draws from the global generator of the model's device, as a traced
    one does (on CUDA, the CPU's generator would draw other probes)."""
    if penalty is not None and eager and penalty.get("estimator") == "hutchinson":
        generator = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
        penalty = {**penalty, "generator": generator}

    def loss(x, y):
        value = F.cross_entropy(model(x), y)
        return value if penalty is None else value + ALPHA * mgs_penalty(model, x, reduction="sum", **penalty)
    return loss


def gradients(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm()) ** 2 for x, y in zip(a, b)) ** 0.5
    return num / max(sum(float(y.norm()) ** 2 for y in b) ** 0.5, 1e-300)


def measure(name: str, n: int, step: str, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().train().to(device)
    x = make_input(name, n, device)
    y = torch.randint(0, 10, (n,), device=device)
    eager = loss_function(model, STEPS[step], eager=True, device=device)
    traced = loss_function(model, STEPS[step], eager=False, device=device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(traced)(x, y)
    compiled = torch.compile(traced)
    state = copy.deepcopy(model.state_dict())
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(1)
        started = time.perf_counter()
        compiled_loss = compiled(x, y)
        compiled_grads = gradients(model, compiled_loss)
        compile_s = time.perf_counter() - started
        model.load_state_dict(state)
        torch.manual_seed(1)
        eager_loss = eager(x, y)
        eager_grads = gradients(model, eager_loss)
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # tiny steps: the weights stay where they are

        def timed(function):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            function(x, y).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started

        times = {"eager": [], "compiled": []}
        for _ in range(2):  # warm-up
            timed(eager), timed(compiled)
        for _ in range(repeats):
            times["eager"].append(timed(eager))
            times["compiled"].append(timed(compiled))
    eager_ms, compiled_ms = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
    return {
        "model": name, "n": n, "step": step, "graphs": explained.graph_count, "breaks": explained.graph_break_count,
        "loss_rel": abs(float(compiled_loss - eager_loss)) / abs(float(eager_loss)),
        "grad_rel": relative(compiled_grads, eager_grads), "compile_s": compile_s,
        "eager_ms": eager_ms, "compiled_ms": compiled_ms, "ratio": compiled_ms / eager_ms,
        "break_reasons": [break_reason(r) for r in explained.break_reasons],
    }


def break_reason(reason) -> str:
    """One line per graph break: Dynamo's reason and the innermost frame of the traced code that caused it."""
    frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in (reason.user_stack or [])]
    return f"{reason.reason.strip().splitlines()[0][:160]} @ {' < '.join(reversed(frames[-3:]))}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "fcn"], choices=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with a synchronize around each step)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__}, {where}, Inductor; medians of {args.repeats}")
    print("| model | n | step | graphs | breaks | loss rel. diff. | gradient rel. diff. | compile s | eager ms | compiled ms | compiled ÷ eager |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for n in args.batch:
            for step in args.steps:
                r = measure(name, n, step, args.repeats, device)
                print(f"| {r['model']} | {r['n']} | {r['step']} | {r['graphs']} | {r['breaks']} | {r['loss_rel']:.1e} | "
                      f"{r['grad_rel']:.1e} | {r['compile_s']:.0f} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
                      f"{r['ratio']:.2f} |", flush=True)
                for reason in dict.fromkeys(r["break_reasons"]):  # printed once each, under the row
                    print(f"<!-- graph break: {reason} -->", flush=True)


if __name__ == "__main__":
    main()
