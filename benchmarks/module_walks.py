"""How often one mgs_torch call walks the model's module tree, and the time those walks take (issue 22: per-call Python).

For LeNet-5, the tiny BERT and the small ViT at n = 8, one call each of the exact tr K, the one-probe Hutchinson tr K
and a Hutchinson penalty training step, after two warm-up calls, under cProfile: the module visits of
``nn.Module.named_modules`` (its recursive calls, one per module per walk) and their cumulative time. Run it on two
checkouts to compare them (the numbers are cProfile's, inflated alike on both sides):

    python benchmarks/module_walks.py                 # this checkout
    python benchmarks/module_walks.py --root ../other # another one
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="the checkout to import")
    ap.add_argument("--models", nargs="+", default=["lenet5", "bert", "vit"])
    args = ap.parse_args(argv)
    sys.path[:0] = [str(Path(args.root) / "benchmarks"), args.root]
    import torch
    import torch.nn.functional as F

    from models import MODELS, make_input
    from mgs_torch import mgs_penalty, mgs_trace

    torch.set_num_threads(1)
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        x = make_input(name, 8)
        y = torch.zeros(8, dtype=torch.long)
        calls = {
            "exact tr K": lambda: mgs_trace(model, x),
            "Hutchinson tr K": lambda: mgs_trace(model, x, estimator="hutchinson"),
            "Hutchinson step": lambda: (F.cross_entropy(model(x), y) + mgs_penalty(model, x, estimator="hutchinson")).backward(),
        }
        cells = []
        for label, call in calls.items():
            call(), call()
            profile = cProfile.Profile()
            profile.enable()
            call()
            profile.disable()
            stats = pstats.Stats(profile).stats
            visits = sum(v[0] for k, v in stats.items() if k[2] == "named_modules")
            ms = sum(v[3] for k, v in stats.items() if k[2] == "named_modules") * 1e3
            cells.append(f"{label}: {visits} visits, {ms:.2f} ms")
        print(f"{name} ({len(list(model.modules()))} modules) | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
