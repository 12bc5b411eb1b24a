"""Methods and models: every method trains one tiny epoch, and each penalty is what it claims."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import reference_kernel
from mgs_bench.methods import METHODS, PAPER_METHODS, make_method, method_names
from mgs_bench.models import FCN, LeNet5, build_model
from mgs_bench.runner import RunConfig, train_run


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(q=3, n=5, d=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, q)).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, q, (n,))
    return model, x, y


def test_gradnorm_inputs_equals_independent_per_sample_autograd():
    model, x, y = _batch()
    method = make_method("gradnorm_inputs", 0.5)
    xg = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xg), y)
    pen = method.penalty(model, xg, y, nn.functional.cross_entropy, loss)
    expected = 0.0
    for i in range(len(x)):  # one sample at a time: ‖∇_{x_i} ℓ_i‖²
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xi), y[i : i + 1]), xi)
        expected += float((g**2).sum())
    assert math.isclose(float(pen.detach()), expected / len(x), rel_tol=1e-10)
    assert pen.requires_grad  # differentiable: trained by double backward


def test_gradnorm_params_equals_squared_norm_of_the_loss_gradient():
    model, x, y = _batch()
    loss = nn.functional.cross_entropy(model(x), y)
    pen = make_method("gradnorm_params", 1.0).penalty(model, x, y, nn.functional.cross_entropy, loss)
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert math.isclose(float(pen.detach()), sum(float((g**2).sum()) for g in grads), rel_tol=1e-10)
    (dp,) = torch.autograd.grad(pen, [model[0].weight])
    assert torch.isfinite(dp).all() and dp.abs().sum() > 0


def test_mgs_penalties_are_trace_and_logdet_of_the_kernel_per_row():
    model, x, y = _batch()
    K = reference_kernel(model, x)
    loss = nn.functional.cross_entropy(model(x), y)
    tr = make_method("mgs_trace", 1.0).penalty(model, x, y, nn.functional.cross_entropy, loss)
    ld = make_method("mgs_logdet", 1.0).penalty(model, x, y, nn.functional.cross_entropy, loss)
    N = K.shape[0]
    assert math.isclose(float(tr.detach()), float(K.trace()) / N, rel_tol=1e-9)
    assert math.isclose(float(ld.detach()), float(torch.linalg.slogdet(K)[1]) / N, rel_tol=1e-7)


def test_methods_change_what_they_claim():
    assert make_method("unreg").penalty(*_batch()[:1], None, None, None, None) is None
    params = [nn.Parameter(torch.zeros(2))]
    wd = make_method("weight_decay", 0.01).optimizer(params, lr=0.1)
    assert isinstance(wd, torch.optim.SGD) and wd.param_groups[0]["weight_decay"] == 0.01 and wd.param_groups[0]["lr"] == 0.1
    adam = make_method("adam", 3e-4).optimizer(params, lr=0.1)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 3e-4
    assert make_method("dropout", 0.4).dropout() == 0.4 and make_method("mgs_trace").dropout() == 0.0
    fcn = build_model("fcn", (1, 8, 8), 10, dropout=0.4, hidden=(7, 7, 7))
    drops = [m for m in fcn.modules() if isinstance(m, nn.Dropout)]
    linears = [m for m in fcn.modules() if isinstance(m, nn.Linear)]
    assert len(drops) == len(linears) - 1 == 3 and all(d.p == 0.4 for d in drops)  # between all FC layers
    lenet = build_model("lenet5", (1, 8, 8), 10, dropout=0.4)
    assert len([m for m in lenet.modules() if isinstance(m, nn.Dropout)]) == 2
    assert make_method("mgs_trace", 0.2).alpha == 0.2 and make_method("weight_decay", 0.2).alpha == 0.0


def test_method_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="mgs_trace"):
        make_method("l1")
    with pytest.raises(ValueError, match="dropout probability"):
        make_method("dropout", 1.5)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        make_method("unreg", 0.1)
    with pytest.raises(ValueError, match="'all'"):
        method_names(["mgs", "unreg"])
    assert method_names("paper") == list(PAPER_METHODS) and method_names(["all"]) == list(PAPER_METHODS) + ["adam"]


@pytest.mark.parametrize(
    "shape,expected_flat",
    [((1, 8, 8), 64), ((1, 28, 28), 400), ((1, 40), 128)],  # digits (padded conv2), MNIST (classic 5×5×16), MNIST-1D
)
def test_lenet_adapts_to_the_input_size(shape, expected_flat):
    net = LeNet5(shape, 10)
    assert net.classifier[1].in_features == expected_flat
    assert net(torch.zeros(3, *shape)).shape == (3, 10)
    with pytest.raises(ValueError, match="fcn"):
        build_model("lenet5", (2,), 2)
    with pytest.raises(ValueError, match="lenet5"):
        build_model("resnet", (2,), 2)


def test_init_schemes():
    torch.manual_seed(0)
    fcn = build_model("fcn", (300,), 2, hidden=(300,) * 2)  # auto: Glorot-uniform for the FCN
    lenet = build_model("lenet5", (1, 8, 8), 10)  # auto: He for LeNet-5
    hidden = fcn.net[3].weight
    assert abs(float(hidden.detach().std()) - (2 / 600) ** 0.5) < 0.005 and float(fcn.net[1].bias.detach().abs().sum()) == 0
    assert abs(float(lenet.classifier[1].weight.detach().std()) - (2 / 64) ** 0.5) < 0.02
    he = build_model("fcn", (300,), 2, hidden=(300,) * 2, init="he")
    assert abs(float(he.net[3].weight.detach().std()) - (2 / 300) ** 0.5) < 0.005
    with pytest.raises(ValueError, match="xavier"):
        build_model("fcn", (2,), 2, init="orthogonal")


def test_paper_fcn_is_six_hidden_layers_of_300():
    net = FCN((2,), 2)
    widths = [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    assert widths == [300] * 6 + [2]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_one_tiny_epoch(method):
    cfg = RunConfig(dataset="digits", model="lenet5", method=method, noise=0.3, train_size=40, epochs=1,
                    eval_points=2, probe_size=8)
    r = train_run(cfg)
    assert not r["diverged"] and [h["epoch"] for h in r["history"]] == [0, 1]
    last = r["history"][-1]
    assert last["step"] == 2 and 0.0 <= last["test_acc"] <= 1.0 and last["mgs_trace"] > 0
    assert r["method"]["name"] == method and r["method"]["value"] == (None if method == "unreg" else METHODS[method][1])
    assert r["data"]["flipped"] == 12
