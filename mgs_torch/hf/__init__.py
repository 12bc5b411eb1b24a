"""Hugging Face ``transformers`` integration (extra ``.[hf]``).

The core (:func:`mgs_torch.mgs_kernel`, ``mgs_penalty``, ``verify`` …) already takes a tokenizer's dict
and a ``ModelOutput`` as they come, and keeps padded batches on the per-sample route; it never imports
transformers. This package adds:

* :class:`MGSTrainerCallback` — logs tr K, log det K, rank, … of a fixed probe batch into ``Trainer``'s
  own logs (``trainer.state.log_history`` and every ``report_to`` integration);
* :class:`MGSTrainerMixin` / :class:`MGSTrainer` — the penalty inside ``Trainer.compute_loss``, right
  under gradient accumulation, ``bf16``/``fp16`` and multi-process training through accelerate;
* :mod:`mgs_torch.hf.language` — kernels of language models that scale (``next_token_logits``,
  ``label_logits``, ``VocabSketch``), selectors for ``logits=``.

The Trainer classes import transformers when first used; the selectors never do.
"""

from __future__ import annotations

from .language import TokenLogits, VocabSketch, label_logits, next_token_logits, token_rows

__all__ = [
    "MGSTrainerCallback", "MGSTrainerMixin", "MGSTrainer", "next_token_logits", "label_logits", "TokenLogits",
    "VocabSketch", "token_rows",
]

_TRAINER_NAMES = ("MGSTrainerCallback", "MGSTrainerMixin", "MGSTrainer")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'mgs_torch.hf' has no attribute {name!r}")
