r"""MGS inside Hugging Face ``Trainer``: a callback that logs the metrics, a mixin that adds the penalty.

>>> trainer = MGSTrainer(model=model, args=args, train_dataset=train, mgs_alpha=1e-3,
...                      callbacks=[MGSTrainerCallback(max_samples=16)])
>>> trainer.train()   # trainer.state.log_history holds mgs/trace, mgs/logdet, …, mgs/penalty

Both read the batches as ``Trainer`` gives them to the model (the collator's dict), without the label
columns (``trainer.label_names``), and the model's ``ModelOutput`` through ``logits=``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, Iterator

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("mgs_torch.hf needs Hugging Face transformers: pip install 'mgs-torch[hf]'") from err

from .._io import OutputSelector, check_selector, map_tensors, take_samples
from .._validation import ParamFilter, functional_model, select_metrics
from ..kernel import mgs_kernel
from ..metrics import MGSMetrics, mgs_metrics
from ..options import KernelOptions, PenaltyOptions, check_choice, check_float, check_int
from ..penalty import mgs_penalty

__all__ = ["MGSTrainerCallback", "MGSTrainerMixin", "MGSTrainer", "METRIC_NAMES", "DEFAULT_METRICS"]

#: every scalar :class:`~mgs_torch.MGSMetrics` field the callback can log
METRIC_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MGSMetrics) if f.name not in ("eigenvalues", "jitter"))
#: what the callback logs unless ``metrics=`` says otherwise
DEFAULT_METRICS: tuple[str, ...] = ("trace", "logdet", "trace_per_row", "logdet_per_row", "rank")
MODEL_MODES: tuple[str, ...] = ("eval", "train")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# what a metric computation may raise (bad outputs, linear algebra, memory): logged as NaN with a warning
_METRIC_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError)


@contextlib.contextmanager
def plain_forward(model: nn.Module) -> Iterator[nn.Module]:
    """The module MGS differentiates (data-parallel wrappers removed), with the forward it was written with.

    Under ``bf16``/``fp16`` the Trainer (through accelerate) replaces the model's ``forward`` by one that
    runs under ``torch.autocast`` and keeps the original as ``_original_forward``. mgs_torch computes with
    autocast off, but a forward that enters autocast itself would compute K in half precision; for this
    block the original forward is put back (and the wrapper restored after).
    """
    module = functional_model(model)
    wrapped, original = module.__dict__.get("forward"), module.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield module
        return
    module.forward = original
    try:
        yield module
    finally:
        module.forward = wrapped


def model_inputs(batch: Any, label_names: Sequence[str]) -> Any:
    """A Trainer batch as the model's keyword inputs for MGS: the mapping without its label columns."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in label_names}
    return batch


def compute_dtype(model: nn.Module, args: Any, requested: torch.dtype | None) -> torch.dtype | None:
    """``requested``; else float32 under ``bf16``/``fp16`` training or with half/bfloat16 parameters; else None."""
    if requested is not None:
        return requested
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if dtypes & set(_LOW_PRECISION) or getattr(args, "bf16", False) or getattr(args, "fp16", False):
        return torch.float32
    return None


def _strategy(args: Any) -> str:
    """``args.logging_strategy`` as its value ("steps", "epoch", "no")."""
    return str(getattr(args.logging_strategy, "value", args.logging_strategy))


