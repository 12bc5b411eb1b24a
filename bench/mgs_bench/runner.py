"""Training runs, resumable grids and one-off hyper-parameter tuning.

One run = one (data set, model, method, hyper-parameter, noise, training size, seed). It trains
with a plain PyTorch loop — SGD (or Adam), batch size 32, learning rate 0.1 decayed by
``lr_decay`` per epoch, no early stopping — and evaluates at ``eval_points`` evenly spaced epochs
(epoch 0 = initialisation included):

* the test metric — accuracy (classification) or mean squared error (regression) on the clean test set;
* the same on the clean validation set, and the loss/accuracy on the (noisy) training set;
* the MGS metrics of a fixed *probe batch* (``probe_size`` training inputs drawn once per seed): the
  kernel K of the network in eval mode (Dropout off), computed in float64, its trace, log det
  (``None`` in JSON / ``-inf`` in CSV when K is numerically singular), rank and size.

A run writes ``<out>/runs/<data set>/<model>/<method>/<run id>.json`` (config, history, summary)
and a ``.csv`` of the history beside it, and optionally TensorBoard scalars (``mgs/trace``,
``mgs/logdet``, ``test/accuracy``, ...). A run whose JSON exists is not repeated (resumable).

Summary: ``final`` = mean of the last 5 evaluations of the test metric, ``best`` = its maximum
(accuracy) or minimum (error) over training; the same for validation (``final_val``, ``best_val``).
``final_paper`` / ``final_paper_val``: the paper's definition, the mean over the evaluations in the
last 5 % of training (epoch ≥ 0.95·epochs; at least the last one) — evaluate often enough near the
end (``eval_points = epochs + 1`` evaluates every epoch) for it to average more than one point. The
paper's *max* (the maximum of the seed-averaged curve) needs all seeds and is computed by the report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mgs_torch import NonFiniteOutputError, mgs_kernel, mgs_metrics

from . import require
from .data import DATASETS, Dataset, load_dataset
from .methods import METHODS, default_grid, make_method
from .models import INITS, MODELS, build_model

__all__ = ["RunConfig", "train_run", "run_grid", "run_path", "load_results", "tune", "summarise_history", "FINAL_WINDOW",
           "PAPER_FINAL_FRACTION", "paper_final"]

FINAL_WINDOW = 5  # final = mean of the last 5 evaluations
PAPER_FINAL_FRACTION = 0.05  # the paper's final = mean over the last 5 % of training
SCHEMA = 1
# Fields added after runs were committed: left out of the run id's hash while at their default, so the
# ids (and resumability) of every earlier run stay as they were.
_HASH_IF_SET = {"fixed_split": False, "alpha_warmup": 0}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run (and its run id)."""

    dataset: str = "digits"
    model: str = "lenet5"
    method: str = "unreg"
    value: float | None = None
    noise: float = 0.0
    train_size: int = 500
    seed: int = 0
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.1
    lr_decay: float = 0.99
    eval_points: int = 25
    probe_size: int = 32
    hidden: tuple[int, ...] | None = None
    init: str = "auto"
    data_options: tuple[tuple[str, Any], ...] = ()
    fixed_split: bool = False
    alpha_warmup: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown data set {self.dataset!r}; choose one of {DATASETS}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODELS}")
        make_method(self.method, self.value)  # validates the method name and value
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_points < 2 or self.probe_size < 1:
            raise ValueError("epochs, batch_size and probe_size must be ≥ 1 and eval_points ≥ 2")
        if self.alpha_warmup < 0:
            raise ValueError(f"alpha_warmup is a number of epochs ≥ 0, got {self.alpha_warmup}")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr must be positive and lr_decay in (0, 1], got {self.lr}, {self.lr_decay}")

    @property
    def run_id(self) -> str:
        """Readable stem plus a hash of the whole config (so changed settings never reuse a result)."""
        fields = {k: v for k, v in asdict(self).items() if not (k in _HASH_IF_SET and v == _HASH_IF_SET[k])}
        blob = json.dumps(fields, sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        value = "" if self.value is None else f"{self.value:g}"
        return f"noise{self.noise:g}_n{self.train_size}_seed{self.seed}_{self.method}{value}_{digest}"

    @property
    def display_name(self) -> str:
        """The run's name with the method first (TensorBoard truncates long run names from the right)."""
        value = "" if self.value is None else f"{self.value:g}"
        return f"{self.method}{value}_noise{self.noise:g}_n{self.train_size}_seed{self.seed}_{self.run_id[-8:]}"

    def with_(self, **changes: Any) -> "RunConfig":
        return replace(self, **changes)


def run_path(out_dir: str | os.PathLike, config: RunConfig) -> Path:
    """``<out>/runs/<data set>/<model>/<method>/<run id>.json``."""
    return Path(out_dir) / "runs" / config.dataset / config.model / config.method / f"{config.run_id}.json"


def eval_epochs(epochs: int, points: int) -> list[int]:
    """``points`` evenly spaced epochs from 0 (initialisation) to ``epochs`` (duplicates merged)."""
    return sorted({int(round(k * epochs / (points - 1))) for k in range(points)})


# ------------------------------------------------------------------------------------------------
# evaluation


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, classification: bool, batch: int = 1024) -> tuple[float, float]:
    """(loss, accuracy) for classification or (MSE, nan) for regression, model in eval mode."""
    losses, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch])
            yb = y[i : i + batch]
            if classification:
                losses += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(1) == yb).sum())
            else:
                losses += float(((out - yb) ** 2).sum())
    n = max(len(x), 1)
    return losses / n / (1 if classification else y[0].numel()), (correct / n if classification else math.nan)


