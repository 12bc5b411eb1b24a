"""Per-sample MGS scores against a brute-force reference (issue 11, item 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import mlp, reference_jacobian, reference_kernel
from mgs_torch import mgs_kernel, mgs_sample_scores, sample_scores_from_kernel


def _per_sample_loss_gradients(model, x, y, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        value = F.cross_entropy(out, y[i : i + 1]) if loss == "cross_entropy" else ((out - y[i : i + 1]) ** 2).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def _expected(G):
    return _expected_from_gram(G @ G.T)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_outputs_form_equals_the_blocks_of_the_reference_kernel(strategy):
    model, x = mlp(3), torch.randn(5, 4, dtype=torch.float64)
    scores = mgs_sample_scores(model, x, strategy=strategy)
    J = reference_jacobian(model, x).reshape(5, 3, -1)
    S = torch.einsum("iap,jap->ij", J, J)
    energy, agreement = _expected_from_gram(S)
    torch.testing.assert_close(scores.energy, energy)
    torch.testing.assert_close(scores.agreement, agreement)
    K = reference_kernel(model, x)
    from_full = sample_scores_from_kernel(K, 5)
    torch.testing.assert_close(from_full.energy, energy)
    torch.testing.assert_close(from_full.agreement, agreement)
    torch.testing.assert_close(scores.energy.sum(), K.trace())  # the energies add up to tr K


def _expected_from_gram(S):
    energy = S.diagonal()
    cos = S / (energy.sqrt()[:, None] * energy.sqrt()[None, :])
    return energy, (cos.sum(1) - 1.0) / (S.shape[0] - 1)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_loss_form_is_the_gram_of_per_sample_loss_gradients(strategy, loss):
    model, x = mlp(3), torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,)) if loss == "cross_entropy" else torch.randn(6, 3, dtype=torch.float64)
    scores = mgs_sample_scores(model, x, targets=y, loss=loss, strategy=strategy)
    G = _per_sample_loss_gradients(model, x, y, loss)
    energy, agreement = _expected(G)
    torch.testing.assert_close(scores.energy, energy)
    torch.testing.assert_close(scores.agreement, agreement)
    assert scores.form == "loss" and scores.gram.shape == (6, 6)
    if loss == "cross_entropy":
        S = G @ G.T
        cos = S / (S.diagonal().sqrt()[:, None] * S.diagonal().sqrt()[None, :])
        for i in range(6):
            mates = [j for j in range(6) if j != i and y[j] == y[i]]
            expected = cos[i, mates].mean() if mates else torch.tensor(float("nan"), dtype=torch.float64)
            torch.testing.assert_close(scores.agreement_same_label[i], expected, equal_nan=True)
    else:
        assert scores.agreement_same_label is None


def test_params_filter_and_model_left_alone():
    model, x = mlp(3), torch.randn(4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = mgs_sample_scores(model, x, targets=y, params=["4"])  # the last layer only
    head = [model[4].weight, model[4].bias]
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), head)])
                     for i in range(4)])
    torch.testing.assert_close(scores.energy, (G * G).sum(1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_flipped_label_stands_out_on_a_trained_model():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20, 2) + 3, torch.randn(20, 2) - 3]).double()
    y = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    y_noisy = y.clone()
    y_noisy[3] = 1  # a flipped label in a clean cluster
    scores = mgs_sample_scores(model, x, targets=y_noisy)
    assert int(scores.energy.argmax()) == 3 and int(scores.agreement.argmin()) == 3


def test_errors():
    model, x = mlp(3), torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="loss must be one of"):
        mgs_sample_scores(model, x, targets=torch.zeros(4).long(), loss="hinge")
    with pytest.raises(ValueError, match="class labels"):
        mgs_sample_scores(model, x, targets=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mgs_sample_scores(model, x, targets=torch.full((4,), 7))
    with pytest.raises(ValueError, match="one row per sample"):
        mgs_sample_scores(model, x, targets=torch.zeros(3).long())
    with pytest.raises(TypeError, match="outputs="):
        mgs_sample_scores(model, x, outputs="full")
    with pytest.raises(ValueError, match="num_samples must divide"):
        sample_scores_from_kernel(mgs_kernel(model, x), 5)