class MGSTrainerCallback(TrainerCallback):
    r"""Log the MGS metrics of a fixed probe batch into ``Trainer``'s own logs.

    Every ``logging_steps`` optimiser steps (the Trainer's ``args.logging_steps`` by default, with
    ``logging_strategy="steps"``; at each epoch's end with ``"epoch"``) the kernel K = J Jᵀ of the probe
    batch X (n samples, q raw outputs each; J = ∂f(X)/∂θ) at the weights after that step is computed and
    passed to ``trainer.log``, so the values land in ``trainer.state.log_history`` and in every
    ``report_to`` integration (TensorBoard, W&B, …), keys ``prefix + name``::

        mgs/trace   tr K          mgs/logdet   log det K (-inf when singular)     mgs/rank   numerical rank
        mgs/trace_per_row, mgs/logdet_per_row   divided by N = n·q rows

    (any scalar field of :class:`mgs_torch.MGSMetrics` with ``metrics=``; ``"all"`` for every one).

    The callback needs the Trainer to write into its logs: :class:`MGSTrainer` (or :class:`MGSTrainerMixin`)
    binds it when it is passed in ``callbacks=``; with a plain ``Trainer`` use
    ``trainer.add_callback(MGSTrainerCallback(trainer, ...))``.

    Args:
        trainer: the Trainer to log into (or ``None`` when a :class:`MGSTrainer` binds it).
        probe: the probe batch (the collator's dict, a tensor or a tuple); default: ``max_samples`` samples
            (default: ``per_device_train_batch_size``) of the training set chosen with ``seed`` and collated
            with the training loader's ``collate_fn`` when training starts. Label columns are left out.
        max_samples: cap on the probe's samples. Cost: N²·p for K and N³ for the spectrum, N = n·q.
        logging_steps: step interval; ``None``: the Trainer's logging schedule.
        metrics, prefix: what is logged and under which key prefix (``"mgs/"``).
        model_mode: ``"eval"`` (default: Dropout off, so K is a function of the weights) or ``"train"``.
        logits: where the raw outputs are in what the model returns (``.logits`` by default; see
            :func:`mgs_torch.mgs_kernel`; :mod:`mgs_torch.hf.language` for language models).
        params, outputs, strategy, chunk_size, batch_norm: as in :func:`mgs_torch.mgs_kernel`.
        dtype: of K; default ``torch.float64`` (a float32 K's log det is often −∞ for rounding alone);
            ``None``: float32 under ``bf16``/``fp16`` training, else the parameters' dtype.
        jitter: ε added to K's diagonal before its spectrum (see :func:`mgs_torch.mgs_metrics`).
        seed: seed of the probe's random subset.

    Under multi-process training the kernel is computed and logged by the main process only (as
    Trainer's reporters log), on its copy of the probe; the model is left exactly as it was (weights,
    ``.grad``, modes, the random state).
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        *,
        probe: Any = None,
        max_samples: int | None = None,
        logging_steps: int | None = None,
        metrics: Sequence[str] | str = DEFAULT_METRICS,
        prefix: str = "mgs/",
        model_mode: str = "eval",
        logits: OutputSelector = None,
        params: ParamFilter = None,
        outputs: str = "full",
        strategy: str = "auto",
        chunk_size: int | None = None,
        batch_norm: str = "eval",
        dtype: torch.dtype | str | None = torch.float64,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        if trainer is not None and not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer or None, got {type(trainer).__name__}")
        check_int("max_samples", max_samples, minimum=1, allow_none=True)
        check_int("logging_steps", logging_steps, minimum=1, allow_none=True)
        check_int("seed", seed, minimum=0)
        metrics = select_metrics(metrics, METRIC_NAMES)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        check_choice("model_mode", model_mode, MODEL_MODES)
        check_selector(logits)
        check_float("jitter", jitter, minimum=0.0)
        #: the options of every kernel this callback computes
        self.kernel_options = KernelOptions(outputs, params, strategy, chunk_size, dtype, batch_norm)
        self.trainer = trainer
        self.probe, self.max_samples, self.logging_steps = probe, max_samples, logging_steps
        self.metrics, self.prefix, self.model_mode, self.logits = metrics, prefix, model_mode, logits
        self.jitter, self.seed = float(jitter), seed
        #: every record logged: {"step": s, prefix + name: value, ...}
        self.history: list[dict[str, float]] = []
        #: the last record logged, or None
        self.last_metrics: dict[str, float] | None = None
        self._probe_inputs: Any = None
        self._warned: set[str] = set()

    def bind(self, trainer: Trainer) -> "MGSTrainerCallback":
        """Log into ``trainer`` (what :class:`MGSTrainerMixin` does for the callbacks it is given)."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() takes a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        return self

    @property
    def probe_inputs(self) -> Any:
        """The probe batch's model inputs (CPU tensors, labels left out), once drawn."""
        return self._probe_inputs

    # ------------------------------------------------------------------------------------------
    # TrainerCallback events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.trainer is None:
            raise ValueError(
                "MGSTrainerCallback needs the Trainer it logs into: pass it to MGSTrainer(callbacks=[...]) (which binds "
                "it), or add it to a plain Trainer with trainer.add_callback(MGSTrainerCallback(trainer, ...))"
            )
        if self._probe_inputs is None:
            batch = self.probe if self.probe is not None else self._draw(args, train_dataloader)
            inputs = take_samples(model_inputs(batch, self.trainer.label_names), self.max_samples)
            self._probe_inputs = map_tensors(inputs, lambda t: t.detach().cpu())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.logging_steps or (state.logging_steps if _strategy(args) == "steps" else None)
        first = state.global_step == 1 and args.logging_first_step and self.logging_steps is None
        if every and (state.global_step % every == 0 or first):
            self._log(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.logging_steps is None and _strategy(args) == "epoch":
            self._log(args, state, control, model)

    # ------------------------------------------------------------------------------------------

    def compute(self, model: nn.Module, args: Any = None) -> MGSMetrics:
        """The metrics of ``model``'s current weights on the probe batch (leaves the model as it was)."""
        if self._probe_inputs is None:
            raise RuntimeError("the probe batch is not drawn yet (on_train_begin has not run)")
        with plain_forward(model) as module:
            device = next(iter(module.parameters())).device
            inputs = map_tensors(self._probe_inputs, lambda t: t.to(device))
            options = self.kernel_options.as_kwargs()
            options["dtype"] = compute_dtype(module, args, options["dtype"])
            flags = [(m, m.training) for m in module.modules()]
            try:
                if self.model_mode == "eval":
                    module.eval()
                with torch.enable_grad():
                    K = mgs_kernel(module, inputs, logits=self.logits, **options)
            finally:
                for m, flag in flags:
                    m.training = flag
        return mgs_metrics(K.detach(), jitter=self.jitter)

    def _draw(self, args: Any, loader: Any) -> Any:
        """``max_samples`` samples of the training set chosen with ``seed``, collated like the loader's batches."""
        dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
        if dataset is None or collate is None or isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "MGSTrainerCallback could not draw a probe batch from the training data (no map-style dataset with a "
                "collate_fn); pass probe= a batch such as next(iter(trainer.get_train_dataloader()))"
            )
        size = min(self.max_samples or args.per_device_train_batch_size, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:size].tolist()
        return collate([dataset[i] for i in order])

    def _log(self, args: Any, state: Any, control: Any, model: nn.Module | None) -> None:
        if not state.is_world_process_zero or model is None or self.trainer is None:
            return
        try:
            values = self.compute(model, args).as_dict(self.prefix)
        except _METRIC_ERRORS as err:  # never stop training for a metric
            key = type(err).__name__
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"MGSTrainerCallback could not compute the MGS metrics at step {state.global_step} ({key}: {err}); "
                    f"NaN is logged and training continues. This warning is shown once.",
                    stacklevel=2,
                )
            values = {}
        record = {f"{self.prefix}{m}": values.get(f"{self.prefix}{m}", math.nan) for m in self.metrics}
        should_log = control.should_log
        self.trainer.log(dict(record))  # its on_log clears should_log: the Trainer's own log of this step must still come
        control.should_log = self.trainer.control.should_log = should_log
        self.last_metrics = {"step": state.global_step, **record}
        self.history.append(self.last_metrics)


