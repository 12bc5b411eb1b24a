"""Per-step time of MGS penalty training steps on a GPU, eager and replayed from a CUDA graph.

Small nets on a GPU are launch-bound: a LeNet-5 step costs a few milliseconds of Python and kernel
launches whatever the batch size. Capturing the whole step (forward, loss + α·penalty, backward,
optimizer step) into a ``torch.cuda.CUDAGraph`` once and replaying it removes that overhead; this
script measures both side by side, checks that four replayed steps move the weights as four eager
ones do (the difference relative to the movement; Hutchinson probes differ between the two), and counts the host synchronisations of one eager step (``torch.cuda.set_sync_debug_mode``).

    PYTHONPATH=. python benchmarks/cuda_graphs.py [--json benchmarks/results-cuda-graphs.json]

The capture is :func:`mgs_torch.capture_step` (PyTorch's whole-network capture): a few warm-up steps
on a side stream (mgs_torch builds and caches its plan there), then one step captured on static
input tensors; each training step copies the batch into them and replays.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mgs import median_ms  # noqa: E402
from models import MODELS, make_input  # noqa: E402

from mgs_torch import capture_step, mgs_penalty  # noqa: E402

ALPHA = 1e-3
CUDA = torch.device("cuda")


def make_step(model, opt, x, y, variant: str, generator=None):
    def step():
        opt.zero_grad(set_to_none=False)  # keep the .grad buffers: a captured graph owns their memory
        out = model(x)
        loss = F.cross_entropy(out, y)
        if variant == "trace":
            loss = loss + ALPHA * mgs_penalty(model, x, reduction="sum")
        elif variant == "hutchinson":
            loss = loss + ALPHA * mgs_penalty(model, x, estimator="hutchinson", reduction="sum", generator=generator)
        elif variant == "logdet":
            loss = loss + ALPHA * mgs_penalty(model, x, kind="logdet", reduction="sum", jitter=1e-6)
        loss.backward()
        opt.step()
    return step


def host_syncs(step) -> list[str]:
    """The host synchronisations one call of ``step`` makes (the warnings of sync debug mode 'warn')."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]


def run(name: str, n: int, variant: str, repeats: int) -> dict:
    torch.manual_seed(0)
    base = MODELS[name]().cuda()
    x = make_input(name, n, "cuda")
    y = torch.randint(0, 10, (n,), device="cuda")
    row = {"model": name, "n": n, "variant": variant}
    eager_model, graph_model = base, copy.deepcopy(base)
    gen_e = torch.Generator(device="cuda").manual_seed(1) if variant == "hutchinson" else None
    gen_g = torch.Generator(device="cuda").manual_seed(1) if variant == "hutchinson" else None
    eager = make_step(eager_model, torch.optim.SGD(eager_model.parameters(), lr=1e-3), x, y, variant, gen_e)
    for _ in range(3):
        eager()
    row["host_syncs_per_eager_step"] = host_syncs(eager)
    row["eager_ms"] = median_ms(eager, repeats, CUDA, warmup=0)
    try:
        replay = capture_step(make_step(graph_model, torch.optim.SGD(graph_model.parameters(), lr=1e-3), x, y, variant, gen_g), generators=[gen_g] if gen_g is not None else [])
        row["graph_ms"] = median_ms(replay, repeats, CUDA, warmup=1)
        # same start, same number of steps: the weights must agree (float32, up to summation order)
        fresh_e, fresh_g = copy.deepcopy(base), copy.deepcopy(base)
        gen2_e, gen2_g = ((torch.Generator(device="cuda").manual_seed(2) for _ in range(2)) if gen_e is not None else (None, None))
        e_step = make_step(fresh_e, torch.optim.SGD(fresh_e.parameters(), lr=1e-3), x, y, variant, gen2_e)
        g_replay = capture_step(make_step(fresh_g, torch.optim.SGD(fresh_g.parameters(), lr=1e-3), x, y, variant, gen2_g), generators=[gen2_g] if gen2_g is not None else [])
        for _ in range(4):  # capture_step() took 3 warm-up steps and captured one (not executed)
            e_step()
        g_replay()
        torch.cuda.synchronize()
        flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
        moved = (flat(fresh_e) - flat(base)).norm()
        row["weights_diff_over_movement"] = float((flat(fresh_e) - flat(fresh_g)).norm() / moved)
    except Exception as error:  # noqa: BLE001 - report what capture refused
        row["graph_error"] = f"{type(error).__name__}: {str(error)[:400]}"
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["lenet5:32", "fcn:128", "cifar_cnn:128"])
    ap.add_argument("--variants", nargs="+", default=["plain", "trace", "hutchinson", "logdet"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--in-process", action="store_true", help="measure here (the parent runs each step in its own process)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_graphs: needs a CUDA device")
    if args.in_process:
        rows = [run(name, int(n), variant, args.repeats) for name, n in (c.split(":") for c in args.configs) for variant in args.variants]
        Path(args.json).write_text(json.dumps(rows))
        return
    rows = []
    for config in args.configs:
        for variant in args.variants:
            # one process per step: a capture that fails can leave the CUDA random generator mid-capture
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.json"
                cmd = [sys.executable, __file__, "--in-process", "--configs", config, "--variants", variant,
                       "--repeats", str(args.repeats), "--json", str(out)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode or not out.exists():
                    name, n = config.split(":")
                    print(done.stderr[-2000:], file=sys.stderr)
                    rows.append({"model": name, "n": int(n), "variant": variant, "eager_ms": float("nan"),
                                 "host_syncs_per_eager_step": [], "graph_error": f"the process failed: {done.stderr.strip()[-300:]}"})
                else:
                    rows += json.loads(out.read_text())
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    print("\n| model | n | step | eager ms | CUDA graph ms | speed-up | host syncs (eager) | ‖w_eager − w_graph‖ / ‖w_eager − w_0‖ after 4 steps |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        g = r.get("graph_ms")
        graph_ms, speedup = ("–", "–") if g is None else (f"{g:.2f}", f"{r['eager_ms'] / g:.1f}×")
        check = r.get("weights_diff_over_movement", r.get("graph_error", "–"))
        print(f"| {r['model']} | {r['n']} | {r['variant']} | {r['eager_ms']:.2f} | {graph_ms} | {speedup} | "
              f"{len(r['host_syncs_per_eager_step'])} | {check} |")


if __name__ == "__main__":
    main()
