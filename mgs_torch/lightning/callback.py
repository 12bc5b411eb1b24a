r"""MGSMonitor: log the MGS metrics of the model during ``Trainer.fit``.

>>> trainer = pl.Trainer(callbacks=[MGSMonitor(probe="val", max_samples=64)], logger=TensorBoardLogger("lightning_logs"))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from .._io import OutputSelector, batch_size, check_selector, map_tensors
from .._validation import select_metrics
from ..kernel import mgs_kernel
from ..metrics import MGSMetrics, mgs_metrics
from ..options import Inputs, KernelOptions, ParamFilter
from ..scores import SampleScores, sample_scores_from_kernel
from .probe import draw_probe_batch
from ._utils import (
    MGSConfigurationError,
    rank_zero_info,
    rank_zero_warn,
    cap_samples,
    check_choice,
    check_float,
    check_int,
    configuration_errors,
    compute_dtype,
    default_inputs,
    default_targets,
    module_mode,
    pl,
)

__all__ = ["MGSMonitor", "METRIC_NAMES", "DEFAULT_METRICS", "PROBES"]

#: every scalar :class:`~mgs_torch.MGSMetrics` field that can be logged
METRIC_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MGSMetrics) if f.name not in ("eigenvalues", "jitter"))
#: what is logged unless ``metrics=`` says otherwise
DEFAULT_METRICS: tuple[str, ...] = ("trace", "logdet", "trace_per_row", "logdet_per_row", "rank")
#: where the kernel's batch comes from
PROBES: tuple[str, ...] = ("current", "train", "val")
#: the scalar summaries logged with ``log_sample_scores=True``
SAMPLE_SCORE_NAMES: tuple[str, ...] = tuple(
    f"sample_{score}_{stat}" for score in ("energy", "agreement") for stat in ("median", "min", "max")
)
MODEL_MODES: tuple[str, ...] = ("train", "eval")
# what a metric computation may raise (bad outputs, a layer mgs_torch refuses, linear algebra, memory):
# logged as NaN with a warning; anything else is a bug and is not swallowed
_METRIC_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError)


class MGSMonitor(pl.Callback):
    r"""Log the Model Gradient Similarity metrics of the model being trained.

    At a step interval (and optionally at the end of every training epoch) the callback forms the
    MGS kernel of one batch X of n samples with q raw outputs each,

    .. math:: K = J J^\top,\qquad J = \partial f_\theta(X) / \partial\theta \in \mathbb{R}^{nq\times p},

    and logs through every logger of the Trainer (keys ``prefix + name``; defaults)::

        mgs/trace            tr K = Σ_k λ_k
        mgs/logdet           log det K = Σ_k log λ_k   (-inf when K is numerically singular)
        mgs/trace_per_row    tr K / N          (N = n·q rows, or n with outputs="sum")
        mgs/logdet_per_row   log det K / N
        mgs/rank             numerical rank of K

    Any field of :class:`mgs_torch.MGSMetrics` can be asked for with ``metrics=`` (``"all"`` for
    every one; ``"alignment"`` needs targets in the batch).

    Steps are those Lightning logs its own training metrics at, so the curves line up with the
    loss: at step s (optimiser steps taken so far, from 0) the kernel of the weights that step
    starts from is computed in ``on_train_batch_start`` (once per optimiser step under gradient
    accumulation) and logged when ``(s + 1) % log_every_n_steps == 0``. Epoch-end values are the
    kernel of the weights the epoch ends with, on the probe batch (``probe="current"``: the
    epoch's last training batch), under the keys with suffix ``_epoch`` (``mgs/trace_epoch``), at
    the step Lightning logs epoch metrics at.

    Args:
        log_every_n_steps: step interval; ``None`` (default) takes the Trainer's
            ``log_every_n_steps``; ``0`` logs no step values (use with ``log_on_epoch_end=True``).
        log_on_epoch_end: also log at the end of every training epoch (keys with ``_epoch``).
        max_overhead: a budget for the monitor's share of the fit's wall time, e.g. ``0.05``. Before a
            scheduled step the callback compares its seconds so far plus the last kernel's cost c with the
            fit's: it computes the step only if ``own + c ≤ max_overhead · (elapsed + c)``, and otherwise
            skips it (counted in :attr:`skipped_steps`; the first skip is announced). The first scheduled
            step is always computed, so in a short fit the share can exceed the budget by one kernel; over a
            long one it tends to the budget. Which steps are logged then depends on timing (rank 0's clock,
            broadcast under DDP). Epoch-end values are never skipped. ``None`` (default): every scheduled step.
        probe: which batch the kernel is formed on. ``"current"`` (default): the training batch of
            the step (under DDP, rank 0's local batch). ``"train"`` / ``"val"``: a fixed probe batch
            drawn once when training starts from the training / validation dataset — ``max_samples``
            samples (default: the loader's batch size) chosen at random with ``seed``, collated
            with the loader's ``collate_fn`` — so curves are comparable across epochs and runs.
            It is kept in :meth:`state_dict`, so a resumed run keeps its probe.
        max_samples: cap on the samples used (the first ``max_samples`` of the batch). The cost
            grows as N³ (eigenvalues) and N²·p (kernel), N = n·q.
        metrics: names of the scalars to log (see above) or ``"all"``.
        prefix: key prefix, default ``"mgs/"``.
        model_mode: ``"train"`` (default): the model as the Trainer has it (Dropout active — its
            K is random and may be singular, which is reported as logdet = -inf);
            ``"eval"``: the deterministic network (``model.eval()`` for the computation only).
        batch_norm, outputs, params, strategy, chunk_size: as in :func:`mgs_torch.mgs_kernel`.
        dtype: dtype of the kernel computation. Default ``torch.float64``: the log-determinant of a
            float32 kernel is often -inf for lack of precision alone. ``None``: the parameters' dtype
            (float32 for half/bfloat16 parameters or ``*-mixed`` precision).
        jitter: ε added to K's diagonal before its spectrum is taken (see :func:`mgs_torch.mgs_metrics`).
        log_spectrum: with a ``TensorBoardLogger``, also log the eigenvalues λ_k and log10 λ_k
            (positive ones) as histograms ``mgs/eigenvalues`` and ``mgs/log10_eigenvalues``.
        log_kernel_image: with a ``TensorBoardLogger``, also log K as a grey-scale image
            ``mgs/kernel`` (|K_ij| / max|K|).
        inputs_fn: ``batch -> inputs`` for the model; default: the LightningModule's
            ``mgs_inputs`` if it has one (:class:`MGSRegularizedMixin`), else the first element of
            a tuple batch / the tensor itself / ``batch["x"]`` / a dict's tensors other than its
            targets as keyword inputs (a tokenizer's dict: ``input_ids``, ``attention_mask``, …).
        targets_fn: ``batch -> targets`` for ``"alignment"``; default: the second element.
        module: attribute name of the submodule whose outputs are the logits (e.g. ``"net"`` for
            ``pl_module.net``); default: the LightningModule's ``mgs_module()`` if it has one,
            else the LightningModule itself (its ``forward`` must return raw outputs).
        logits: where the raw outputs are in what the module returns (a ``ModelOutput``'s
            ``.logits`` by default; a key, index or callable), as in :func:`mgs_torch.mgs_kernel`.
        seed: seed of the probe's random subset.
        log_sample_scores: also log the distribution of the per-sample scores of the same kernel
            (:func:`mgs_torch.sample_scores_from_kernel`: each sample's gradient energy, tr of its
            diagonal block, and its mean gradient cosine with the rest of the batch): scalars
            ``mgs/sample_energy_{median,min,max}`` and ``mgs/sample_agreement_{median,min,max}``
            and, with a ``TensorBoardLogger``, histograms ``mgs/sample_energy`` and
            ``mgs/sample_agreement``; the tensors of the last computation are in
            :attr:`last_sample_scores`. Costs O(n²) on top of the kernel.
        prog_bar: show values on the progress bar: ``False`` (default), ``True`` (every logged
            key), or a selection of metric names (``"trace"``; epoch values with ``"trace_epoch"``)
            or full keys (``"mgs/trace_epoch"``).
        spectrum_threads: CPU threads for the eigen-decomposition (``torch.set_num_threads`` for its
            duration only, restored after); ``None`` keeps torch's setting. Default 1: LAPACK's
            threaded symmetric eigensolver was measured 20–1000× slower than the serial one when
            the cores are shared with other processes (N = 1280 and 320 on 2 busy cores, e.g. 3.7 s
            against 7 ms at N = 320; the figure :func:`mgs_torch.mgs_metrics` quotes too), and serial
            is fast up to N of a few thousand.

    Behaviour:
        * Every logged value is also a callback metric (``trainer.callback_metrics["mgs/trace"]``,
          ``["mgs/trace_epoch"]``) on **every rank**, so ``EarlyStopping(monitor="mgs/trace_epoch")``
          and ``ModelCheckpoint(monitor=...)`` work with it (they run after this callback at epoch
          end). Under DDP the kernel is computed on global rank 0 only and its values are broadcast
          to the other ranks (one small collective per logged step), so all ranks agree and stop
          together; loggers write once, on rank 0. Logged rows carry ``epoch`` like Lightning's own.
        * Never changes training: parameters, gradients, buffers, train/eval flags and the
          global random states (torch, Python, NumPy) are as they were after every computation,
          and drawing the probe does not touch the Trainer's data loaders.
        * Needs a logger: ``Trainer(logger=False)`` raises :class:`MGSConfigurationError` (a
          ``MisconfigurationException``) when fitting starts.
        * A value that cannot be computed does not stop training: the exception is caught, a
          warning is issued once per kind of error, and NaN is logged for that step. A singular K
          is not an error: ``logdet = -inf`` is logged.
        * The values are also kept in :attr:`history` (a list of dicts with ``step``, ``epoch``,
          ``stage`` ("step"/"epoch"), the metrics and rank 0's ``seconds``; the same on every rank;
          saved in checkpoints, so a resumed run's history holds the records from before the resume)
          and :attr:`last_metrics`; :attr:`computations` counts the kernels this process computed;
          :meth:`compute` gives the metrics of the current weights on demand.

    Cost per logged step (structured engine): one forward and one backward at batch q·n, the Gram
    products (≈ N²·p) and an N×N eigen-decomposition (N³/3 flops, float64 on the CPU).

    Raises:
        MGSConfigurationError: an invalid argument (at construction); no logger, a ``module``
            name the LightningModule lacks, or ``probe="train"``/``"val"`` without such data
            (when fitting starts).
        TypeError: ``inputs_fn``/``targets_fn`` not callable, ``dtype`` not a floating dtype,
            ``module``/``prefix`` not strings.
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        log_on_epoch_end: bool = False,
        max_overhead: float | None = None,
        probe: str = "current",
        max_samples: int | None = None,
        metrics: Sequence[str] | str = DEFAULT_METRICS,
        prefix: str = "mgs/",
        model_mode: str = "train",
        batch_norm: str = "eval",
        outputs: str = "full",
        params: ParamFilter = None,
        strategy: str = "auto",
        chunk_size: int | None = None,
        dtype: torch.dtype | str | None = torch.float64,
        jitter: float = 0.0,
        log_spectrum: bool = False,
        log_kernel_image: bool = False,
        inputs_fn: Callable[[Any], Inputs] | None = None,
        targets_fn: Callable[[Any], Tensor | None] | None = None,
        module: str | None = None,
        seed: int = 0,
        spectrum_threads: int | None = 1,
        prog_bar: bool | Sequence[str] = False,
        log_sample_scores: bool = False,
        logits: OutputSelector = None,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, minimum=0, allow_none=True)
        if max_overhead is not None:
            check_float("max_overhead", max_overhead, minimum=0.0)
            if not 0.0 < max_overhead <= 1.0:
                raise MGSConfigurationError(
                    f"max_overhead is the monitor's largest share of the training time, in (0, 1] (e.g. 0.05 for 5 %), "
                    f"got {max_overhead!r}; None computes every scheduled step"
                )
        check_choice("probe", probe, PROBES)
        check_int("max_samples", max_samples, minimum=1, allow_none=True)
        with configuration_errors():
            metrics = select_metrics(metrics, METRIC_NAMES)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        check_choice("model_mode", model_mode, MODEL_MODES)
        with configuration_errors():  # the kernel's own options, validated where the core validates them
            kernel_options = KernelOptions(outputs, params, strategy, chunk_size, dtype, batch_norm)
        check_float("jitter", jitter, minimum=0.0)
        for name, fn in (("inputs_fn", inputs_fn), ("targets_fn", targets_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable batch -> tensor(s) or None, got {type(fn).__name__}")
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be the attribute name of a submodule (a str) or None, got {type(module).__name__}")
        check_selector(logits)
        check_int("seed", seed, minimum=0)
        check_int("spectrum_threads", spectrum_threads, minimum=1, allow_none=True)
        if not isinstance(log_sample_scores, bool):
            raise TypeError(f"log_sample_scores must be True or False, got {log_sample_scores!r}")
        self.log_sample_scores = log_sample_scores
        prog_bar_keys = self._prog_bar_keys(prog_bar, metrics + (SAMPLE_SCORE_NAMES if log_sample_scores else ()), prefix)

        self.log_every_n_steps = log_every_n_steps
        self.log_on_epoch_end = bool(log_on_epoch_end)
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.probe = probe
        self.max_samples = max_samples
        self.metrics = metrics
        self.prefix = prefix
        self.model_mode = model_mode
        #: the options of every kernel this callback computes (``dtype`` is resolved per call, see above)
        self.kernel_options = kernel_options
        self.dtype = kernel_options.dtype
        self.jitter = float(jitter)
        self.log_spectrum = bool(log_spectrum)
        self.log_kernel_image = bool(log_kernel_image)
        self.inputs_fn = inputs_fn
        self.targets_fn = targets_fn
        self.module = module
        self.logits = logits
        self.seed = seed
        self.spectrum_threads = spectrum_threads
        #: the full keys shown on the progress bar
        self.prog_bar_keys: frozenset[str] = prog_bar_keys
        #: kernels computed by this process (0 on DDP ranks other than 0)
        self.computations: int = 0
        #: scheduled steps skipped to keep within ``max_overhead`` (every rank)
        self.skipped_steps: int = 0
        self._clock: Callable[[], float] = time.perf_counter
        self._fit_started: float = 0.0  # set by on_train_start, which Lightning runs before any batch
        self._own_seconds: float = 0.0  # rank 0's kernel seconds in this fit (broadcast: the same on every rank)
        self._last_cost: float = 0.0

        #: every logged record: {"step", "epoch", "stage", prefix+name: value, ...} (every rank)
        self.history: list[dict[str, float]] = []
        #: the last logged record (or None)
        self.last_metrics: dict[str, float] | None = None
        self._probe_inputs: Inputs | None = None
        self._probe_targets: Tensor | None = None
        self._last_step: int = -1
        self._last_epoch: int = -1
        self._last_batch: Any = None
        #: the per-sample scores of the last kernel (``log_sample_scores=True``, rank 0), or None
        self.last_sample_scores: SampleScores | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------
    # Lightning plumbing

    @staticmethod
    def _prog_bar_keys(prog_bar: Any, metrics: tuple[str, ...], prefix: str) -> frozenset[str]:
        keys = {f"{prefix}{m}{suffix}" for m in metrics for suffix in ("", "_epoch")}
        if isinstance(prog_bar, bool):
            return frozenset(keys) if prog_bar else frozenset()
        if isinstance(prog_bar, str) or not isinstance(prog_bar, Sequence):
            raise MGSConfigurationError(
                f"prog_bar must be True/False or a list of metric names such as ['trace', 'trace_epoch'], got {prog_bar!r}"
            )
        chosen = set()
        for name in prog_bar:
            key = name if isinstance(name, str) and name.startswith(prefix) and name in keys else f"{prefix}{name}"
            if key not in keys:
                raise MGSConfigurationError(
                    f"prog_bar names {name!r}, which is not logged; choose from the logged metrics {metrics} "
                    f"(with '_epoch' for epoch values) or their keys, e.g. {prefix}{metrics[0]}"
                )
            chosen.add(key)
        return frozenset(chosen)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probe=self.probe, prefix=self.prefix)

    @property
    def probe_inputs(self) -> Inputs | None:
        """The fixed probe batch's inputs (CPU tensors; a tuple, or a mapping of keyword inputs), once drawn;
        ``None`` with ``probe="current"``."""
        return self._probe_inputs

    @property
    def probe_targets(self) -> Tensor | None:
        """The fixed probe batch's targets (CPU), when the batch has them."""
        return self._probe_targets

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MGSConfigurationError(
                "Cannot use MGSMonitor with a Trainer that has no logger (Trainer(logger=False)): pass a logger, "
                "e.g. Trainer(logger=TensorBoardLogger('lightning_logs')), or remove the callback"
            )
        if self.module is not None:
            self._module(pl_module)  # a wrong attribute name fails now, not as NaN metrics later
        if (self.log_spectrum or self.log_kernel_image) and not self._tensorboard_loggers(trainer):
            self._warn_once(
                "MGSMonitor-no-tensorboard",
                "MGSMonitor(log_spectrum/log_kernel_image=True) needs a TensorBoardLogger; histograms and images "
                "are skipped with the Trainer's loggers",
            )
        if self._interval(trainer) == 0 and not self.log_on_epoch_end:
            self._warn_once(
                "MGSMonitor-nothing",
                "MGSMonitor logs nothing: the step interval is 0 (log_every_n_steps) and log_on_epoch_end=False",
            )

    def _warn_once(self, key: str, message: str) -> None:
        """``rank_zero_warn`` the first time this callback meets ``key`` (never once per step)."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._fit_started, self._own_seconds = self._clock(), 0.0  # the budget is a share of this fit's time
        # every rank draws the same probe (cheap, and a missing data set fails on all ranks alike)
        if self.probe != "current" and self._probe_inputs is None:
            self._draw_probe(trainer, pl_module)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.probe == "current" and self.log_on_epoch_end:
            self._last_batch = batch
        interval = self._interval(trainer)
        step = self._step(trainer)
        if interval == 0 or (step + 1) % interval != 0 or step == self._last_step:
            return
        self._last_step = step
        if self.max_overhead is not None and not self._within_budget(trainer, step):
            self.skipped_steps += 1
            return
        self._measure_and_log(trainer, pl_module, batch, step=step, suffix="", stage="step")

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.log_on_epoch_end or trainer.current_epoch == self._last_epoch:
            return
        if self.probe == "current" and self._last_batch is None:
            return
        self._last_epoch = trainer.current_epoch
        self._measure_and_log(trainer, pl_module, self._last_batch, step=self._step(trainer), suffix="_epoch", stage="epoch")
        self._last_batch = None

    def _within_budget(self, trainer: "pl.Trainer", step: int) -> bool:
        """Whether computing this step keeps the monitor within ``max_overhead`` of the fit's time (rank 0 decides)."""
        allowed = True
        if trainer.is_global_zero:
            elapsed, cost = self._clock() - self._fit_started, self._last_cost
            allowed = self._own_seconds + cost <= self.max_overhead * (elapsed + cost)
        if trainer.world_size > 1:  # every rank must agree, or rank 0's broadcast of the values would wait forever
            allowed = bool(trainer.strategy.broadcast(allowed, src=0))
        if not allowed and "MGSMonitor-budget" not in self._warned:
            self._warned.add("MGSMonitor-budget")
            rank_zero_info(
                f"MGSMonitor(max_overhead={self.max_overhead:g}): a kernel takes {self._last_cost:.3g} s, so step {step} "
                f"and others are skipped to keep the monitor under {100 * self.max_overhead:g} % of the training time "
                f"(counted in MGSMonitor.skipped_steps); a longer log_every_n_steps or a smaller max_samples logs more "
                f"regularly"
            )
        return allowed

    def state_dict(self) -> dict[str, Any]:
        """The probe batch (CPU tensors), the schedule's position and :attr:`history`, so that a resumed run
        goes on alike and its history holds the whole run."""
        return {
            "history": [dict(record) for record in self.history],
            "probe": self.probe,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "probe_inputs": self._probe_inputs,
            "probe_targets": self._probe_targets,
            "last_step": self._last_step,
            "last_epoch": self._last_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._last_epoch = int(state_dict.get("last_epoch", -1))
        self.history = [dict(record) for record in state_dict.get("history", [])]  # older checkpoints have none
        self.last_metrics = self.history[-1] if self.history else None
        same_probe = (state_dict.get("probe"), state_dict.get("max_samples"), state_dict.get("seed")) == (
            self.probe, self.max_samples, self.seed
        )
        if same_probe:
            self._probe_inputs = state_dict.get("probe_inputs")
            self._probe_targets = state_dict.get("probe_targets")
        elif state_dict.get("probe_inputs") is not None:
            self._warn_once(
                "MGSMonitor-probe-changed",
                "MGSMonitor: the checkpoint's probe was drawn with other settings (probe, max_samples, seed); "
                "a new probe batch is drawn, so its curves do not continue the checkpoint's",
            )

    # ------------------------------------------------------------------------------------------
    # the work

    def _interval(self, trainer: "pl.Trainer") -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    @staticmethod
    def _step(trainer: "pl.Trainer") -> int:
        """The step Lightning logs training metrics at (optimiser steps taken so far)."""
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        return int(getattr(loop, "_batches_that_stepped", trainer.global_step))

    @staticmethod
    def _tensorboard_loggers(trainer: "pl.Trainer") -> list:
        return [lg for lg in trainer.loggers if isinstance(lg, pl.loggers.TensorBoardLogger)]

    def _module(self, pl_module: "pl.LightningModule") -> nn.Module:
        if self.module is not None:
            sub = getattr(pl_module, self.module, None)
            if not isinstance(sub, nn.Module):
                raise MGSConfigurationError(
                    f"MGSMonitor(module={self.module!r}): {type(pl_module).__name__} has no submodule of that name"
                )
            return sub
        getter = getattr(pl_module, "mgs_module", None)
        return getter() if callable(getter) else pl_module

    def _inputs_of(self, pl_module: "pl.LightningModule", batch: Any) -> Inputs:
        if self.inputs_fn is not None:
            return self.inputs_fn(batch)
        getter = getattr(pl_module, "mgs_inputs", None)
        return getter(batch) if callable(getter) else default_inputs(batch)

    def _targets_of(self, batch: Any) -> Tensor | None:
        return self.targets_fn(batch) if self.targets_fn is not None else default_targets(batch)

    def _draw_probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``max_samples`` samples of the train/val data set, drawn without touching the loaders."""
        batch, size = draw_probe_batch(trainer, self.probe, self.max_samples, self.seed)
        inputs = cap_samples(self._inputs_of(pl_module, batch), size)
        targets = self._targets_of(batch)
        inputs = map_tensors(inputs, lambda x: x.detach().cpu())
        self._probe_inputs = (inputs,) if isinstance(inputs, Tensor) else inputs
        self._probe_targets = targets[:size].detach().cpu() if isinstance(targets, Tensor) else None

    def _batch_inputs(self, pl_module: "pl.LightningModule", batch: Any) -> tuple[Inputs, Tensor | None]:
        if self.probe != "current":
            if self._probe_inputs is None:
                raise RuntimeError("the probe batch was not drawn (on_train_start did not run)")
            device = next(iter(pl_module.parameters()), torch.empty(0)).device
            inputs = map_tensors(self._probe_inputs, lambda x: x.to(device))
            return inputs, self._probe_targets
        inputs = cap_samples(self._inputs_of(pl_module, batch), self.max_samples)
        targets = self._targets_of(batch) if "alignment" in self.metrics else None
        if isinstance(targets, Tensor) and self.max_samples is not None:
            targets = targets[: self.max_samples]
        return inputs, targets

    def compute(self, pl_module: "pl.LightningModule", batch: Any = None) -> MGSMetrics:
        """The metrics of the current weights on ``batch`` (the probe batch when it is fixed).

        Leaves the module as it was. Raises what the core raises (e.g. ``ValueError`` for non-finite
        outputs); the Trainer hooks catch it and log NaN instead.
        """
        return self._kernel_and_metrics(pl_module, batch)[1]

    def _kernel_and_metrics(self, pl_module: "pl.LightningModule", batch: Any) -> tuple[Tensor, MGSMetrics, int]:
        """K (detached), its metrics and the number of samples it was formed on."""
        inputs, targets = self._batch_inputs(pl_module, batch)
        module = self._module(pl_module)
        dtype = compute_dtype(module, getattr(pl_module, "_trainer", None), self.dtype)
        with torch.enable_grad(), module_mode(module, self.model_mode):
            K = mgs_kernel(module, inputs, **{**self.kernel_options.as_kwargs(), "dtype": dtype}, logits=self.logits)
        want_targets = "alignment" in self.metrics and targets is not None
        metrics = mgs_metrics(K, targets=targets if want_targets else None, jitter=self.jitter, threads=self.spectrum_threads)
        n = batch_size(inputs)
        return K.detach(), metrics, n

    def _measure_and_log(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, *, step: int, suffix: str, stage: str
    ) -> None:
        result: MGSMetrics | None = None
        K: Tensor | None = None
        payload: tuple[dict[str, float], float] | None = None
        if trainer.is_global_zero:  # computed once, on rank 0
            started = self._clock()
            self.computations += 1
            try:
                K, result, n = self._kernel_and_metrics(pl_module, batch)
                values = result.as_dict()
            except _METRIC_ERRORS as err:  # never stop training for a metric
                self._warn_once(
                    f"MGSMonitor-failed-{type(err).__name__}",
                    f"MGSMonitor could not compute the MGS metrics at step {step} ({type(err).__name__}: {err}); NaN is "
                    f"logged and training continues. This warning is shown once.",
                )
                values = {}
            if "alignment" in self.metrics and result is not None and result.alignment is None:
                self._warn_once("MGSMonitor-no-targets", "MGSMonitor: 'alignment' needs targets in the batch (targets_fn); NaN is logged")
            scalars = {f"{self.prefix}{name}{suffix}": float(values.get(name, math.nan)) for name in self.metrics}
            if self.log_sample_scores:
                scalars.update(self._sample_score_scalars(K, n if K is not None else 0, suffix))
            payload = (scalars, self._clock() - started)
        if trainer.world_size > 1:  # every rank reaches this hook at the same step: all agree on rank 0's values
            payload = trainer.strategy.broadcast(payload, src=0)
        assert payload is not None
        scalars, seconds = payload
        self._own_seconds += seconds
        self._last_cost = seconds
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # Lightning's own rows carry the epoch too
                logger.log_metrics({**scalars, "epoch": trainer.current_epoch}, step=step)
            if result is not None:
                self._log_tensorboard(trainer, result, K, step, suffix)
        self._publish(pl_module, scalars, stage)
        record = {"step": step, "epoch": trainer.current_epoch, "stage": stage, **scalars, "seconds": seconds}
        self.history.append(record)
        self.last_metrics = record

    def _sample_score_scalars(self, K: Tensor | None, n: int, suffix: str) -> dict[str, float]:
        self.last_sample_scores = None
        if K is not None:
            try:
                self.last_sample_scores = sample_scores_from_kernel(K, n)
            except _METRIC_ERRORS as err:  # never stop training for a metric
                self._warn_once(f"MGSMonitor-scores-{type(err).__name__}", f"MGSMonitor could not compute the per-sample scores ({err}); NaN is logged")
        summary = self.last_sample_scores.summary() if self.last_sample_scores is not None else {}
        return {f"{self.prefix}{name}{suffix}": float(summary.get(name, math.nan)) for name in SAMPLE_SCORE_NAMES}

    def _publish(self, pl_module: "pl.LightningModule", scalars: dict[str, float], stage: str) -> None:
        """Make the values callback metrics (and progress-bar entries) on this rank; the loggers are written separately."""
        for key, value in scalars.items():
            pl_module.log(
                key, value, logger=False, prog_bar=key in self.prog_bar_keys, on_step=stage == "step",
                on_epoch=stage == "epoch", batch_size=1, sync_dist=False, rank_zero_only=False,
            )

    def _log_tensorboard(self, trainer: "pl.Trainer", result: MGSMetrics, K: Tensor | None, step: int, suffix: str) -> None:
        if not (self.log_spectrum or self.log_kernel_image or self.log_sample_scores):
            return
        for logger in self._tensorboard_loggers(trainer):
            writer = logger.experiment
            if self.log_sample_scores and self.last_sample_scores is not None:
                writer.add_histogram(f"{self.prefix}sample_energy{suffix}", self.last_sample_scores.energy, global_step=step)
                writer.add_histogram(f"{self.prefix}sample_agreement{suffix}", self.last_sample_scores.agreement, global_step=step)
            if self.log_spectrum:
                eig = result.eigenvalues
                writer.add_histogram(f"{self.prefix}eigenvalues{suffix}", eig, global_step=step)
                positive = eig[eig > 0]
                if positive.numel():
                    writer.add_histogram(f"{self.prefix}log10_eigenvalues{suffix}", positive.log10(), global_step=step)
            if self.log_kernel_image and K is not None:
                magnitude = K.double().abs().cpu()
                scale = float(magnitude.max())
                image = (magnitude / scale if scale > 0 else magnitude).float()
                writer.add_image(f"{self.prefix}kernel{suffix}", image, global_step=step, dataformats="HW")