class MGSTrainerMixin:
    r"""Adds the MGS penalty α·g(K) to ``Trainer.compute_loss`` (list it before ``Trainer``:
    ``class MyTrainer(MGSTrainerMixin, Trainer)``; or use :class:`MGSTrainer`).

    On each training micro-batch X (the batch without its label columns; n samples, q raw outputs each,
    K = J Jᵀ, J = ∂f(X)/∂θ) the loss becomes ``loss + α · g(K) / c`` with g = tr K / N or log det K / N
    (N = n·q, ``mgs_reduction="mean"``), differentiated by double backward (:func:`mgs_torch.mgs_penalty`).
    Evaluation losses are left alone.

    **Gradient accumulation.** An optimiser step's penalty is the mean of g over its A micro-batches:
    when ``Trainer.training_step`` divides the loss by A (``loss_is_scaled_for_ga`` false) c = 1; when it
    does not (the loss was normalised by ``num_items_in_batch``: the model accepts loss kwargs, or a
    ``compute_loss_func``), c = A. Under DDP (``accelerate``) each process adds the penalty of its own
    micro-batch and the gradients are averaged as usual: the step's penalty is the mean over processes.

    **Mixed precision** (``bf16``/``fp16``): K is computed in float32 without autocast (the forward
    accelerate wrapped in autocast is unwrapped for the computation; ``mgs_dtype`` overrides).

    **Logs.** ``mgs/penalty`` (g averaged over the micro-batches since the last log and over processes)
    and ``mgs/alpha`` join the Trainer's training log rows (``loss``, ``learning_rate``, …).

    Args:
        mgs_alpha: α ≥ 0 (0 computes nothing; a negative α, rewarding dissimilar gradients, is refused).
        mgs_kind: ``"trace"`` or ``"logdet"``.
        mgs_estimator, mgs_num_probes: ``"exact"`` or ``"hutchinson"`` with its Rademacher probes per sample,
            drawn from a generator seeded by (``mgs_seed``, process, step, micro-batch), never the global RNG.
        mgs_max_samples: use only the first samples of each micro-batch for K.
        mgs_logits: where the raw outputs are in the model's output (``.logits`` by default).
        mgs_reduction, mgs_outputs, mgs_params, mgs_strategy, mgs_chunk_size, mgs_batch_norm, mgs_jitter,
            mgs_dtype: as in :func:`mgs_torch.mgs_penalty`.

    Cost per micro-batch: about one extra training step at batch q·n for the exact trace (num_probes·n
    for Hutchinson); the log-determinant adds the kernel (N²·p) and a Cholesky factorisation (N³/3).
    """

    def __init__(
        self,
        *args: Any,
        mgs_alpha: float = 1e-3,
        mgs_kind: str = "trace",
        mgs_estimator: str = "exact",
        mgs_num_probes: int = 1,
        mgs_reduction: str = "mean",
        mgs_max_samples: int | None = None,
        mgs_logits: OutputSelector = None,
        mgs_outputs: str = "full",
        mgs_params: ParamFilter = None,
        mgs_strategy: str = "auto",
        mgs_chunk_size: int | None = None,
        mgs_batch_norm: str = "eval",
        mgs_jitter: float = 0.0,
        mgs_dtype: torch.dtype | str | None = None,
        mgs_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        check_float("mgs_alpha", mgs_alpha, minimum=0.0)
        check_int("mgs_max_samples", mgs_max_samples, minimum=1, allow_none=True)
        check_int("mgs_seed", mgs_seed, minimum=0)
        check_selector(mgs_logits)
        #: the penalty's options (validated once)
        self.mgs_options = PenaltyOptions(
            outputs=mgs_outputs, params=mgs_params, strategy=mgs_strategy, chunk_size=mgs_chunk_size, dtype=mgs_dtype,
            batch_norm=mgs_batch_norm, kind=mgs_kind, estimator=mgs_estimator, num_probes=mgs_num_probes,
            reduction=mgs_reduction, jitter=mgs_jitter,
        )
        self.mgs_alpha, self.mgs_max_samples, self.mgs_logits, self.mgs_seed = float(mgs_alpha), mgs_max_samples, mgs_logits, mgs_seed
        #: the last unweighted penalty g(K) (detached), or None
        self.mgs_last_penalty: Tensor | None = None
        self._mgs_sum: Tensor | None = None
        self._mgs_count = 0
        self._mgs_call = (-1, 0)
        super().__init__(*args, **kwargs)
        if not isinstance(self, Trainer):
            raise TypeError(f"MGSTrainerMixin is for transformers.Trainer: class {type(self).__name__}(MGSTrainerMixin, Trainer)")
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, MGSTrainerCallback) and callback.trainer is None:
                callback.bind(self)

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)  # type: ignore[misc]
        for added in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(added, MGSTrainerCallback) and added.trainer is None:
                added.bind(self)  # type: ignore[arg-type]

    def mgs_inputs(self, inputs: Any) -> Any:
        """The model inputs of a training batch for K: the batch without its label columns (override for others)."""
        return take_samples(model_inputs(inputs, self.label_names), self.mgs_max_samples)  # type: ignore[attr-defined]

    def mgs_compute_penalty(self, model: nn.Module, inputs: Any) -> Tensor:
        """g(K) on the batch's model inputs, differentiable (no α, no scaling, no logging)."""
        options = self.mgs_options.as_kwargs()
        with plain_forward(model) as module:
            options["dtype"] = compute_dtype(module, self.args, options["dtype"])  # type: ignore[attr-defined]
            return mgs_penalty(module, self.mgs_inputs(inputs), logits=self.mgs_logits, generator=self._mgs_generator(), **options)

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)  # type: ignore[misc]
        if self.mgs_alpha > 0 and model.training and torch.is_grad_enabled():
            penalty = self.mgs_compute_penalty(model, inputs)
            self.mgs_last_penalty = penalty.detach()
            self._mgs_sum = penalty.detach() if self._mgs_sum is None else self._mgs_sum + penalty.detach()
            self._mgs_count += 1
            scale = self.current_gradient_accumulation_steps if self._mgs_loss_is_scaled(num_items_in_batch) else 1  # type: ignore[attr-defined]
            loss = loss + (self.mgs_alpha / scale) * penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._mgs_count:
            mean = self._mgs_sum / self._mgs_count
            if self.accelerator.num_processes > 1:  # type: ignore[attr-defined]
                mean = self.accelerator.reduce(mean.to(self.args.device), reduction="mean")  # type: ignore[attr-defined]
            logs["mgs/penalty"] = float(mean)
            logs["mgs/alpha"] = self.mgs_alpha
            self._mgs_sum, self._mgs_count = None, 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _mgs_loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """Whether ``Trainer.training_step`` leaves the loss undivided by the accumulation steps (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:  # type: ignore[attr-defined]
            return bool(self.loss_is_scaled_for_ga)  # type: ignore[attr-defined]
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)  # type: ignore[attr-defined]

    def _mgs_generator(self) -> torch.Generator:
        """Hutchinson probes: seeded by (seed, process, optimiser step, micro-batch within the step)."""
        step = int(self.state.global_step)  # type: ignore[attr-defined]
        call = self._mgs_call[1] + 1 if self._mgs_call[0] == step else 0
        self._mgs_call = (step, call)
        key = f"{self.mgs_seed}/{self.args.process_index}/{step}/{call}".encode()  # type: ignore[attr-defined]
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))


class MGSTrainer(MGSTrainerMixin, Trainer):
    """``transformers.Trainer`` with the MGS penalty (:class:`MGSTrainerMixin`); binds any
    :class:`MGSTrainerCallback` passed in ``callbacks=``."""
