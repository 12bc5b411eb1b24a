"""How large the MGS trace penalty is against the loss, and which α the tuning chose (issue 23).

The trace penalty of the testbench is α · tr K / N with N = n·q rows of K (``reduction="mean"``):
α times the mean squared norm of a row of J, one row per (sample, output). Two measurements:

* :func:`init_scale` — at initialisation, on ``batches`` random training mini-batches of each of
  ``seeds`` freshly initialised networks (model in training mode, as the penalty sees it): tr K / N,
  the mini-batch loss (cross-entropy or MSE), and the norms of their parameter gradients. Their ratio
  gives two candidate rules for α: ``alpha_value`` = loss / (tr K / N) (the penalty equals the loss at
  initialisation) and ``alpha_grad`` = ‖∇θ loss‖ / ‖∇θ (tr K / N)‖ (their gradients are equally long).
  :func:`init_record` stores one such measurement with the tuned α of the same setting, if any.
* :func:`sweep_table` — for runs of one method at several α and noise levels (e.g. ``mgs_trace`` at
  α ∈ {10⁻³ … 3·10⁻²}), the final *validation* accuracy of each α per noise level, the α that wins it,
  the final training loss on the noisy labels against the label-noise entropy H(p)
  (:func:`noise_entropy`), and the tr K / N the penalty holds the network at by the end of training.

``mgs-torch alpha`` writes the records; ``{{alpha_init out=...}}`` and ``{{alpha_sweep out=...}}`` in a
report template render them (:mod:`mgs_bench.report`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mgs_torch import mgs_penalty

from .data import load_dataset
from .models import AUTO_INIT, build_model
from .runner import RunConfig, load_results

__all__ = ["init_scale", "init_record", "init_table", "sweep_table", "noise_entropy", "rule_pick"]


def init_scale(config: RunConfig, seeds: Sequence[int] = (0, 1, 2), batches: int = 4) -> dict[str, Any]:
    """tr K / N, the loss and their gradient norms at initialisation (mean over seeds × mini-batches).

    Each seed builds the network as :func:`~mgs_bench.runner.train_run` does (``torch.manual_seed(seed)``,
    then the model) on the data of ``config`` (its noise decides the labels of the loss) and draws
    ``batches`` mini-batches of ``config.batch_size`` training samples.
    """
    rows = []
    for seed in seeds:
        data = load_dataset(config.dataset, train_size=config.train_size, noise=config.noise, seed=seed,
                            fixed_split=config.fixed_split, **dict(config.data_options))
        loss_fn = nn.functional.cross_entropy if data.is_classification else nn.functional.mse_loss
        torch.manual_seed(seed)
        model = build_model(config.model, data.input_shape, data.num_outputs, hidden=config.hidden, init=config.init)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed + 31_337))
        for b in range(batches):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            if len(idx) == 0:
                break
            x, y = data.x_train[idx], data.y_train[idx]
            loss = loss_fn(model(x), y)
            pen = mgs_penalty(model, x, kind="trace", reduction="mean")
            g_loss = torch.autograd.grad(loss, params, retain_graph=True)
            g_pen = torch.autograd.grad(pen, params, allow_unused=True)  # the last bias does not enter tr K
            norm = lambda gs: math.sqrt(sum(float((g * g).sum()) for g in gs if g is not None))  # noqa: E731
            rows.append((float(pen.detach()), float(loss.detach()), norm(g_loss), norm(g_pen)))
    trk, loss, gl, gp = (float(v) for v in np.mean(rows, 0))
    init = AUTO_INIT.get(config.model, config.init) if config.init == "auto" else config.init
    return {"dataset": config.dataset, "model": config.model, "init": init, "noise": config.noise, "classification": data.is_classification,
            "train_size": config.train_size, "batch_size": config.batch_size, "seeds": list(seeds), "batches": batches,
            "trace_per_row": trk, "trace_per_row_std": float(np.std([r[0] for r in rows])), "loss": loss,
            "grad_loss": gl, "grad_trace_per_row": gp, "alpha_value": loss / trk, "alpha_grad": gl / gp}


def init_record(config: RunConfig, out_dir: str | Path, *, tuned: str | Path | None = None, seeds: Sequence[int] = (0, 1, 2),
                batches: int = 4) -> dict[str, Any]:
    """:func:`init_scale` plus the tuned α of ``tuned`` (a ``tuned_*.json`` record), written to
    ``<out>/init/<data set>_<model>_<init>.json`` (recomputed each time: it takes seconds)."""
    rec = init_scale(config, seeds, batches)
    if tuned is not None:
        t = json.loads(Path(tuned).read_text())
        rec["tuned"] = {"alpha": t["chosen"].get("mgs_trace"), "record": str(tuned), "noise": t["scenario"]["noise"],
                        "train_size": t["scenario"]["train_size"], "scores": t["scores"].get("mgs_trace")}
    path = Path(out_dir) / "init" / f"{rec['dataset']}_{rec['model']}_{rec['init']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    rec["path"] = str(path)
    return rec


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def init_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per setting: tr K / N and the loss at initialisation, the two rules' α, the tuned α and their ratios."""
    lines = ["| data / model / init | tr K/N at init | loss at init | α: penalty = loss | α: equal gradients | tuned α (noise) | tuned / penalty = loss | tuned / equal gradients |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["dataset"], r["model"], r["init"])):
        t = r.get("tuned") or {}
        a = t.get("alpha")
        cell = "–" if a is None else f"{a:g} ({100 * t['noise']:g}%)" if r.get("classification", True) else f"{a:g} (σ = {t['noise']:g})"
        lines.append(f"| {r['dataset']} / {r['model']} / {r['init']} | {_g(r['trace_per_row'])} ± {_g(r['trace_per_row_std'])} | {_g(r['loss'])} | "
                     f"{_g(r['alpha_value'])} | {_g(r['alpha_grad'])} | {cell} | {_g(None if a is None else a / r['alpha_value'])} | "
                     f"{_g(None if a is None else a / r['alpha_grad'])} |")
    return "\n".join(lines) + (f"\n\ntr K/N: mean ± std over {len(records[0]['seeds'])} initialisations × {records[0]['batches']} training mini-batches "
                               f"of {records[0]['batch_size']} (model in training mode); loss: cross-entropy (MSE for diabetes) of the same "
                               "mini-batches; 'α: penalty = loss' = loss / (tr K/N), 'α: equal gradients' = ‖∇θ loss‖ / ‖∇θ tr K/N‖. "
                               "A ratio of 1 in the last two columns would mean the rule predicts the tuned α exactly.\n" if records else "")


def noise_entropy(noise: float, num_classes: int) -> float:
    """H(p): the cross-entropy on the noisy labels of a model that predicts, for every training image, its true class
    with probability 1 − p and each other class with p / (q − 1) — the calibrated fit of the signal under uniform
    label flips, which memorises nothing. Below it the model has fitted some flipped labels; above it, not all the signal."""
    if not 0 <= noise < 1 or num_classes < 2:
        raise ValueError(f"noise must lie in [0, 1) and num_classes be ≥ 2, got {noise}, {num_classes}")
    if noise == 0:
        return 0.0
    return float(-(1 - noise) * math.log(1 - noise) - noise * math.log(noise / (num_classes - 1)))


def rule_pick(final_train_loss: dict[float, float], entropy: float) -> float | None:
    """The rule of docs/choosing-alpha.md: the largest α whose final training loss on the noisy labels is at most H(p)
    (the strongest penalty that still lets the network fit the signal); the smallest α when none reaches H(p)."""
    if not final_train_loss:
        return None
    fitting = [a for a, v in final_train_loss.items() if v <= entropy]
    return max(fitting) if fitting else min(final_train_loss)


def _final_train_loss(r: dict[str, Any]) -> float | None:
    vals = [h.get("train_loss") for h in r["history"][-5:]]
    return float(np.mean(vals)) if vals and all(v is not None and math.isfinite(v) for v in vals) else None


def sweep_table(results: Sequence[dict[str, Any]], method: str = "mgs_trace") -> str:
    """Final validation accuracy per α (rows) and noise (columns) for each data set × model × init.

    Bold: the α with the best final validation accuracy at that noise level. †: the α :func:`rule_pick` chooses
    from the final training losses on the noisy labels and the label-noise entropy H(p) (:func:`noise_entropy`) —
    the rule of docs/choosing-alpha.md, which needs no clean labels. A last line counts how often the two agree.
    """
    groups: dict[tuple, dict[float, dict[float, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        c = r["config"]
        if c["method"] == method and r["summary"]["higher_is_better"]:
            init = AUTO_INIT.get(c["model"], c["init"]) if c["init"] == "auto" else c["init"]
            groups[(c["dataset"], c["model"], init, c["train_size"], c["epochs"])][c["noise"]][c["value"]].append(r)
    parts, agree, total, steps = [], 0, 0, []
    for (ds, model, init, size, epochs), by_noise in sorted(groups.items()):
        noises = sorted(by_noise)
        alphas = sorted({a for nz in noises for a in by_noise[nz]})
        q = next(iter(next(iter(by_noise.values())).values()))[0]["data"]["num_outputs"]
        seeds = sorted({r["config"]["seed"] for nz in noises for runs in by_noise[nz].values() for r in runs})
        best, rule, commons = {}, {}, {}
        for nz in noises:
            ok = {a: runs for a, runs in by_noise[nz].items() if all(r["summary"]["final_val"] is not None for r in runs)}
            common = set.intersection(*({r["config"]["seed"] for r in runs} for runs in ok.values())) if ok else set()
            ok = {a: [r for r in runs if r["config"]["seed"] in common] for a, runs in ok.items()}  # compare like with like
            commons[nz] = common
            val = {a: np.mean([r["summary"]["final_val"] for r in runs]) for a, runs in ok.items()}
            loss = {a: np.mean([_final_train_loss(r) for r in runs]) for a, runs in ok.items()}
            best[nz] = max(val, key=val.get) if val else None
            target = noise_entropy(nz, q)
            rule[nz] = rule_pick(loss, target) if nz > 0 else None
            if len(val) > 1 and rule[nz] is not None:
                total += 1
                agree += rule[nz] == best[nz]
                steps.append(abs(alphas.index(rule[nz]) - alphas.index(best[nz])))
        shared_note = "; ".join(f"{100 * nz:g}%: seed{'s' if len(commons[nz]) > 1 else ''} {', '.join(map(str, sorted(commons[nz])))}"
                                for nz in noises if commons[nz] and len(commons[nz]) < len(seeds))
        head = (f"**{ds} / {model} / {init} init / {size} training samples / {epochs} epochs** (seeds {', '.join(map(str, seeds))}"
                + (f"; compared on the seeds every α ran — {shared_note}" if shared_note else "") + "; "
                + ", ".join(f"H({100 * nz:g}%) = {noise_entropy(nz, q):.2f}" for nz in noises if nz > 0) + ")\n\n")
        lines = ["| α | " + " | ".join(f"{100 * nz:g}%: val (test) | train loss | tr K/N" for nz in noises) + " |",
                 "|---:|" + "---:|---:|---:|" * len(noises)]
        for a in alphas:
            cells = []
            for nz in noises:
                runs = by_noise[nz].get(a, [])
                if not runs or any(r["summary"]["final_val"] is None for r in runs):
                    cells += ["–" if not runs else "div.", "–", "–"]
                    continue
                shared = [r for r in runs if r["config"]["seed"] in commons[nz]] or runs  # the seeds the column compares on
                val = 100 * np.mean([r["summary"]["final_val"] for r in shared])
                test = 100 * np.mean([r["summary"]["final"] for r in shared])
                trk = np.mean([r["history"][-1]["mgs_trace"] / (r["config"]["probe_size"] * r["data"]["num_outputs"]) for r in shared])
                txt = f"{val:.1f} ({test:.1f})"
                if len(shared) < len(runs):  # this α ran more seeds than the column shares: their mean too
                    txt += f"; {len(runs)} seeds: {100 * np.mean([r['summary']['final_val'] for r in runs]):.1f}"
                loss = f"{np.mean([_final_train_loss(r) for r in shared]):.2f}" + (" †" if a == rule[nz] else "")
                cells += [f"**{txt}**" if a == best[nz] else txt, loss, f"{trk:.3g}"]
            lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
        parts.append(head + "\n".join(lines))
    if not parts:
        return "_no runs found_\n"
    summary = (f"The rule (†) picks the best-validation α (bold) in {agree} of {total} columns with more than one α"
               + (f"; where it does not, it is {', '.join(str(s) for s in steps if s)} grid step(s) away" if agree < total else "") + "."
               if total else "")
    return "\n\n".join(parts) + ("\n\nval (test): final validation (test) accuracy in %, mean over the seeds every α of the column ran (final = "
                                 "mean of the last 5 evaluations; where an α ran more seeds, '2 seeds: …' gives their mean validation "
                                 "accuracy); bold = the α with the best final validation accuracy at that noise level; train loss: "
                                 "final cross-entropy on the noisy training labels (mean of the last 5 evaluations and over the same seeds); "
                                 "† = the rule's α: the largest α whose final training loss is at most H(p), the loss of a model that predicts "
                                 "every image's true class with probability 1 − p (the label-noise entropy); tr K/N = tr K / N of the fixed "
                                 "32-image probe batch at the last epoch. " + summary + "\n")


def load_init_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every record :func:`init_record` wrote under ``<out>/init``."""
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "init").glob("*.json"))]


def load_sweep(out_dir: str | Path, **where: Any) -> list[dict[str, Any]]:
    """The run JSONs of a sweep folder (``<out>/runs``)."""
    return load_results(out_dir, **where)
