r"""MGSRegularizedMixin: train a LightningModule with the MGS penalty, no extra line in training_step.

>>> class Net(MGSRegularizedMixin, pl.LightningModule):
...     def __init__(self, **mgs):
...         super().__init__(**mgs)          # mgs_alpha=..., mgs_kind=..., saved in hparams
...         self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
...     def forward(self, x):
...         return self.net(x)               # raw outputs (logits)
...     def training_step(self, batch, batch_idx):
...         x, y = batch
...         return F.cross_entropy(self(x), y)   # + α·g(K) is added for you
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._io import OutputSelector, check_selector
from ..options import Inputs, ParamFilter, PenaltyOptions
from ..penalty import mgs_penalty
from ._utils import (
    MGSConfigurationError,
    cap_samples,
    check_float,
    check_int,
    configuration_errors,
    compute_dtype,
    default_inputs,
    lightning_trainer,
    pl,
    rank_zero_warn,
)

__all__ = ["MGSRegularizedMixin", "LOG_KEYS", "MGS_OPTIONS"]

#: the keys logged by the mixin (``mgs_log=True``)
LOG_KEYS = {"penalty": "train/mgs_penalty", "data_loss": "train/data_loss", "alpha": "train/mgs_alpha"}

_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing; deterministic across processes)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def _negative_alpha_message(alpha: float, what: str = "mgs_alpha is") -> str:
    return (
        f"{what} {alpha:g} < 0: a negative weight rewards dissimilar gradients, so tr K / log det K grow without "
        f"bound and training diverges. Use mgs_alpha >= 0, or pass mgs_allow_negative_alpha=True if you mean it"
    )


def _refuse_unknown_options(kwargs: dict[str, Any]) -> None:
    """An ``mgs_*`` keyword the mixin does not know is a typo: name the valid ones (Lightning's own
    ``__init__`` would only say "unexpected keyword argument")."""
    unknown = sorted(k for k in kwargs if k.startswith("mgs_"))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name[4:], [o[4:] for o in MGS_OPTIONS], n=1)  # the shared "mgs_" would match all
        hints.append(f"{name!r}" + (f" (did you mean 'mgs_{close[0]}'?)" if close else ""))
    raise TypeError(
        f"MGSRegularizedMixin got the unknown option(s) {', '.join(hints)}. Its options are: {', '.join(MGS_OPTIONS)}"
    )


def _given_to_subclass_inits(obj: Any) -> dict[str, Any]:
    """The ``mgs_*`` values held by the ``__init__`` frames of ``obj``'s classes that led to the mixin's
    ``__init__`` (their parameters and ``**kwargs``), the one nearest the mixin first: what the subclasses
    were given, to compare with what reached the mixin."""
    frame = inspect.currentframe()
    frame = frame.f_back.f_back if frame is not None and frame.f_back is not None else None  # skip the mixin's
    given: dict[str, Any] = {}
    while frame is not None and frame.f_code.co_name == "__init__":
        code, local = frame.f_code, frame.f_locals
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if not names or local.get(names[0]) is not obj:
            break
        values = {name: local[name] for name in names[1:] if name.startswith("mgs_") and name in local}
        if code.co_flags & inspect.CO_VARKEYWORDS:
            extra = local.get(code.co_varnames[len(names) + bool(code.co_flags & inspect.CO_VARARGS)])
            if isinstance(extra, Mapping):
                values.update({k: v for k, v in extra.items() if isinstance(k, str) and k.startswith("mgs_")})
        for name, value in values.items():
            given.setdefault(name, value)
        frame = frame.f_back
    return given


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors, modules: only identity counts
        return False


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``training_step`` returning (data loss + α·g(K)) in place of the data loss, in automatic optimisation."""

    @functools.wraps(step)
    def training_step(self: "MGSRegularizedMixin", *args: Any, **kwargs: Any) -> Any:
        # an overriding training_step that calls super().training_step must not add the penalty twice
        if getattr(self, "_mgs_depth", 0) > 0 or not self.automatic_optimization:
            return step(self, *args, **kwargs)
        self._mgs_depth = 1
        try:
            out = step(self, *args, **kwargs)
        finally:
            self._mgs_depth = 0
        batch = args[0] if args else kwargs.get("batch")
        return self._mgs_add_penalty(out, batch)

    training_step.__signature__ = inspect.signature(step)  # type: ignore[attr-defined]
    training_step._mgs_wrapped = True  # type: ignore[attr-defined]
    return training_step


