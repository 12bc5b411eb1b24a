"""Train-mode Dropout: every sample gets its own mask, on every route (issue 25).

The samples are identical, so any difference between their kernel blocks comes from their masks
alone; a route that shared one mask across the batch (vmap's ``randomness="same"``) gives equal
blocks. The first model makes the masks readable from K itself: f(x) = w · dropout(x) with
x_k = 2^k, so sample i's entry of K is (1/(1−p))² Σ_k m_ik 4^k — its mask in base 4 — and every
other entry of K follows from the decoded masks (K_ij = (1/(1−p))² Σ_k m_ik m_jk 4^k), an exact
reference that needs no second draw of the same masks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace

N, D, P = 4, 8, 0.5
SCALE = 1 / (1 - P) ** 2


def _masked_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(P), nn.Linear(D, 1, bias=False)).double().train()
    x = (2.0 ** torch.arange(D, dtype=torch.float64)).expand(N, D).clone()  # N identical samples
    return model, x


def _digits(value: float, count: int) -> list[int]:
    """``value`` = Σ_k d_k 4^k with integer digits: the d_k, lowest first (exact in float64 here)."""
    v = round(value)
    assert abs(value - v) < 1e-9, f"{value} is not an integer: not a sum of masked squares"
    digits = []
    for _ in range(count):
        v, d = divmod(v, 4)
        digits.append(d)
    assert v == 0, "more features than the model has"
    return digits


def _masks_from_kernel(K: torch.Tensor) -> torch.Tensor:
    masks = torch.tensor([_digits(float(K[i, i]) / SCALE, D) for i in range(N)], dtype=torch.float64)
    assert ((masks == 0) | (masks == 1)).all(), f"diagonal entries are not masked squares: {masks}"
    return masks


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "auto"])
def test_each_sample_has_its_own_mask_in_the_kernel(strategy):
    model, x = _masked_linear()
    K = mgs_kernel(model, x, strategy=strategy)
    masks = _masks_from_kernel(K)
    # with one shared mask all rows would be equal (probability 2^-24 for independent masks at this seed)
    assert len({tuple(m.tolist()) for m in masks}) > 1, f"every sample got the same Dropout mask: {masks}"
    four = 4.0 ** torch.arange(D, dtype=torch.float64)
    expected = SCALE * (masks * four) @ masks.T
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "auto"])
@pytest.mark.parametrize("penalty", [False, True])
def test_each_sample_has_its_own_mask_in_the_trace(strategy, penalty):
    """tr K = (1/(1−p))² Σ_k c_k 4^k where c_k counts the samples that keep feature k: with one shared
    mask every c_k is 0 or N, with independent masks some lie strictly between (probability 1 − 4^-8).
    The trace comes from J's row norms (another engine entry point than the kernel)."""
    model, x = _masked_linear()
    if penalty:
        value = mgs_penalty(model, x, strategy=strategy, reduction="sum")
    else:
        value = mgs_trace(model, x, strategy=strategy)
    counts = _digits(value.item() / SCALE, D) if not value.requires_grad else _digits(value.detach().item() / SCALE, D)
    assert all(0 <= c <= N for c in counts), counts
    assert any(0 < c < N for c in counts), f"every sample got the same Dropout mask: feature counts {counts}"


@pytest.mark.parametrize("strategy", ["jacobian", "auto"])
def test_train_mode_encoder_layer_blocks_differ_between_identical_samples(strategy):
    """The route ``auto`` takes for a train-mode TransformerEncoderLayer (the case the issue found):
    four identical samples, and their diagonal blocks of K must differ through their masks alone."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.3, batch_first=True).double().train()
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 2)).double().train()
    x = torch.randn(1, 3, 4, dtype=torch.float64).expand(N, 3, 4).clone()
    K = mgs_kernel(model, x, strategy=strategy)
    q = K.shape[0] // N
    blocks = [K[i * q:(i + 1) * q, i * q:(i + 1) * q] for i in range(N)]
    spread = max(float((b - blocks[0]).abs().max()) for b in blocks[1:]) / float(blocks[0].abs().max())
    assert spread > 1e-3, f"the diagonal blocks of identical samples agree to {spread:.1e}: one Dropout mask for all"
    # and the model in eval mode (no Dropout) gives equal blocks: the difference is the masks'
    K_eval = mgs_kernel(model.eval(), x, strategy=strategy)
    eval_blocks = [K_eval[i * q:(i + 1) * q, i * q:(i + 1) * q] for i in range(N)]
    assert all(torch.allclose(b, eval_blocks[0], rtol=1e-12, atol=1e-12) for b in eval_blocks)


class _FunctionalDropoutGate(nn.Module):
    """``F.dropout`` called in a custom layer (no nn.Dropout for mgs_torch to see) scaling by a bare
    parameter, before a Linear that the structured engine has a rule for: the Linear's and the
    gate's Jacobian columns come from two parts of the computation and must use one mask per sample."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(D, dtype=torch.float64))
        self.head = nn.Linear(D, 1, bias=False).double()
        with torch.no_grad():
            self.head.weight.fill_(1.0)

    def forward(self, x):
        return self.head(torch.nn.functional.dropout(x, P, training=self.training) * self.scale)


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "auto"])
def test_a_random_op_in_a_custom_layer_draws_one_mask_for_every_parameter(strategy):
    """With scale = w = 1, K_ii (1−p)² = Σ_k (m_k + m'_k) 4^k where m masks the gate's columns and m'
    the Linear's: one mask per sample makes every digit 0 or 2, two draws make some digit 1."""
    torch.manual_seed(0)
    model = _FunctionalDropoutGate().train()
    x = (2.0 ** torch.arange(D, dtype=torch.float64)).expand(N, D).clone()
    K = mgs_kernel(model, x, strategy=strategy)
    digits = [_digits(float(K[i, i]) / SCALE, D) for i in range(N)]
    assert all(d in (0, 2) for row in digits for d in row), f"two different masks for one sample: {digits}"
    assert len({tuple(row) for row in digits}) > 1, f"every sample got the same mask: {digits}"