def _mgs(model: nn.Module, probe: Tensor) -> dict[str, Any]:
    """MGS metrics of the probe batch in float64 (eval mode); log det ``None`` when K is singular."""
    try:
        K = mgs_kernel(model, probe, dtype=torch.float64)
        m = mgs_metrics(K)
    except NonFiniteOutputError as exc:  # the run has diverged
        return {"mgs_trace": None, "mgs_logdet": None, "mgs_rank": None, "mgs_size": None, "mgs_error": str(exc)}
    return {
        "mgs_trace": m.trace,
        "mgs_logdet": m.logdet if math.isfinite(m.logdet) else None,
        "mgs_rank": m.rank,
        "mgs_size": m.size,
        "mgs_singular": m.singular,
    }


def paper_final(history: Sequence[dict[str, Any]], key: str, epochs: int | None = None) -> float | None:
    """The paper's final value: mean of ``key`` over the evaluations at epoch ≥ (1 − 5 %)·epochs.

    ``epochs`` defaults to the last evaluated epoch; at least the last evaluation is used. ``None``
    when a value in the window is missing or not finite (a diverged run).
    """
    if not history or any(h.get(key) is None for h in history):
        return None
    ep = [h.get("epoch", i) for i, h in enumerate(history)]  # epoch 0 = initialisation
    end = epochs if epochs is not None else ep[-1]
    window = [h[key] for e, h in zip(ep, history) if e >= (1 - PAPER_FINAL_FRACTION) * end] or [history[-1][key]]
    return float(np.mean(window)) if all(math.isfinite(v) for v in window) else None


def summarise_history(history: Sequence[dict[str, Any]], classification: bool) -> dict[str, Any]:
    """final (mean of the last :data:`FINAL_WINDOW` evaluations), final_paper (last 5 % of training) and best (max acc / min error)."""
    key = "acc" if classification else "loss"
    better = max if classification else min
    out: dict[str, Any] = {"metric": "accuracy" if classification else "mse", "higher_is_better": classification}
    for split in ("test", "val"):
        vals = [h[f"{split}_{key}"] for h in history if h.get(f"{split}_{key}") is not None]
        finite = [v for v in vals if math.isfinite(v)]
        suffix = "" if split == "test" else "_val"
        out["final" + suffix] = float(np.mean(vals[-FINAL_WINDOW:])) if len(finite) == len(vals) and vals else None
        out["best" + suffix] = float(better(finite)) if finite else None
        out["final_paper" + suffix] = paper_final(history, f"{split}_{key}") if vals else None
    last = history[-1] if history else {}
    out["final_mgs_trace"] = last.get("mgs_trace")
    out["final_mgs_logdet"] = last.get("mgs_logdet")
    out["logdet_singular_evals"] = sum(1 for h in history if h.get("mgs_singular"))
    return out


