"""What the self-check on first use costs (mgs_torch.self_check): its time beside the first call and beside 100 steps.

For each model, two fresh instances of the same architecture train with the exact trace penalty (SGD, one thread):
the first with the self-check off, the second with it on (its first call runs the check). Printed per model:

* the first step without the check and with it, and the check's own time (from its report);
* the median of the following steps (the check never runs again on an unchanged model);
* the check as a fraction of the first call, and of 100 steps (first step + 99 × the median step).

torch.func's lazy imports are paid once before anything is timed. ResNet-18 is torchvision's where it is installed,
else the same architecture written out (benchmarks/models.py); the BERT needs ``transformers``.

    python benchmarks/bench_self_check.py                         # lenet5, resnet18 and tiny_bert
    python benchmarks/bench_self_check.py --models lenet5 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mgs_torch  # noqa: E402
from models import LeNet5, resnet18, tiny_bert  # noqa: E402

SETTINGS = {  # model, batch, input maker, classes
    "lenet5": (LeNet5, 32, lambda n: torch.randn(n, 1, 28, 28), 10),
    "resnet18": (resnet18, 8, lambda n: torch.randn(n, 3, 32, 32), 10),
    "tiny_bert": (tiny_bert, 8, lambda n: torch.randint(0, 100, (n, 16)), 2),
}


def step_fn(model, x, y, alpha=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + alpha * mgs_torch.mgs_penalty(model, x)
        loss.backward()
        opt.step()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, steps: int) -> dict:
    make, n, inputs, classes = SETTINGS[name]
    torch.manual_seed(0)
    x, y = inputs(n), torch.randint(0, classes, (n,))
    mgs_torch.set_self_check(False)
    first_off = timed(step_fn(make(), x, y))
    mgs_torch.set_self_check(True)
    model = make()
    step = step_fn(model, x, y)
    first_on = timed(step)
    reports = mgs_torch.self_check_reports(model)
    check = sum(r.seconds for r in reports)
    later = [timed(step) for _ in range(steps)]
    median = statistics.median(later)
    return {
        "model": name, "n": n, "first_off": first_off, "first_on": first_on, "check": check, "step": median,
        "of_first": check / first_off, "of_100": check / (first_off + 99 * median), "outcome": [r.outcome for r in reports],
        "checks": len(mgs_torch.self_check_reports(model)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=10, help="steps timed after the first (median taken; default 10)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warm = torch.nn.Linear(2, 2)
    mgs_torch.mgs_kernel(warm, torch.randn(2, 2))  # torch.func's lazy imports, paid once
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, exact trace penalty step (SGD)")
    print(f"{'model':<10} {'n':>3} {'1st step, off':>14} {'1st step, on':>13} {'check':>8} {'median step':>12} "
          f"{'check/1st':>10} {'check/100 steps':>16}  outcome")
    for name in args.models:
        try:
            r = measure(name, args.steps)
        except ImportError as error:
            print(f"{name:<10} skipped: {error}")
            continue
        print(f"{r['model']:<10} {r['n']:>3} {r['first_off']:>13.3f}s {r['first_on']:>12.3f}s {r['check']:>7.3f}s "
              f"{r['step']:>11.3f}s {r['of_first']:>9.0%} {r['of_100']:>15.1%}  {', '.join(r['outcome'])} "
              f"({r['checks']} check{'s' if r['checks'] != 1 else ''} in {args.steps + 1} steps)")


if __name__ == "__main__":
    main()
