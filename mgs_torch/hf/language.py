r"""Kernels of language models that scale: output selectors for ``logits=``.

A causal-LM or token-classification head has q = T·V raw outputs per sample (T positions, V vocabulary
entries or labels), so the full MGS kernel has (n·T·V)² entries — 10¹⁴ for n = 8, T = 128, V = 32 000.
Three definitions that scale, each a selector passed as ``logits=`` to :func:`mgs_torch.mgs_kernel`,
``mgs_penalty``, ``verify``, the Trainer callback and penalty (the model's output only needs ``.logits``
of shape (n, T, V), the inputs the token ids):

``next_token_logits()`` — the outputs that enter the loss: at each position t < T−1 the logit of the
token that follows, f_{i,t} = z_{i,t,x_{i,t+1}}. q = T−1. K is the principal submatrix of the full
kernel at rows (i, t, x_{i,t+1}), exact: K[(i,t),(j,s)] = ∇θ z_{i,t,x_{i,t+1}} · ∇θ z_{j,s,x_{j,s+1}}.
Positions whose next token is padding (``attention_mask`` 0) give zero rows, so tr K is the sum over
the real next tokens; :func:`token_rows` picks the rows to keep for log det and the spectrum.
Cost: (T−1) output backward passes per sample (structured engine: one backward at batch n·(T−1)) in
place of T·V, memory (n·T)² for K.

``label_logits()`` — the same for token classification with ``labels`` (and for a causal LM trained on
``labels``: ``shift=True``): f_{i,t} = z_{i,t,y_{i,t}}, zero where y = −100 (ignored by the loss).

``VocabSketch(V, num_probes=P)`` — every position, the whole vocabulary through P fixed Rademacher
directions r_p ∈ {±1}^V shared by all samples and positions: f_{i,t,p} = (r_p · z_{i,t}) / √P. q = T·P.
K_sketch = S K Sᵀ with S = I_{nT} ⊗ R/√P exactly; in expectation over R, Σ_p K_sketch[(i,t,p),(j,s,p)]
is the vocabulary-traced kernel Σ_v K[(i,t,v),(j,s,v)] (neural-tangents' ``trace_axes``) and
tr K_sketch is unbiased for tr K of all T·V outputs (relative spread ≈ √(2/P) at worst). Cost: T·P
output backward passes per sample.

For the trace *penalty* alone the full outputs also scale: ``mgs_penalty(..., estimator="hutchinson")``
draws per-sample probes over all T·V outputs and costs ``num_probes`` backward passes per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["TokenLogits", "next_token_logits", "label_logits", "VocabSketch", "token_rows"]


def _logits(out: Any) -> Tensor:
    logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError(
            f"a language-model selector needs the model's logits of shape (batch, positions, vocabulary); got "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    return logits


def _keyword_inputs(inputs: Any, key: str) -> Tensor:
    if not isinstance(inputs, Mapping) or key not in inputs:
        raise TypeError(
            f"this selector reads {key!r} from the inputs: pass them as a mapping of keyword arguments "
            f"(the tokenizer's dict), got {type(inputs).__name__}"
            + (f" with keys {list(inputs)}" if isinstance(inputs, Mapping) else "")
        )
    return inputs[key]


class TokenLogits:
    """Selector f_{i,t} = z_{i,t,y_{i,t'}} with y = ``inputs[target_key]`` and t' = t+1 (``shift``) or t;
    zero where the target is padding (``inputs[mask_key]`` is 0 at t') or ``ignore_index``.
    Outputs (n, T−1) with ``shift``, else (n, T). See the module docstring."""

    def __init__(self, target_key: str = "input_ids", *, shift: bool = True, mask_key: str | None = "attention_mask",
                 ignore_index: int | None = -100):
        if not isinstance(target_key, str) or not (mask_key is None or isinstance(mask_key, str)):
            raise TypeError("target_key and mask_key must be names of keyword inputs (str; mask_key may be None)")
        self.target_key, self.shift, self.mask_key, self.ignore_index = target_key, bool(shift), mask_key, ignore_index

    def __call__(self, out: Any, inputs: Any) -> Tensor:
        logits = _logits(out)
        targets = _keyword_inputs(inputs, self.target_key)
        if targets.shape != logits.shape[:2]:
            raise ValueError(
                f"{self.target_key!r} has shape {tuple(targets.shape)}, but the logits have {tuple(logits.shape[:2])} "
                f"(batch, positions)"
            )
        if self.shift:
            logits = logits[:, :-1]
        targets, keep = self._targets(inputs)
        index = torch.where(keep, targets, torch.zeros_like(targets)).long()
        chosen = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return chosen * keep.to(chosen.dtype)

    def _targets(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The target of each output position and whether it is real (not padding, not ignored)."""
        targets = inputs[self.target_key]
        if self.shift:
            targets = targets[:, 1:]
        keep = torch.ones_like(targets, dtype=torch.bool)
        if self.ignore_index is not None:
            keep = keep & (targets != self.ignore_index)
        if self.mask_key is not None and inputs.get(self.mask_key) is not None:
            mask = inputs[self.mask_key]
            keep = keep & (mask[:, 1:] if self.shift else mask).bool()
        return targets, keep

    def rows(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The rows of K (n·T' booleans, sample-major) that belong to real targets."""
        return self._targets(inputs)[1].reshape(-1)

    def __repr__(self) -> str:
        return f"TokenLogits({self.target_key!r}, shift={self.shift}, mask_key={self.mask_key!r}, ignore_index={self.ignore_index})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenLogits) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def next_token_logits(input_key: str = "input_ids", mask_key: str | None = "attention_mask") -> TokenLogits:
    """Causal LM: the logit of the next token at each position, f_{i,t} = z_{i,t,x_{i,t+1}} (q = T−1)."""
    return TokenLogits(input_key, shift=True, mask_key=mask_key, ignore_index=None)


def label_logits(label_key: str = "labels", *, shift: bool = False, ignore_index: int = -100,
                 mask_key: str | None = "attention_mask") -> TokenLogits:
    """Token classification (``shift=False``) or a causal LM trained on ``labels`` (``shift=True``): the logit
    of each position's label, f_{i,t} = z_{i,t,y_{i,t}}, zero where the label is ``ignore_index``."""
    return TokenLogits(label_key, shift=shift, mask_key=mask_key, ignore_index=ignore_index)


def token_rows(selector: TokenLogits, inputs: Mapping[str, Tensor]) -> Tensor:
    """Boolean mask of K's rows that belong to real tokens: ``K[rows][:, rows]`` is the kernel without the
    zero rows of padding, for ``mgs_metrics`` (log det, rank, spectrum)."""
    return selector.rows(inputs)


class VocabSketch:
    """Selector f_{i,t,p} = (r_p · z_{i,t}) / √P for P fixed Rademacher vectors r_p ∈ {±1}^V (from ``seed``),
    the same for every sample and position: outputs (n, T, P). See the module docstring."""

    def __init__(self, vocab_size: int, num_probes: int = 4, seed: int = 0):
        for name, value in (("vocab_size", vocab_size), ("num_probes", num_probes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (vocab_size, num_probes), generator=generator, dtype=torch.int8)
        #: the sketch matrix R/√P, (V, P), float64 on the CPU (cast to the logits' dtype and device per call)
        self.matrix = (2.0 * signs.double() - 1.0) / num_probes**0.5
        self.vocab_size, self.num_probes, self.seed = vocab_size, num_probes, seed

    def __call__(self, out: Any) -> Tensor:
        logits = _logits(out)
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"the logits have {logits.shape[-1]} vocabulary entries, the sketch was made for {self.vocab_size}")
        return logits @ self.matrix.to(device=logits.device, dtype=logits.dtype)

    def __repr__(self) -> str:
        return f"VocabSketch({self.vocab_size}, num_probes={self.num_probes}, seed={self.seed})"