def _boundary(model: nn.Module, data: Dataset, resolution: int = 60) -> dict[str, Any]:
    """P(class 1) on a grid over the inputs' range (2-D inputs only), for decision-boundary plots."""
    x = torch.cat([data.x_train, data.x_test])
    lo, hi = (x.min(0).values - 0.2).tolist(), (x.max(0).values + 0.2).tolist()
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], resolution), torch.linspace(lo[1], hi[1], resolution), indexing="xy")
    with torch.no_grad():
        prob = torch.softmax(model(torch.stack([gx.ravel(), gy.ravel()], 1)), 1)[:, 1].reshape(resolution, resolution)
    return {"extent": [lo[0], hi[0], lo[1], hi[1]], "prob": [[round(float(v), 4) for v in row] for row in prob]}


# ------------------------------------------------------------------------------------------------
# one run


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for h in history for k in h))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for h in history:
            row = dict(h)
            if "mgs_logdet" in row and row["mgs_logdet"] is None and row.get("mgs_singular"):
                row["mgs_logdet"] = "-inf"
            w.writerow(row)
    os.replace(tmp, path)


def train_run(
    config: RunConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
    tb_dir: str | os.PathLike | None = None,
    data: Dataset | None = None,
    return_model: bool = False,
    evaluate_hook: Callable[[int, nn.Module, Dataset], dict[str, Any]] | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], nn.Module]:
    """Train one run and return its result (config, history, summary); write JSON/CSV when ``out_dir`` is given.

    Seeds: ``torch.manual_seed(seed)`` before the model is built (every method of a seed starts
    from the same weights), a seeded generator for the batch order, and the data seed. The global
    RNG also drives Dropout masks. If the loss becomes non-finite the run stops and is marked
    ``diverged`` (its ``final`` is ``None``).

    ``evaluate_hook(epoch, model, data)`` runs at every evaluation (model in eval mode, global RNG
    forked so the run is the same with or without it); what it returns is kept, with the epoch, in
    ``result["extras"]`` (not part of the run id: use it for analyses, not to change training).
    """
    t0 = time.perf_counter()
    method = make_method(config.method, config.value)
    if data is None:
        data = load_dataset(config.dataset, train_size=config.train_size, noise=config.noise, seed=config.seed,
                            fixed_split=config.fixed_split, **dict(config.data_options))
    classification = data.is_classification
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_outputs, dropout=method.dropout(), hidden=config.hidden, init=config.init)
    opt = method.optimizer(model.parameters(), config.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
    loss_fn = nn.functional.cross_entropy if classification else nn.functional.mse_loss
    order_gen = torch.Generator().manual_seed(config.seed)
    probe_idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(config.seed + 10_007))[: config.probe_size]
    probe = data.x_train[probe_idx]
    hutchinson_gen = torch.Generator().manual_seed(config.seed + 20_011)  # Hutchinson probes, per run
    warmup_steps = config.alpha_warmup * math.ceil(len(data.x_train) / config.batch_size)
    writer = None
    if tensorboard:
        tb = require("torch.utils.tensorboard", "TensorBoard logging (pip install tensorboard)")
        tb_dir = tb_dir or (Path(out_dir or ".") / "tensorboard" / config.dataset / config.model / config.display_name)
        writer = tb.SummaryWriter(str(tb_dir))

    history: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    schedule = set(eval_epochs(config.epochs, config.eval_points))
    step, diverged, train_loss_sum, train_batches = 0, None, 0.0, 0

    def evaluate(epoch: int) -> None:
        model.eval()
        te_loss, te_acc = _evaluate(model, data.x_test, data.y_test, classification)
        va_loss, va_acc = _evaluate(model, data.x_val, data.y_val, classification) if len(data.x_val) else (math.nan, math.nan)
        tr_loss, tr_acc = _evaluate(model, data.x_train, data.y_train, classification)
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"], "test_loss": te_loss, "val_loss": va_loss, "train_loss": tr_loss}
        if classification:
            row.update(test_acc=te_acc, val_acc=va_acc, train_acc=tr_acc)
            if bool(data.noisy_mask.any()):
                with torch.no_grad():
                    pred = model(data.x_train[data.noisy_mask]).argmax(1)
                row["memorised"] = float((pred == data.y_train[data.noisy_mask]).float().mean())
        row["batch_loss"] = train_loss_sum / train_batches if train_batches else None
        row.update(_mgs(model, probe))
        if evaluate_hook is not None:
            with torch.random.fork_rng(devices=[]):
                extras.append({"epoch": epoch, **evaluate_hook(epoch, model, data)})
        model.train()
        history.append(row)
        if writer is not None:
            metric = "accuracy" if classification else "mse"
            scalars = {f"test/{metric}": te_acc if classification else te_loss, "test/loss": te_loss, "train/loss": tr_loss,
                       f"val/{metric}": va_acc if classification else va_loss, "mgs/trace": row["mgs_trace"],
                       "mgs/logdet": row["mgs_logdet"], "mgs/rank": row["mgs_rank"], "lr": row["lr"]}
            for tag, v in scalars.items():
                if v is not None and math.isfinite(v):  # log det = -inf is not logged (a gap), see mgs/rank
                    writer.add_scalar(tag, v, epoch)
            writer.add_scalar("mgs/singular", float(bool(row.get("mgs_singular"))), epoch)

    model.train()
    evaluate(0)
    n = len(data.x_train)
    for epoch in range(1, config.epochs + 1):
        train_loss_sum, train_batches = 0.0, 0
        perm = torch.randperm(n, generator=order_gen)
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            if method.needs_input_grad:
                x = x.clone().requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            try:
                if not torch.isfinite(loss):
                    raise FloatingPointError
                pen = method.penalty(model, x, y, loss_fn, loss, generator=hutchinson_gen)
                alpha = method.alpha * (min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)  # linear α warm-up
                total = loss + alpha * pen if pen is not None else loss
                if not torch.isfinite(total):
                    raise FloatingPointError
            except (FloatingPointError, NonFiniteOutputError):  # the penalty saw NaN/inf outputs
                diverged = epoch
                break
            total.backward()
            opt.step()
            step += 1
            train_loss_sum += float(loss.detach())
            train_batches += 1
        if diverged is not None:
            break
        sched.step()
        if epoch in schedule:
            evaluate(epoch)
    if writer is not None:
        writer.close()

    summary = summarise_history(history, classification)
    if diverged is not None:
        summary.update(final=None, final_val=None, diverged_at_epoch=diverged)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": config.run_id,
        "config": asdict(config),
        "method": {"name": method.name, "hyper": method.hyper, "value": method.value, "label": method.label},
        "data": {"task": data.task, "num_outputs": data.num_outputs, "input_shape": list(data.input_shape),
                 "train_size": len(data.x_train), "val_size": len(data.x_val), "test_size": len(data.x_test),
                 "flipped": int(data.noisy_mask.sum()) if classification else None},
        "history": history,
        "summary": summary,
        "diverged": diverged is not None,
        "seconds": round(time.perf_counter() - t0, 3),
        "torch_threads": torch.get_num_threads(),
        "notes": "mgs_logdet is null where K was numerically singular (log det = -inf, see mgs_singular/mgs_rank)",
        "data_meta": {k: v for k, v in data.meta.items() if isinstance(v, (int, float, str, bool))},
    }
    if evaluate_hook is not None:
        result["extras"] = extras
    if data.input_shape == (2,) and classification:
        model.eval()
        result["boundary"] = _boundary(model, data)
    if out_dir is not None:
        path = run_path(out_dir, config)
        _write_csv(path.with_suffix(".csv"), history)
        _atomic_write(path, json.dumps(result, indent=1, allow_nan=True))
    return (result, model) if return_model else result


