"""Min-of-N step timings of one model at one batch size (plain step, exact and Hutchinson trace-penalty
steps, tr K, K), for before/after comparisons of two checkouts on the same machine.

    python benchmarks/ab_steps.py lenet5 32 15     # model, n, repeats; one thread
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench", ROOT / "benchmarks"):
    sys.path.insert(0, str(path))

from models import MODELS  # noqa: E402

from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace  # noqa: E402

torch.set_num_threads(1)
name, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
m = MODELS[name](); x = torch.randn(n, 1, 28, 28); y = torch.randint(0, 10, (n,))
def plain():
    F.cross_entropy(m(x), y).backward(); m.zero_grad(set_to_none=True)
def pen():
    (F.cross_entropy(m(x), y) + 1e-3 * mgs_penalty(m, x)).backward(); m.zero_grad(set_to_none=True)
def hut():
    (F.cross_entropy(m(x), y) + 1e-3 * mgs_penalty(m, x, estimator="hutchinson")).backward(); m.zero_grad(set_to_none=True)
out = {}
for k, f in {"plain": plain, "trace step": pen, "Hutchinson step": hut, "tr K": lambda: mgs_trace(m, x), "K": lambda: mgs_kernel(m, x)}.items():
    f(); ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    out[k] = round(min(ts) * 1e3, 2)
print(json.dumps({"model": name, "n": n, **out}))
