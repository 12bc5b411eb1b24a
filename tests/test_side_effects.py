"""No side effects, and the documented BatchNorm and Dropout policies."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import SmallCNN, assert_close, reference_kernel
from reference import relative_error
from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace

STRATEGIES = ["jacobian", "structured"]


class DropNet(nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(4, 8), nn.Dropout(p), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


def _all_calls(model, x, strategy):
    """Every public computation, run once each."""
    mgs_kernel(model, x, strategy=strategy)
    mgs_kernel(model, x, strategy=strategy, batch_norm="batch")
    mgs_trace(model, x, strategy=strategy)
    mgs_trace(model, x, strategy=strategy, estimator="hutchinson")
    mgs_penalty(model, x, strategy=strategy)
    mgs_penalty(model, x, strategy=strategy, kind="logdet", jitter=1e-8)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_state_grads_modes_buffers_and_rng_are_untouched(strategy):
    torch.manual_seed(0)
    model = SmallCNN(3).double()
    model.train()
    model.norm.eval()  # a mixed-mode model: flags must come back exactly
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()  # existing .grad values
    model.head.bias.grad = None  # and one parameter without .grad
    state = copy.deepcopy(model.state_dict())
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    rng = torch.get_rng_state()

    _all_calls(model, x, strategy)

    for k, v in model.state_dict().items():  # parameters and buffers, incl. BN running stats and counter
        assert torch.equal(v, state[k]), k
    for k, p in model.named_parameters():
        assert (p.grad is None) if grads[k] is None else torch.equal(p.grad, grads[k]), k
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropout_model_leaves_the_global_rng_alone(strategy):
    model = DropNet().double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    _all_calls(model, x, strategy)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_norm_eval_policy_is_the_kernel_of_the_eval_network(strategy):
    model = SmallCNN(3).double().train()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    expected = reference_kernel(copy.deepcopy(model).eval(), x)
    assert_close(mgs_kernel(model, x, strategy=strategy), expected)
    assert model.training and model.bn.training


def whole_batch_kernel(model, x):
    """Brute force: rows of the Jacobian of the batch function, one autograd.grad per output."""
    params = list(model.parameters())
    out = model(x).reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[r], params, retain_graph=True)]) for r in range(out.numel())]
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_norm_batch_policy_is_the_whole_batch_jacobian(strategy):
    model = SmallCNN(3).double().train()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    expected = whole_batch_kernel(copy.deepcopy(model), x)
    K = mgs_kernel(model, x, strategy=strategy, batch_norm="batch")
    assert_close(K, expected)
    # samples interact: the kernel differs from the per-sample (eval) one
    assert not torch.allclose(K, mgs_kernel(model, x, strategy=strategy))
    assert_close(mgs_trace(model, x, strategy=strategy, batch_norm="batch"), expected.trace())
    # in eval mode the two policies coincide
    model.eval()
    assert_close(mgs_kernel(model, x, batch_norm="batch", strategy=strategy), mgs_kernel(model, x, strategy=strategy))


def test_structured_dropout_masks_are_those_a_forward_would_draw():
    model = DropNet().double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(3)
    K = mgs_kernel(model, x, strategy="structured")
    torch.manual_seed(3)
    assert_close(K, whole_batch_kernel(model, x))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropout_kernel_is_reproducible_and_differs_from_eval(strategy):
    model = DropNet().double().train()
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(1)
    K1 = mgs_kernel(model, x, strategy=strategy)
    torch.manual_seed(1)
    K2 = mgs_kernel(model, x, strategy=strategy)
    assert torch.equal(K1, K2)
    assert_close(K1, K1.T)
    assert torch.linalg.eigvalsh(K1).min() > -1e-9 * K1.diagonal().max()
    model.eval()
    K_eval = mgs_kernel(model, x, strategy=strategy)
    assert_close(K_eval, reference_kernel(model, x))
    assert not torch.allclose(K1, K_eval)


def test_dropout_with_uncovered_layers_uses_one_consistent_set_of_masks():
    """Covered and fallback parameters must see the same masks. The structured engine now computes the
    uncovered parameter's per-sample gradients in its own pass (parameter taps), so it agrees with the
    reference to rounding, not bit for bit: masks that differed would change K by O(1), as another seed shows."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), Scale(), nn.Linear(8, 2)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(2)
    K = mgs_kernel(model, x, strategy="structured")
    torch.manual_seed(2)
    assert relative_error(K, mgs_kernel(model, x, strategy="jacobian")) < 1e-12
    torch.manual_seed(3)
    assert relative_error(K, mgs_kernel(model, x, strategy="jacobian")) > 1e-2  # the masks matter


def test_functional_dropout_in_a_custom_layer_is_handled_consistently():
    """F.dropout inside an unknown layer: no Dropout module announces it, vmap's error mode finds it."""

    class NoisyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return F.dropout(x * self.w, 0.5, self.training)

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), NoisyScale(), nn.Linear(8, 2)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    for strategy in STRATEGIES:
        torch.manual_seed(2)
        K = mgs_kernel(model, x, strategy=strategy)
        torch.manual_seed(2)
        assert relative_error(K, mgs_kernel(model, x, strategy="jacobian")) < 1e-12  # one consistent set of masks
        torch.manual_seed(3)
        assert relative_error(K, mgs_kernel(model, x, strategy="jacobian")) > 1e-2  # (which matter)
        torch.set_rng_state(rng)
        assert torch.isfinite(mgs_trace(model, x, strategy=strategy))
        assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    assert_close(mgs_kernel(model, x), reference_kernel(model, x))


@pytest.mark.parametrize("batch_norm", ["batch", "eval"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_first_penalty_after_the_training_forward_leaves_its_graph_usable(strategy, batch_norm):
    """The usual step, on a model mgs_torch has not seen: loss = CE(model(x)) + α·penalty, then backward. The
    training forward's BatchNorm saved its running statistics for backward; the first call's self-check runs the
    model itself and put those statistics back with an in-place copy, whose version bump made that backward
    fail ("modified by an inplace operation"). The gradient must be the forward's plus α times the penalty's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())

    def grads(loss):
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    together = grads(F.cross_entropy(model(x), y) + 0.01 * mgs_penalty(model, x, strategy=strategy, batch_norm=batch_norm))
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    ce = grads(F.cross_entropy(model(x), y))
    penalty = grads(mgs_penalty(model, x, strategy=strategy, batch_norm=batch_norm))
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731 - one norm: the conv bias before a
    # train-mode BatchNorm has a gradient of zero up to rounding, which no per-parameter relative error can judge
    assert relative_error(flat(together), flat(ce) + 0.01 * flat(penalty)) < 1e-12
    for key, value in model.state_dict().items():  # the running statistics moved once, by the training forward
        assert torch.equal(value, after[key]), key