# ------------------------------------------------------------------------------------------------
# grids


def run_grid(
    configs: Iterable[RunConfig],
    out_dir: str | os.PathLike,
    *,
    tensorboard: bool = False,
    progress: bool = True,
    desc: str = "runs",
) -> list[dict[str, Any]]:
    """Run every config not finished yet (its JSON exists → loaded, not re-run); progress bar over runs."""
    configs = list(configs)
    results: list[dict[str, Any]] = []
    todo = [c for c in configs if not run_path(out_dir, c).exists()]
    bar = None
    if progress:
        tqdm = require("tqdm", "the progress bar").tqdm
        bar = tqdm(total=len(configs), desc=desc, initial=len(configs) - len(todo), unit="run", dynamic_ncols=True)
    for c in configs:
        path = run_path(out_dir, c)
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        if bar is not None:
            bar.set_postfix_str(f"{c.model} {c.method} noise={c.noise:g} n={c.train_size} seed={c.seed}")
        results.append(train_run(c, out_dir=out_dir, tensorboard=tensorboard))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def load_results(out_dir: str | os.PathLike, **where: Any) -> list[dict[str, Any]]:
    """Every run JSON under ``<out>/runs`` whose config matches ``where`` (e.g. ``dataset="digits"``)."""
    results = []
    for path in sorted((Path(out_dir) / "runs").rglob("*.json")):
        r = json.loads(path.read_text())
        if all(r["config"].get(k) == v for k, v in where.items()):
            results.append(r)
    return results


