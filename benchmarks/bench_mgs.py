"""Speed and memory of MGS kernels, traces and penalties: mgs_torch against straightforward torch.func
and against the per-sample-gradient libraries a user would otherwise reach for.

Every configuration is measured side by side in one process: the same model, batch and optimizer,
each method repeated and its median taken; ratios are to the plain training step (× plain) and to
the straightforward torch.func implementation of the same quantity (× naive), the one the torch.func
NTK tutorial suggests: ``vmap(jacrev)`` per-sample Jacobians, contracted. "plain step @ q·n" is a
plain step on the batch repeated q times: the floor of any exact trace penalty, which needs q
output-backward passes.

Models (benchmarks/models.py): lenet5, fcn, resnet, cifar_cnn and vit by default; resnet18
(torchvision's where it imports, else the same layout written out; 11.2 M parameters) and bert (a tiny
BertForSequenceClassification from a config, on token ids; needs transformers, downloads nothing) on
request with --models.

Peers (benchmarks/peers.py), for the exact tr K without a graph: BackPACK's ``BatchL2Grad`` and
Opacus' ``GradSampleModule`` (``pip install backpack-for-pytorch opacus``), each on a copy of the
model, BatchNorm on running statistics. Each is run once and its tr K compared with
``mgs_trace`` (relative 1e-4) before it is timed: a peer that refuses the model's layers is
recorded as "unsupported", one that runs but disagrees as "mismatch", with the reason, and neither
is timed. They are on by default where they import (``--no-peers`` leaves them out); their rows
are compared with "tr K (no graph), naive" like mgs_torch's, and a second table puts each beside
"tr K (no graph), mgs_torch".

Peak memory (from a state holding no ``.grad`` buffers, so a step's own gradients count): on CUDA,
``torch.cuda.max_memory_allocated`` during one step minus the memory held before it; on the CPU, the rise of the process's resident-set high-water mark during one step
(reset through /proc/self/clear_refs), which also counts allocator slack — read it as a ratio.

    python benchmarks/bench_mgs.py                      # the default models, n = 32 and 128; JSON to ./bench-results-<device>-<time>.json
    python benchmarks/bench_mgs.py --models lenet5 --batch 32 --repeats 5
    python benchmarks/bench_mgs.py --models lenet5 fcn resnet18 vit bert --batch 8 --skip-slow --measure time
    python benchmarks/bench_mgs.py --json benchmarks/results-cpu.json   # replace the committed numbers (on purpose)
    python benchmarks/bench_mgs.py --from-json benchmarks/results-cpu.json   # the tables again, nothing measured
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from models import DEFAULT_MODELS, MODELS, make_input  # noqa: E402

from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace  # noqa: E402

ALPHA = 1e-3


# ------------------------------------------------------------------ the straightforward torch.func versions


def naive_jacobian(model: nn.Module, x: torch.Tensor, create_graph: bool) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians {name: (n, q, *shape)} from vmap(jacrev(f)), BatchNorm on running stats."""
    params = {k: (v if create_graph else v.detach()) for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    modes = [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

    try:
        return vmap(jacrev(f), in_dims=(None, 0))(params, x)
    finally:
        for m, flag in modes:
            m.training = flag


def naive_trace(model, x, create_graph=False):
    return sum((j**2).sum() for j in naive_jacobian(model, x, create_graph).values())


def naive_kernel(model, x, create_graph=False):
    jac = naive_jacobian(model, x, create_graph)
    J = torch.cat([j.flatten(2) for j in jac.values()], 2)
    J = J.reshape(-1, J.shape[-1])
    return J @ J.T


def naive_logdet(model, x, jitter=1e-6):
    """log det(K + εI) from the naive kernel, differentiable."""
    K = naive_kernel(model, x, True)
    return torch.linalg.slogdet(K + jitter * torch.eye(K.shape[0], dtype=K.dtype, device=K.device))[1]


def naive_hutchinson(model, x, out):
    """‖Jᵀv‖² for one Rademacher v (one backward with create_graph)."""
    v = torch.randint(0, 2, out.shape, dtype=out.dtype, device=out.device) * 2 - 1
    grads = torch.autograd.grad(out, list(model.parameters()), v, create_graph=True)
    return sum((g**2).sum() for g in grads)


# ------------------------------------------------------------------ measurement


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_memory_mb(fn: Callable[[], object], device: torch.device, prepare: Callable[[], object]) -> float | None:
    """Extra memory at the peak of one call of ``fn``, from the state ``prepare`` leaves (no .grad held)."""
    prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":  # CUDA events time the device's work, not the host's launch queue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
            continue
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def methods(model: nn.Module, x: torch.Tensor, y: torch.Tensor, q: int, include_slow: bool):
    """(name -> (what it is compared with, callable), a callable freeing the gradient buffers)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # tiny steps: the weights stay where they are
    xq, yq = x.repeat(q, *([1] * (x.dim() - 1))), y.repeat(q)

    def step(penalty_fn=None, inputs=x, targets=y):
        # a penalty step differentiates twice: attention must take SDPA's math kernel (the fused CPU kernels have no
        # double backward), as mgs_torch does inside its own calls; plain steps keep PyTorch's default kernels
        context = (lambda: sdpa_kernel(SDPBackend.MATH)) if penalty_fn is not None else contextlib.nullcontext

        def run():
            with context():
                opt.zero_grad(set_to_none=True)
                out = model(inputs)
                loss = F.cross_entropy(out, targets)
                if penalty_fn is not None:
                    loss = loss + ALPHA * penalty_fn(out)
                loss.backward()
                opt.step()
        return run

    m = {
        "plain step": ("plain step", step()),
        "plain step @ q·n": ("plain step", step(inputs=xq, targets=yq)),
        "trace penalty step, naive": ("trace penalty step, naive", step(lambda out: naive_trace(model, x, True))),
        "trace penalty step, mgs_torch": ("trace penalty step, naive", step(lambda out: mgs_penalty(model, x, reduction="sum"))),
        "trace penalty step, mgs_torch, chunk_size=1": (
            "trace penalty step, naive", step(lambda out: mgs_penalty(model, x, reduction="sum", chunk_size=1))
        ),
        "trace penalty step, mgs_torch, chunk_size=5": (
            "trace penalty step, naive", step(lambda out: mgs_penalty(model, x, reduction="sum", chunk_size=5))
        ),
        "Hutchinson (1 probe) step, naive": ("trace penalty step, naive", step(lambda out: naive_hutchinson(model, x, out))),
        "Hutchinson (1 probe) step, mgs_torch": (
            "trace penalty step, naive", step(lambda out: mgs_penalty(model, x, estimator="hutchinson", reduction="sum"))
        ),
        "logdet penalty step, mgs_torch": ("logdet penalty step, naive", step(lambda out: mgs_penalty(model, x, kind="logdet", reduction="sum", jitter=1e-6))),
        "K (no graph), naive": ("K (no graph), naive", lambda: naive_kernel(model, x)),
        "K (no graph), mgs_torch": ("K (no graph), naive", lambda: mgs_kernel(model, x)),
        "tr K (no graph), naive": ("tr K (no graph), naive", lambda: naive_trace(model, x)),
        "tr K (no graph), mgs_torch": ("tr K (no graph), naive", lambda: mgs_trace(model, x)),
    }
    if include_slow:
        m["logdet penalty step, naive"] = ("logdet penalty step, naive", step(lambda out: naive_logdet(model, x)))
    return m, lambda: opt.zero_grad(set_to_none=True)


def peer_rows(model: nn.Module, x: torch.Tensor, labels: list[str]) -> tuple[dict, dict[str, str]]:
    """The peers' exact tr K (benchmarks/peers.py), each checked against mgs_trace before it is timed:
    ({method: (compared with, callable)} for those that agree, {method: why not} for the others)."""
    rows, refused = {}, {}
    if not labels:
        return rows, refused
    reference = mgs_trace(model, x)
    for label in labels:
        fn, why = peers.prepare(label, model, x, reference)
        method = f"tr K (no graph), {label}"
        if fn is None:
            refused[method] = why
        else:
            rows[method] = ("tr K (no graph), naive", fn)
    return rows, refused


def run_config(name: str, n: int, repeats: int, device: torch.device, include_slow: bool, measure: str = "both",
               peer_labels: list[str] = ()) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    x = make_input(name, n, device)
    y = torch.randint(0, 10, (n,), device=device)
    q = 10
    results = []
    checked, refused = peer_rows(model, x, list(peer_labels))  # before any step moves the weights
    table, free_grads = methods(model, x, y, q, include_slow)
    table = {**table, **checked}
    params = sum(p.numel() for p in model.parameters())
    for method, why in refused.items():
        print(f"  {name:7s} n={n:<4d} {method:40s} {why}", flush=True, file=sys.stderr)
    for method in table:
        _, fn = table[method]
        reps = max(1, repeats // 3) if "naive" in method and ("logdet" in method or "penalty" in method) else repeats
        oom = False
        try:
            t = median_ms(fn, reps, device, warmup=1 if "naive" in method else 2) if measure != "memory" else None
            if measure == "memory":
                fn()  # warm-up: lazily created state is not part of a step's peak
            mem = peak_memory_mb(fn, device, free_grads) if measure != "time" else None
        except torch.cuda.OutOfMemoryError:  # recorded as such (the naive route at n = 512, say)
            free_grads()
            torch.cuda.empty_cache()
            t, mem, oom = None, None, True
            print(f"  {name:7s} n={n:<4d} {method:40s} out of memory", flush=True, file=sys.stderr)
        results.append({"model": name, "params": params, "n": n, "q": q,
                        "method": method, "compared_with": table[method][0], "median_ms": t, "peak_mb": mem, "repeats": reps,
                        **({"peer": True} if method in checked else {}), **({"out_of_memory": True} if oom else {})})
        if oom:
            continue
        shown = [f"{t:9.2f} ms" if t is not None else "", f"peak {mem:.1f} MB" if mem is not None else ""]
        print(f"  {name:7s} n={n:<4d} {method:40s} " + "  ".join(x for x in shown if x), flush=True, file=sys.stderr)
    for method, why in refused.items():  # a row that says why, where a time would be
        results.append({"model": name, "params": params, "n": n, "q": q, "method": method,
                        "compared_with": "tr K (no graph), naive", "median_ms": None, "peak_mb": None, "repeats": 0,
                        "peer": True, "status": why})
    return results


def add_ratios(results: list[dict]) -> None:
    """× plain step, speed-up over the naive version of the same quantity (mgs_torch's and the peers' rows only),
    × plain peak memory."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["n"]), {})[r["method"]] = r
    for by in groups.values():
        plain = by["plain step"]
        for r in by.values():
            timed = r["median_ms"] is not None and plain["median_ms"]
            r["x_plain"] = r["median_ms"] / plain["median_ms"] if timed else None
            ref = by.get(r["compared_with"])
            # a speed-up is mgs_torch's (or a peer's) against the naive route, never naive's own
            ours = "mgs_torch" in r["method"] or r.get("peer", False)
            r["x_naive"] = ref["median_ms"] / r["median_ms"] if ours and ref and timed and ref["median_ms"] else None
            r["x_plain_peak"] = r["peak_mb"] / plain["peak_mb"] if r["peak_mb"] and plain["peak_mb"] else None


def hutchinson_quality(name: str, n: int, device: torch.device, draws: int = 200) -> list[dict]:
    """Relative standard deviation of one-probe trace estimates: whole-batch ‖Jᵀv‖² (naive) against
    mgs_torch's per-sample probes, Σ_i ‖Σ_a v_ia ∇θ f_a(x_i)‖² (no cross-sample terms)."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    x = make_input(name, n, device)
    exact = mgs_trace(model, x).item()
    gen = torch.Generator().manual_seed(0)
    ours = torch.tensor([mgs_trace(model, x, estimator="hutchinson", generator=gen).item() for _ in range(draws)])
    naive = []
    for _ in range(draws):
        out = model(x)
        v = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out)
        grads = torch.autograd.grad(out, list(model.parameters()), v)
        naive.append(sum((g**2).sum() for g in grads).item())
    naive = torch.tensor(naive)
    return [
        {"model": name, "n": n, "estimator": label, "exact_trace": exact, "mean": float(v.mean()),
         "relative_std": float(v.std() / exact), "draws": draws}
        for label, v in (("whole-batch probe ‖Jᵀv‖² (naive)", naive), ("per-sample probes (mgs_torch)", ours))
    ]


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | n | method | median ms | × plain step | speed-up over naive | peak MB | × plain peak |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in results:
        lines.append(
            f"| {r['model']} ({r['params']:,} p) | {r['n']} | {r['method']} | "
            f"{'out of memory' if r.get('out_of_memory') else r['status'].split(':')[0] if r.get('status') else fmt(r['median_ms'])} | "
            f"{fmt(r['x_plain'], 1)} | "
            f"{fmt(r['x_naive'], 1)} | {fmt(r['peak_mb'], 0)} | {fmt(r['x_plain_peak'], 1)} |"
        )
    return "\n".join(lines)


def peer_table(results: list[dict]) -> str:
    """tr K without a graph, side by side: mgs_torch against each peer on the same model and batch (empty without
    peer rows). A peer that refused the model, or disagreed with mgs_trace, says so instead of a time."""
    ours = {(r["model"], r["n"]): r for r in results if r["method"] == "tr K (no graph), mgs_torch"}
    lines = []
    for r in results:
        mine = ours.get((r["model"], r["n"]))
        if not r.get("peer") or mine is None:
            continue
        timed = r["median_ms"] is not None and mine["median_ms"]
        peer_ms = r["status"] if r.get("status") else "–" if r["median_ms"] is None else f"{r['median_ms']:.2f}"
        lines.append(f"| {r['model']} | {r['n']} | {r['method'].split(', ', 1)[1]} | {peer_ms} | "
                     f"{'–' if mine['median_ms'] is None else format(mine['median_ms'], '.2f')} | "
                     f"{format(r['median_ms'] / mine['median_ms'], '.1f') if timed else '–'} |")
    if not lines:
        return ""
    return "\n".join(["| model | n | peer (tr K, no graph) | peer ms | mgs_torch ms | mgs_torch speed-up over the peer |",
                      "|---|---|---|---:|---:|---:|", *lines])


def cpu_peaks_in_subprocess(args) -> dict[tuple, float]:
    """CPU peak memory, measured in a child process where glibc serves every allocation of 64 KiB or
    more by mmap, so freed tensors leave the resident set (that allocator is too slow to time with)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, __file__, "--measure", "memory", "--json", str(out), "--models", *args.models,
               "--batch", *map(str, args.batch), "--device", "cpu"] + (["--skip-slow"] if args.skip_slow else [])
        cmd += ["--peers"] if args.peers else ["--no-peers"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["results"]
    return {(r["model"], r["n"], r["method"]): r["peak_mb"] for r in rows}


def print_peers(results: list[dict]) -> None:
    table = peer_table(results)
    if table:
        print("\n" + table)


def print_quality(quality: list[dict]) -> None:
    if quality:
        print("\n| model | n | one-probe estimator | relative std of tr K estimate |\n|---|---|---|---:|")
        for r in quality:
            print(f"| {r['model']} | {r['n']} | {r['estimator']} | {r['relative_std']:.3f} |")


def peer_versions(labels: list[str]) -> dict[str, str]:
    """Peer label -> the version of the library measured."""
    from importlib.metadata import PackageNotFoundError, version

    dist = {"backpack": "backpack-for-pytorch", "opacus": "opacus"}
    out = {}
    for label in labels:
        try:
            out[label] = version(dist[peers.PEERS[label]])
        except PackageNotFoundError:
            out[label] = "unknown"
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS),
                    help=f"default: {' '.join(DEFAULT_MODELS)}")
    ap.add_argument("--batch", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip-slow", action="store_true", help="skip the naive log-det step (the slowest method)")
    ap.add_argument("--measure", choices=["both", "time", "memory"], default="both",
                    help="on the CPU, 'both' times here and measures memory in a child process")
    ap.add_argument("--json", default=None,
                    help="where to write the raw numbers (default ./bench-results-<device>-<date-time>.json: never the "
                         "committed benchmarks/results-*.json unless named here)")
    ap.add_argument("--from-json", default=None, metavar="FILE", help="print the tables of a saved run; measure nothing")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                    help="tr K through BackPACK's BatchL2Grad and Opacus' per-sample gradients beside mgs_torch's "
                         "(default: those that import)")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        add_ratios(saved["results"])
        print(markdown(saved["results"]))
        print_peers(saved["results"])
        print_quality(saved.get("hutchinson", []))
        return
    found = peers.available()
    for label, why in found.items():
        if why and args.peers is not False:
            print(f"# peer skipped: {label}: {why}", file=sys.stderr)
    peer_labels = [label for label, why in found.items() if why is None] if args.peers is not False else []
    args.peers = bool(peer_labels)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    measure_here = "time" if device.type == "cpu" and args.measure == "both" else args.measure
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "dtype": "float32", "alpha": ALPHA, "peers": peer_versions(peer_labels),
    }
    print(f"# {machine['device']}, torch {machine['torch']}")
    out = Path(args.json or f"bench-results-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    results = []
    for name in args.models:
        for n in args.batch:
            results += run_config(name, n, args.repeats, device, not args.skip_slow, measure_here, peer_labels)
            if measure_here != "memory":  # what is measured so far survives a run cut short by a time limit
                out.write_text(json.dumps({"machine": machine, "results": results, "hutchinson": [], "partial": True}, indent=1))
    if measure_here == "time" and args.measure == "both":
        peaks = cpu_peaks_in_subprocess(args)
        for r in results:
            r["peak_mb"] = peaks.get((r["model"], r["n"], r["method"]))
    add_ratios(results)
    quality = []
    if measure_here != "memory":
        for name in args.models:
            quality += hutchinson_quality(name, min(args.batch), device)
    print()
    print(markdown(results))
    print_peers(results)
    print_quality(quality)
    out.write_text(json.dumps({"machine": machine, "results": results, "hutchinson": quality}, indent=1))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
