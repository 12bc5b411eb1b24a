"""Peak memory of one ``mgs_kernel`` call on the jacobian route, with and without ``chunk_size``
(the structured route beside it), on an MNIST-sized CNN (206,922 parameters, q = 10).

    python benchmarks/jacobian_memory.py --n 100

Each configuration runs in a child process whose allocator returns freed tensors to the system
(glibc, ``MALLOC_MMAP_THRESHOLD_=65536``); the peak is the rise of the resident set during the call
(``VmHWM`` after ``/proc/self/clear_refs``), so Linux only. J is n·q·p float32 numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(n: int, chunk: int | None, strategy: str) -> None:
    """In the child: one call, then print 'peak_bytes seconds p'."""
    import torch
    from torch import nn

    import mgs_torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    x = torch.randn(n, 1, 28, 28)
    mgs_torch.mgs_kernel(model, x[:2], strategy=strategy)  # plans and lazy allocations outside the measurement
    Path("/proc/self/clear_refs").write_text("5")
    before, started = _status("VmRSS"), time.perf_counter()
    mgs_torch.mgs_kernel(model, x, strategy=strategy, chunk_size=chunk)
    seconds = time.perf_counter() - started
    print(_status("VmHWM") - before, seconds, sum(t.numel() for t in model.parameters()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100])
    ap.add_argument("--chunks", nargs="+", default=["none", "1", "10"], help="chunk_size values ('none' for None)")
    ap.add_argument("--measure", nargs=3, metavar=("N", "CHUNK", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        n, chunk, strategy = args.measure
        measure(int(n), None if chunk == "none" else int(chunk), strategy)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    print("| n | strategy | chunk_size | peak GiB | J GiB | peak / J | seconds |\n|---|---|---|---:|---:|---:|---:|")
    for n in args.n:
        for strategy, chunk in [("jacobian", c) for c in args.chunks] + [("auto", "none")]:
            out = subprocess.run([sys.executable, __file__, "--measure", str(n), chunk, strategy], env=env,
                                 capture_output=True, text=True, check=True)
            peak, seconds, p = out.stdout.split()
            j = n * 10 * int(p) * 4
            ratio = f"{int(peak) / j:.2f}" if strategy == "jacobian" else "–"
            print(f"| {n} | {strategy} | {chunk} | {int(peak) / 2**30:.2f} | {j / 2**30:.2f} | {ratio} | {float(seconds):.1f} |")


if __name__ == "__main__":
    main()