def tuned_path(out_dir: str | Path, dataset: str, model: str) -> Path:
    """Where the tuning record of ``dataset`` × ``model`` lives: ``<out>/tuned_<data set>_<model>.json``."""
    return Path(out_dir) / f"tuned_{dataset}_{model}.json"


def tune(
    base: RunConfig,
    methods: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    grids: dict[str, Sequence[float]] | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
) -> dict[str, Any]:
    """Pick each method's hyper-parameter once, on ``base``'s scenario, by the final *validation* metric.

    For every method with a hyper-parameter, each value of its grid (default :func:`default_grid`)
    is trained for each seed at ``base``'s data set, model, noise and size; the value with the best
    mean final validation metric (accuracy ↑ / MSE ↓ on clean held-out pool data, never the test set)
    wins. Runs live under ``<out>/tune`` (resumable); the choice is written to
    ``<out>/tuned_<data set>_<model>.json`` and returned: ``{"chosen": {method: value}, "scores": ...}``.
    """
    grids = dict(grids or {})
    configs, keys = [], []
    for m in methods:
        if METHODS[m][0] is None:
            continue
        for v in grids.get(m, default_grid(m)):
            for s in seeds:
                configs.append(base.with_(method=m, value=float(v), seed=s))
                keys.append((m, float(v)))
    results = run_grid(configs, Path(out_dir) / "tune", progress=progress, desc="tuning")
    scores: dict[str, dict[str, float | None]] = {}
    chosen: dict[str, float] = {}
    higher = None
    for (m, v), r in zip(keys, results):
        higher = r["summary"]["higher_is_better"]
        scores.setdefault(m, {}).setdefault(f"{v:g}", [])  # type: ignore[arg-type]
        scores[m][f"{v:g}"].append(r["summary"]["final_val"])  # type: ignore[union-attr]
    for m, by_value in scores.items():
        best_v, best_s = None, None
        for v, vals in by_value.items():
            ok = [x for x in vals if x is not None]  # type: ignore[union-attr]
            s = float(np.mean(ok)) if ok and len(ok) == len(vals) else None  # a diverged seed disqualifies the value
            by_value[v] = s
            if s is not None and (best_s is None or (s > best_s if higher else s < best_s)):
                best_v, best_s = float(v), s
        if best_v is not None:
            chosen[m] = best_v
    record = {
        "scenario": {k: v for k, v in asdict(base).items() if k not in ("method", "value", "seed")},
        "seeds": list(seeds),
        "criterion": "mean over seeds of the final (mean of last 5 evaluations) validation " + ("accuracy (max)" if higher else "MSE (min)"),
        "chosen": chosen,
        "scores": scores,
    }
    _atomic_write(tuned_path(out_dir, base.dataset, base.model), json.dumps(record, indent=1))
    return record
