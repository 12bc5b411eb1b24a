"""Every architecture family of ``timm`` (PyTorch Image Models) through ``verify``, against the loop.

timm is where practitioners take their vision models from, and its ~100 model modules bring layers no
hand-written zoo names: weight-standardised convolutions (NFNet), split attention (ResNeSt), selective
kernels, outlook attention (VOLO), cross-covariance attention (XCiT), talking heads and class attention
(CaiT), LeViT's attention biases indexed by buffers, gated positional attention (ConViT), 2-D LSTMs
(Sequencer), re-parameterisable blocks (RepVGG, FastViT, MobileOne), anti-aliased downsampling, rotary
embeddings (EVA), relative-position tables (BEiT, Swin, MaxViT, CoAtNet), Hiera's mask units...

For each family (``timm.list_modules()``) the smallest model by parameter count is built with random
weights (nothing is downloaded) and ``num_classes=3``, shrunk where its constructor allows
(``img_size``, ``depth``), and :func:`mgs_torch.verify` compares K and the trace-penalty gradient with
the float64 per-sample autograd loop, with both strategies.

Needs ``timm`` (``pip install -e ".[timm]"``; it needs a torchvision that matches torch). Not part of
the suite: ``python tests/timm_sweep.py [--families resnet vit ...] [--shard i/m] [--memory-gb G]``,
about 20 minutes per shard of two on a 2-core machine; the 20–30 M-parameter models need about 10 GB
each in float64, and models still over ``--max-params`` after shrinking are listed, not run.
"""

from __future__ import annotations

import argparse
import resource
import signal
import time
import warnings

import torch

import mgs_torch
from sweep_report import CATEGORIES, classify

SIZES = (64, 96, 128, 160, 224, 256)


class TimedOut(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise TimedOut()


def smallest_models(family: str) -> list[str]:
    """The family's models, smallest first (parameters counted on the meta device)."""
    import timm

    sized = []
    for name in timm.list_models(module=family):
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=3)
            sized.append((sum(p.numel() for p in model.parameters()), name))
        except Exception:  # noqa: BLE001 - a model that does not build here is not swept
            continue
    return [name for _, name in sorted(sized)]


def build(name: str):
    """(model, input) for the smallest configuration of ``name`` that builds and runs, in float64."""
    import timm

    default = timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    tries = [(dict(img_size=s, depth=2), s) for s in SIZES] + [(dict(img_size=s), s) for s in SIZES]
    tries += [({}, s) for s in SIZES if s <= default[-1]] + [({}, default[-1])]
    for kwargs, size in tries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).double().eval()
                x = torch.randn(2, default[0], size, size, dtype=torch.float64)
                with torch.no_grad():
                    out = model(x)
            if isinstance(out, torch.Tensor) and out.shape == (2, 3) and torch.isfinite(out).all():
                return model, x, kwargs
        except Exception:  # noqa: BLE001 - try the next configuration
            continue
    return None


def sweep(families: list[str], timeout: int, max_params: float) -> dict[str, int]:
    counts = dict.fromkeys(CATEGORIES + ("unbuilt", "timeout"), 0)
    signal.signal(signal.SIGALRM, _alarm)
    for family in families:
        t0 = time.perf_counter()
        # of the three smallest models, the one that runs at the smallest input (the loop's cost grows with it)
        candidates = [(b, name) for name in smallest_models(family)[:3] if (b := build(name)) is not None]
        built, name = min(candidates, key=lambda c: c[0][1].numel(), default=(None, None))
        if built is None:
            counts["unbuilt"] += 1
            print(f"UNBUILT  {family}", flush=True)
            continue
        model, x, kwargs = built
        p = sum(t.numel() for t in model.parameters())
        label = f"{family}:{name} {kwargs or ''} x{tuple(x.shape[1:])} {p:,} p"
        if p > max_params:
            counts["too big"] += 2
            print(f"TOO BIG  {label}: over --max-params, not run", flush=True)
            continue
        for strategy in ("auto", "jacobian"):
            signal.alarm(timeout)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = mgs_torch.verify(model, x, samples=2, strategy=strategy)
            except TimedOut:
                counts["timeout"] += 1
                print(f"TIMEOUT  {label} {strategy}", flush=True)
                continue
            finally:
                signal.alarm(0)
            category, detail = classify(report)
            counts[category] += 1
            print(f"{category.upper() if category != 'ok' else 'ok':8s} {label} {strategy}: {detail} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return counts


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="timm module names (default: all)")
    parser.add_argument("--shard", default="0/1", help="i/m: every m-th family from the i-th (run m processes)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per verify call")
    parser.add_argument("--max-params", type=float, default=30e6, help="skip models still bigger after shrinking")
    parser.add_argument("--memory-gb", type=float, default=10.0, help="address-space limit: big models fail, not the machine")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    torch.set_num_threads(1)
    i, m = (int(v) for v in args.shard.split("/"))
    families = (args.families or timm.list_modules())[i::m]
    t0 = time.perf_counter()
    print(f"timm {timm.__version__}, torch {torch.__version__}: {len(families)} families", flush=True)
    print(f"totals: {sweep(families, args.timeout, args.max_params)}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