class MGSRegularizedMixin:
    r"""Adds the MGS penalty α·g(K) to the loss of a LightningModule's ``training_step``.

    Use it first among the bases: ``class Net(MGSRegularizedMixin, pl.LightningModule)``, and pass
    the ``mgs_*`` keyword arguments through ``super().__init__(...)``. They are saved in
    ``self.hparams`` (merged with the model's own :meth:`save_hyperparameters`, whose values win for
    the arguments it captures). ``mgs_dtype`` is saved by name; an ``mgs_params`` filter that is not
    a list of names (a callable, modules) is saved as ``None`` — pass it again to ``load_from_checkpoint``.

    **What is added.** On the inputs X (n samples, q raw outputs each) of the training batch,
    K = J Jᵀ with J = ∂f_θ(X)/∂θ, and the loss returned to Lightning is

    .. math:: \mathcal{L} = \mathcal{L}_\text{data} + \alpha_t\, g(K),\qquad
              g = \operatorname{tr} K / N \ \text{or}\ \log\det K / N \quad (N = nq,\ \text{reduction="mean"}),

    differentiated by double backward (see :func:`mgs_torch.mgs_penalty`). ``α_t`` is
    ``mgs_alpha`` once the warm-up is over and 0 before (then nothing is computed).

    **Automatic optimisation.** ``training_step`` may return a tensor or a dict with ``"loss"``;
    the penalty is added to that loss with no extra line (``None`` — a skipped step — is left
    alone). Lightning then divides the total by ``accumulate_grad_batches``, so the penalty is
    scaled exactly like the data loss under gradient accumulation; gradient clipping sees the
    total gradient. Logged every step: ``train/data_loss`` (the loss your step returned),
    ``train/mgs_penalty`` (g, unweighted, only when computed) and ``train/mgs_alpha`` (α_t).

    **Manual optimisation** (``self.automatic_optimization = False``): nothing is added; call
    :meth:`mgs_regularization` in ``training_step`` yourself::

        loss = data_loss + self.mgs_regularization(batch)   # α_t·g(K), zero during warm-up
        self.manual_backward(loss)

    **Inputs and model.** The kernel is taken on ``mgs_inputs(batch)`` (default: the first element
    of a tuple/list batch, the batch itself if it is a tensor, ``batch["x"]`` for dicts, or a dict's
    tensors other than its targets as keyword inputs, e.g. a tokenizer's dict) through
    ``mgs_module()`` (default: ``self``, whose ``forward`` must return the raw outputs);
    override either. The model is used in its current (training) mode: Dropout stays active;
    BatchNorm follows ``mgs_batch_norm``. Parameters, buffers and the global RNG are untouched.

    **DDP.** Each rank computes the penalty on its local batch inside its own ``training_step``;
    DDP averages the gradients as usual. The logged values are rank 0's (``self.log`` without
    ``sync_dist``).

    **Precision.** Under ``*-mixed`` precision (e.g. ``bf16-mixed`` on the CPU) or with half /
    bfloat16 parameters, the kernel is computed in float32 without autocast (``mgs_dtype`` overrides).

    **Hutchinson probes** (``mgs_estimator="hutchinson"``) are drawn from a generator owned by the
    module, never from the global RNG, re-seeded for each batch from (``mgs_seed``, global rank,
    number of batches trained, call number within the batch): a seeded run is reproducible, a run
    resumed from a checkpoint draws the probes the uninterrupted run would have, and DDP ranks draw
    independent probes.

    Args:
        mgs_kind: ``"trace"`` or ``"logdet"`` (g above).
        mgs_alpha: α, the penalty's weight (a finite float ≥ 0; 0 disables the penalty). **Default
            1e-3** with ``reduction="mean"`` (the README's "Choosing α" says how to choose it). A negative α
            is refused unless ``mgs_allow_negative_alpha=True``.
        mgs_estimator: ``"exact"`` or ``"hutchinson"`` (trace only; unbiased, cheaper by ≈ q/num_probes).
        mgs_num_probes: Rademacher probes per sample for Hutchinson.
        mgs_reduction: ``"mean"`` (g/N, default: α transfers across batch sizes) or ``"sum"`` (g).
        mgs_warmup_steps: no penalty while ``trainer.global_step < mgs_warmup_steps`` (optimiser steps).
        mgs_warmup_epochs: no penalty while ``trainer.current_epoch < mgs_warmup_epochs``.
        mgs_max_samples: use only the first ``mgs_max_samples`` samples of each batch for the kernel.
        mgs_batch_norm, mgs_outputs, mgs_params, mgs_strategy, mgs_chunk_size, mgs_jitter: as
            ``batch_norm``, ``outputs``, ``params``, ``strategy``, ``chunk_size``, ``jitter`` of
            :func:`mgs_torch.mgs_penalty`.
        mgs_dtype: compute dtype (a ``torch.dtype`` or its name, e.g. ``"float64"``); default: see Precision.
        mgs_seed: seed of the Hutchinson probes.
        mgs_log: log the three values above.
        mgs_allow_negative_alpha: accept α < 0 (rewarding dissimilar gradients; diverges in general).
        mgs_logits: where the raw outputs are in what ``mgs_module()`` returns (a ``ModelOutput``'s
            ``.logits`` by default; a key, index or callable), as ``logits`` of :func:`mgs_torch.mgs_penalty`.

    Every ``mgs_*`` keyword must be one of these: a misspelled one (``mgs_alhpa``) raises a
    ``TypeError`` that names the valid options. A subclass whose ``__init__`` was given ``mgs_*``
    options but did not pass them on to ``super().__init__`` (so the mixin trains with other values,
    e.g. the default α) gets a warning when training starts, naming the options that were dropped.

    Raises:
        MGSConfigurationError: (a ``ValueError`` and a ``MisconfigurationException``) for an invalid value.
        TypeError: wrong types, an unknown ``mgs_*`` option, the mixin listed after LightningModule, or
            used without one.

    Cost per step: about one extra training step at batch q·n for the exact trace (num_probes·n
    for Hutchinson); the log-determinant adds the kernel (N²·p) and a Cholesky factorisation (N³/3).
    """

    #: the last unweighted penalty g(K) computed (detached), or None
    mgs_last_penalty: Tensor | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if pl.LightningModule in mro and mro.index(MGSRegularizedMixin) > mro.index(pl.LightningModule):
            raise TypeError(
                f"{cls.__name__}: list MGSRegularizedMixin before LightningModule, "
                f"e.g. class {cls.__name__}(MGSRegularizedMixin, LightningModule)"
            )
        step = getattr(cls, "training_step", None)
        if step is None or getattr(step, "_mgs_wrapped", False) or step is getattr(pl.LightningModule, "training_step", None):
            return
        cls.training_step = _wrap_training_step(step)  # type: ignore[attr-defined]

    def __init__(
        self,
        *args: Any,
        mgs_kind: str = "trace",
        mgs_alpha: float = 1e-3,
        mgs_estimator: str = "exact",
        mgs_num_probes: int = 1,
        mgs_reduction: str = "mean",
        mgs_warmup_steps: int = 0,
        mgs_warmup_epochs: int = 0,
        mgs_max_samples: int | None = None,
        mgs_batch_norm: str = "eval",
        mgs_outputs: str = "full",
        mgs_params: ParamFilter = None,
        mgs_strategy: str = "auto",
        mgs_chunk_size: int | None = None,
        mgs_jitter: float = 0.0,
        mgs_dtype: torch.dtype | str | None = None,
        mgs_seed: int = 0,
        mgs_log: bool = True,
        mgs_allow_negative_alpha: bool = False,
        mgs_logits: OutputSelector = None,
        **kwargs: Any,
    ) -> None:
        received = {k: v for k, v in locals().items() if k.startswith("mgs_")}  # first: the arguments as given
        _refuse_unknown_options(kwargs)
        super().__init__(*args, **kwargs)
        if not isinstance(self, pl.LightningModule):
            raise TypeError(
                f"MGSRegularizedMixin is for LightningModules: class {type(self).__name__}(MGSRegularizedMixin, LightningModule)"
            )
        check_float("mgs_alpha", mgs_alpha)
        if not isinstance(mgs_allow_negative_alpha, bool):
            raise TypeError(f"mgs_allow_negative_alpha must be True or False, got {mgs_allow_negative_alpha!r}")
        if mgs_alpha < 0 and not mgs_allow_negative_alpha:
            raise MGSConfigurationError(_negative_alpha_message(mgs_alpha))
        with configuration_errors(prefix="mgs_"):  # the penalty's options, validated where the core validates them
            #: the penalty's options (kind, estimator, …); also readable as ``self.mgs_<field>``
            self.mgs_options = PenaltyOptions(
                outputs=mgs_outputs, params=mgs_params, strategy=mgs_strategy, chunk_size=mgs_chunk_size,
                dtype=mgs_dtype, batch_norm=mgs_batch_norm, kind=mgs_kind, estimator=mgs_estimator,
                num_probes=mgs_num_probes, reduction=mgs_reduction, jitter=mgs_jitter,
            )
        check_int("mgs_warmup_steps", mgs_warmup_steps, minimum=0)
        check_int("mgs_warmup_epochs", mgs_warmup_epochs, minimum=0)
        check_int("mgs_max_samples", mgs_max_samples, minimum=1, allow_none=True)
        check_int("mgs_seed", mgs_seed, minimum=0)
        check_selector(mgs_logits)

        self.mgs_alpha = float(mgs_alpha)
        self.mgs_warmup_steps = mgs_warmup_steps
        self.mgs_warmup_epochs = mgs_warmup_epochs
        self.mgs_max_samples = mgs_max_samples
        self.mgs_seed = mgs_seed
        self.mgs_log = bool(mgs_log)
        self.mgs_allow_negative_alpha = mgs_allow_negative_alpha
        self.mgs_logits = mgs_logits
        self._mgs_depth = 0
        self._mgs_generator = torch.Generator()
        self._mgs_seed_key: tuple[int, int] | None = None
        self._mgs_calls = 0
        #: options a subclass's ``__init__`` was given but did not pass on: {name: (given, in effect)}
        self._mgs_not_passed_on = {
            name: (value, received.get(name))  # None: not an option at all (a typo the subclass swallowed)
            for name, value in _given_to_subclass_inits(self).items()
            if name not in received or not _same(value, received[name])
        }
        self.save_hyperparameters(self.mgs_hparams())

    # ------------------------------------------------------------------------------------------
    # overridable

    def mgs_inputs(self, batch: Any) -> Inputs:
        """The model inputs of a training batch (override for other batch layouts)."""
        return default_inputs(batch)

    def mgs_module(self) -> nn.Module:
        """The module whose outputs are the logits of the kernel (default: the LightningModule itself)."""
        return self  # type: ignore[return-value]

    def mgs_current_alpha(self) -> float:
        """α_t: ``mgs_alpha`` after the warm-up, 0 before it (override for another schedule)."""
        trainer = lightning_trainer(self)  # type: ignore[arg-type]
        if trainer is not None and (
            trainer.global_step < self.mgs_warmup_steps or trainer.current_epoch < self.mgs_warmup_epochs
        ):
            return 0.0
        return self.mgs_alpha

    # ------------------------------------------------------------------------------------------
    # public

    def mgs_hparams(self) -> dict[str, Any]:
        """The MGS settings as saved in ``hparams``: ``mgs_<field>`` for every field of :attr:`mgs_options`
        (``params`` only when it is names; dtype as a string) and the mixin's own settings."""
        hparams = {f"mgs_{k}": v for k, v in self.mgs_options.as_kwargs().items()}
        params = hparams["mgs_params"]
        if params is not None and not (isinstance(params, str) or (isinstance(params, (list, tuple)) and all(isinstance(p, str) for p in params))):
            params = None  # modules, tensors and callables are not hyperparameters
        hparams["mgs_params"] = list(params) if isinstance(params, (list, tuple)) else params
        dtype = hparams["mgs_dtype"]
        hparams["mgs_dtype"] = None if dtype is None else str(dtype).replace("torch.", "")
        return {
            **hparams, "mgs_alpha": self.mgs_alpha, "mgs_warmup_steps": self.mgs_warmup_steps,
            "mgs_warmup_epochs": self.mgs_warmup_epochs, "mgs_max_samples": self.mgs_max_samples, "mgs_seed": self.mgs_seed,
            "mgs_log": self.mgs_log, "mgs_allow_negative_alpha": self.mgs_allow_negative_alpha,
            # a key or index is a hyperparameter; a callable is not (pass it again to load_from_checkpoint)
            "mgs_logits": self.mgs_logits if isinstance(self.mgs_logits, (str, int)) else None,
        }

    def __getattr__(self, name: str) -> Any:
        # mgs_kind, mgs_strategy, …: the fields of mgs_options (nn.Module.__getattr__ for everything else)
        options = self.__dict__.get("mgs_options")
        if options is not None and name.startswith("mgs_") and hasattr(options, name[4:]):
            return getattr(options, name[4:])
        return super().__getattr__(name)

    def mgs_compute_penalty(self, batch: Any) -> Tensor:
        """g(K) on the batch's inputs, differentiable (no α, no schedule, no logging)."""
        module = self.mgs_module()
        inputs = cap_samples(self.mgs_inputs(batch), self.mgs_max_samples)
        trainer = lightning_trainer(self)  # type: ignore[arg-type]
        options = self.mgs_options.as_kwargs()
        options["dtype"] = compute_dtype(module, trainer, options["dtype"])
        return mgs_penalty(module, inputs, generator=self._mgs_probe_generator(), logits=self.mgs_logits, **options)

    def mgs_regularization(self, batch: Any) -> Tensor:
        """α_t·g(K) for the batch, to add to the loss (a zero tensor, not computed, while α_t = 0).

        Logs ``train/mgs_penalty`` (g) and ``train/mgs_alpha`` (α_t) when a Trainer is attached.
        Call it from ``training_step`` in manual optimisation; automatic optimisation calls it for you.
        """
        trainer = lightning_trainer(self)  # type: ignore[arg-type]
        if trainer is not None and self._mgs_not_passed_on:
            self._mgs_warn_not_passed_on()
        alpha = float(self.mgs_current_alpha())
        if alpha < 0 and not self.mgs_allow_negative_alpha:  # e.g. an overridden schedule
            raise MGSConfigurationError(_negative_alpha_message(alpha, "mgs_current_alpha() returned"))
        logging = self.mgs_log and trainer is not None
        if logging:
            self.log(LOG_KEYS["alpha"], alpha, on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        if alpha == 0.0:
            device = next(iter(self.parameters()), torch.empty(0)).device  # type: ignore[attr-defined]
            return torch.zeros((), device=device)
        value = self.mgs_compute_penalty(batch)
        self.mgs_last_penalty = value.detach()
        if logging:
            self.log(LOG_KEYS["penalty"], value.detach(), on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        return alpha * value

    # ------------------------------------------------------------------------------------------
    # internals

    def _mgs_warn_not_passed_on(self) -> None:
        """Once, at the first training step: the options a subclass's ``__init__`` dropped."""
        dropped, self._mgs_not_passed_on = self._mgs_not_passed_on, {}
        given = ", ".join(f"{k}={v!r}" for k, (v, _) in dropped.items())
        used = ", ".join(f"{k}={u!r}" for k, (_, u) in dropped.items() if k in MGS_OPTIONS)
        unknown = [k for k in dropped if k not in MGS_OPTIONS]
        rank_zero_warn(
            f"{type(self).__name__}.__init__ was given {given} but did not pass it on to MGSRegularizedMixin"
            + (f", so training uses {used}" if used else "")
            + (f"; {', '.join(unknown)} is not one of its options ({', '.join(MGS_OPTIONS)})" if unknown else "")
            + ". Pass the options through: def __init__(self, ..., **mgs): super().__init__(..., **mgs).",
            category=RuntimeWarning,
        )

    def _mgs_add_penalty(self, out: Any, batch: Any) -> Any:
        if isinstance(out, Tensor):
            loss = out
        elif isinstance(out, Mapping) and isinstance(out.get("loss"), Tensor):
            loss = out["loss"]
        else:  # None (skip this batch) or something Lightning itself will reject
            return out
        if self.mgs_log and lightning_trainer(self) is not None:  # type: ignore[arg-type]
            self.log(LOG_KEYS["data_loss"], loss.detach(), on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        total = loss + self.mgs_regularization(batch)
        if isinstance(out, Tensor):
            return total
        return {**out, "loss": total}

    def _mgs_probe_generator(self) -> torch.Generator:
        """The module's generator, re-seeded from (seed, rank, batches trained, call within the batch)."""
        trainer = lightning_trainer(self)  # type: ignore[arg-type]
        rank, batches = 0, -1
        if trainer is not None:
            rank = int(getattr(trainer, "global_rank", 0))
            # batches started so far (checkpointed by Lightning): total_batch_idx counts from 0
            batches = int(trainer.fit_loop.epoch_loop.total_batch_idx) + 1
        key = (rank, batches)
        if trainer is not None and key == self._mgs_seed_key:
            self._mgs_calls += 1
        elif trainer is not None:
            self._mgs_seed_key, self._mgs_calls = key, 0
        else:  # outside a Trainer: a running count
            self._mgs_seed_key, self._mgs_calls = None, self._mgs_calls + 1
        return self._mgs_generator.manual_seed(_mix_seed(self.mgs_seed, rank, batches, self._mgs_calls))


#: every keyword option of :class:`MGSRegularizedMixin`
MGS_OPTIONS: tuple[str, ...] = tuple(n for n in inspect.signature(MGSRegularizedMixin.__init__).parameters if n.startswith("mgs_"))
