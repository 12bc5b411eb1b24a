"""How well per-sample MGS scores flag flipped training labels, next to the per-sample loss.

One run trains like any testbench run (:func:`~mgs_bench.runner.train_run`, same seeds,
same protocol) and, at every evaluation epoch, scores **every training sample** with the network of
that epoch (eval mode) and the *noisy* labels it is trained on:

* ``loss``              per-sample cross-entropy (the obvious baseline; higher = more suspicious);
* ``energy_outputs``    tr of the sample's diagonal block of K, Σ_a ‖∇θ f_a(x_i)‖² (label-free; higher);
* ``agreement_outputs`` its mean gradient cosine with all other samples, output-summed kernel (lower);
* ``energy_loss``       ‖∇θ ℓ_i‖², the per-sample loss-gradient energy (higher);
* ``agreement_loss``    mean cosine of its loss gradient with all others' (lower);
* ``agreement_loss_same_label`` the same, only with samples of the same (noisy) label (lower).

Each score's AUROC for the flipped-label mask is stored (orientation fixed in advance as above: 0.5 =
chance, 1 = every flipped sample ranks above every clean one). Scores come from
:func:`mgs_torch.mgs_sample_scores`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mgs_torch import mgs_sample_scores

from .runner import RunConfig, train_run

__all__ = ["SCORES", "auroc", "score_samples", "flagging_run", "flagging_table"]

#: score name -> +1 if a higher value is more suspicious, -1 if lower is
SCORES: dict[str, int] = {
    "loss": +1,
    "energy_outputs": +1,
    "agreement_outputs": -1,
    "energy_loss": +1,
    "agreement_loss": -1,
    "agreement_loss_same_label": -1,
}


def auroc(scores: Tensor, positives: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting ½ (scikit-learn's ROC AUC)."""
    from sklearn.metrics import roc_auc_score

    pos = positives.bool().flatten().numpy()
    if pos.all() or not pos.any():
        return math.nan
    return float(roc_auc_score(pos, scores.double().flatten().numpy()))


def score_samples(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Every score of :data:`SCORES` for each sample of (x, y), float64 CPU tensors of shape (n,)."""
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y, reduction="none").double().cpu()
    out_scores = mgs_sample_scores(model, x, dtype=torch.float64)
    loss_scores = mgs_sample_scores(model, x, targets=y, dtype=torch.float64)
    return {
        "loss": loss,
        "energy_outputs": out_scores.energy,
        "agreement_outputs": out_scores.agreement,
        "energy_loss": loss_scores.energy,
        "agreement_loss": loss_scores.agreement,
        "agreement_loss_same_label": loss_scores.agreement_same_label,
    }


def flagging_run(config: RunConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``config`` and record each score's AUROC for the flipped labels at every evaluation.

    Resumable: with ``out_dir``, ``<out>/flagging/<data set>/<model>/<run id>.json`` is reused if present.
    """
    path = None if out_dir is None else Path(out_dir) / "flagging" / config.dataset / config.model / f"{config.run_id}.json"
    if path is not None and path.exists():
        return json.loads(path.read_text())

    def hook(epoch: int, model: nn.Module, data) -> dict[str, Any]:
        scores = score_samples(model, data.x_train, data.y_train)
        return {name: auroc(SCORES[name] * v, data.noisy_mask) for name, v in scores.items()}

    result = train_run(config, evaluate_hook=hook)
    record = {
        "config": result["config"], "run_id": config.run_id, "flipped": result["data"]["flipped"],
        "train_size": result["data"]["train_size"], "auroc": result["extras"],
        "test_acc": [(h["epoch"], h["test_acc"]) for h in result["history"]],
        "memorised": [(h["epoch"], h.get("memorised")) for h in result["history"]],
        "seconds": result["seconds"],
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, allow_nan=True))
    return record


def flagging_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one table per noise level, rows = scores, columns = evaluation epochs, AUROC mean ± std over seeds."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        c = r["config"]
        groups[(c["dataset"], c["model"], c["noise"], c["train_size"])].append(r)
    parts = []
    for (dataset, model, noise, size), runs in sorted(groups.items()):
        epochs = [row["epoch"] for row in runs[0]["auroc"]]
        mem = {e: [] for e in epochs}
        for r in runs:
            for e, m in r["memorised"]:
                if e in mem and m is not None:
                    mem[e].append(m)
        parts.append(f"**{dataset} / {model} / {size} training samples / {100 * noise:g}% flipped labels** "
                     f"({len(runs)} seed{'s' if len(runs) > 1 else ''}; AUROC, mean ± std; 0.5 = chance)\n")
        parts.append("| score | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
        parts.append("|---|" + "---:|" * len(epochs))
        for name in SCORES:
            cells = []
            for i, _ in enumerate(epochs):
                vals = torch.tensor([r["auroc"][i][name] for r in runs], dtype=torch.float64)
                cells.append(f"{float(vals.mean()):.3f}" + (f" ± {float(vals.std()):.3f}" if len(runs) > 1 else ""))
            parts.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("| *flipped labels memorised* | " + " | ".join(
            f"{100 * sum(mem[e]) / len(mem[e]):.0f}%" if mem[e] else "–" for e in epochs) + " |")
        parts.append("")
    return "\n".join(parts) if parts else "_no runs found_\n"
