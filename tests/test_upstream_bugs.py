"""One regression test per torch.func / autograd bug that mgs_torch routes around (mgs_torch.op_fixes).

Each test runs the *plain* torch.func computation, without mgs_torch, and asserts that it is still
wrong or still fails in the installed PyTorch. When an upstream fix lands, the test fails with a
message saying which replacement in ``REPLACED_OPS`` can go (after the audit matrix has been rerun
without it). That mgs_torch itself is right on the same models is checked by tests/test_audit.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vjp, vmap

from model_zoo import by_name, build
from reference import penalty_grad_loop, relative_error, trainable

FIXED_UPSTREAM = "PyTorch {} seems to have fixed this; rerun tests/test_audit.py without the replacement of {} in mgs_torch/op_fixes.py and drop it"


def naive_trace_gradient(model: nn.Module, x: torch.Tensor, whole_batch: bool = False) -> torch.Tensor:
    """∂ tr K / ∂θ the torch.func way: vjp of the model, vmapped over one-hot output cotangents,
    squared norms summed, then ordinary backward (the double backward)."""
    params = {k: v for k, v in model.named_parameters()}

    def buffers():  # cloned inside the transform: train-mode BatchNorm updates them in place
        return {k: v.clone() for k, v in model.named_buffers()}

    if whole_batch:
        out, vjp_fn = vjp(lambda p: functional_call(model, {**p, **buffers()}, (x,)).reshape(-1), params)
        grads = vmap(vjp_fn)(torch.eye(out.numel(), dtype=out.dtype))[0]
        trace = sum((g**2).sum() for g in grads.values())
    else:
        def per_sample(xi):
            out, vjp_fn = vjp(lambda p: functional_call(model, {**p, **buffers()}, (xi.unsqueeze(0),)).reshape(-1), params)
            grads = vmap(vjp_fn)(torch.eye(out.numel(), dtype=out.dtype))[0]
            return sum((g**2).sum() for g in grads.values())

        trace = vmap(per_sample)(x).sum()
    grads = torch.autograd.grad(trace, trainable(model), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, trainable(model))])


def loop_trace_gradient(model, x, whole_batch=False) -> torch.Tensor:
    grads = penalty_grad_loop(model, x, "trace", whole_batch=whole_batch)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, trainable(model))])


@pytest.mark.parametrize(
    "name, op", [("layernorm", "F.layer_norm"), ("instancenorm1d_affine", "F.instance_norm"), ("batchnorm2d_batch", "F.batch_norm")]
)
def test_double_backward_through_vmapped_vjp_of_a_norm_is_wrong(name, op):
    case = by_name(name)
    model, (x,) = build(case)
    error = relative_error(naive_trace_gradient(model, x, case.whole_batch), loop_trace_gradient(model, x, case.whole_batch))
    assert error > 1e-6, FIXED_UPSTREAM.format(torch.__version__, op)


def _vmap_jacrev(model: nn.Module, x: torch.Tensor):
    params = {k: v.detach() for k, v in model.named_parameters()}
    return vmap(jacrev(lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)), in_dims=(None, 0))(params, x)


@pytest.mark.parametrize(
    "name, op, error",
    [
        ("latent_upsampler", "F.conv_transpose1d/2d", "grad_weight needs to be contiguous"),
        ("prelu_single", "F.prelu", r"The size of tensor a \(3\) must match the size of tensor b \(2\)"),
        ("lstm_bf_clf", "torch.lstm", "doesn't match the broadcast shape"),
        ("gru_tm_clf", "torch.gru", "doesn't match the broadcast shape"),
        ("rnn_bf_clf", "torch.rnn_tanh", "doesn't match the broadcast shape"),
        ("lstm_cell", "torch.lstm_cell", "doesn't match the broadcast shape"),
        ("gru_cell", "torch.gru_cell", "doesn't match the broadcast shape"),
        ("act_rrelu", "F.rrelu", "vmap: we do not yet support aten::rrelu_with_noise"),
    ],
)
def test_per_sample_jacobian_fails_under_vmap(name, op, error):
    """The failure each replacement exists for, by its message: any other error (a model that no longer
    builds, a changed op) is not the upstream bug and fails the test."""
    model, (x,) = build(by_name(name))
    with pytest.raises(RuntimeError, match=error):
        _vmap_jacrev(model, x)
        pytest.fail(FIXED_UPSTREAM.format(torch.__version__, op))


@pytest.mark.parametrize(
    "name, op, error",
    [
        ("mha_batch_first", "F.scaled_dot_product_attention", r"derivative for aten::_scaled_dot_product\w* is not implemented"),
        ("act_hardsigmoid", "F.hardsigmoid", "derivative for aten::hardsigmoid_backward is not implemented"),
        ("embedding_bag_sum", "F.embedding_bag", "derivative for '_embedding_bag_backward' is not implemented"),
    ],
)
def test_ops_without_a_double_backward(name, op, error):
    model, (x,) = build(by_name(name))
    with pytest.raises((RuntimeError, NotImplementedError), match=error):
        _plain_double_backward(model, x) if "attention" not in op else _sdpa_double_backward(model, x)
        pytest.fail(FIXED_UPSTREAM.format(torch.__version__, op))


def _plain_double_backward(model, x):
    """∂‖∂f/∂θ‖²/∂θ by plain autograd (the test reference computes embedding_bag by a formula instead)."""
    params = trainable(model)
    grads = torch.autograd.grad(model(x).sum(), params, create_graph=True)
    torch.autograd.grad(sum((g**2).sum() for g in grads), params, allow_unused=True)


def _sdpa_double_backward(model, x):
    out = model(x).sum()
    (g,) = torch.autograd.grad(out, model.attn.in_proj_weight, create_graph=True)
    torch.autograd.grad((g**2).sum(), model.head.weight)


def test_hardsigmoid_first_derivative_is_single_precision():
    x = torch.linspace(-2.9, 2.9, 101, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.hardsigmoid(x).sum(), x)
    error = (g - 1.0 / 6.0).abs().max().item()
    assert error > 1e-12, FIXED_UPSTREAM.format(torch.__version__, "F.hardsigmoid (test reference only)")


def test_functional_call_replaces_the_parameters_of_a_module_registered_twice():
    """torch.func.functional_call's weight tying restores a module reachable under two names in the
    wrong order: afterwards the module holds the substituted (here detached) tensor, not its
    Parameter, and an optimizer would update a Parameter the model no longer uses. mgs_torch swaps
    each (module, attribute) once itself (mgs_torch._problem.call_with)."""
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    weight = shared.weight
    functional_call(model, {k: v.detach() for k, v in model.named_parameters()}, (torch.randn(3, 2),))
    assert shared.weight is not weight and not isinstance(shared.weight, nn.Parameter), FIXED_UPSTREAM.format(
        torch.__version__, "functional_call's tie_weights (mgs_torch._problem.call_with can go back to it)"
    )


@pytest.mark.parametrize("norm", ["batchnorm_eval", "batchnorm_train", "instancenorm"])
def test_cpu_batch_norm_backward_is_wrong_at_batch_size_one_with_channels_last_gradients(norm):
    """Plain autograd, no torch.func: BatchNorm2d (eval and train) and InstanceNorm2d get wrong weight
    gradients at batch size 1 when the gradient reaching them has channels-last strides, as after
    ``flatten(2).transpose(1, 2)`` (a conv stem feeding tokens to a Transformer). mgs_torch's vmapped
    computations are right there; the per-sample reference loops (tests/reference.py and verify) run
    each sample as a batch of two identical copies so that they are right too."""
    torch.manual_seed(0)
    layer = {"batchnorm_eval": nn.BatchNorm2d(4).eval(), "batchnorm_train": nn.BatchNorm2d(4), "instancenorm": nn.InstanceNorm2d(4, affine=True)}[norm]
    layer = layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x, c = torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(1, 16, 4, dtype=torch.float64)

    def loss(batch: int) -> torch.Tensor:  # the first copy's loss, from a batch of `batch` copies
        return ((layer(torch.cat([x] * batch)).flatten(2).transpose(1, 2)[:1]) ** 2 * c).sum()

    autograd = torch.autograd.grad(loss(1), layer.weight)[0]
    with torch.no_grad():
        fd = torch.stack([(loss_at(layer, loss, k, 1e-6)) for k in range(4)])
    assert relative_error(torch.autograd.grad(loss(2), layer.weight)[0], fd) < 1e-6  # two copies: right
    assert relative_error(autograd, fd) > 1e-3, FIXED_UPSTREAM.format(torch.__version__, "(nothing: the reference loops' two copies)")


def loss_at(layer: nn.Module, loss, k: int, eps: float) -> torch.Tensor:
    """Central difference of ``loss(1)`` in entry k of ``layer.weight``."""
    w = layer.weight.data
    old = w[k].item()
    w[k] = old + eps
    hi = loss(1)
    w[k] = old - eps
    lo = loss(1)
    w[k] = old
    return (hi - lo) / (2 * eps)


def test_cpu_instance_norm_backward_is_wrong_at_batch_size_two_with_tokens_into_a_gru():
    """Plain autograd, no torch.func: InstanceNorm2d's CPU kernel (batch_norm on the input reshaped
    to a batch of one) gets its weight gradient wrong when the map is turned into tokens for a GRU,
    at batch size 2 (and 1, 3), whereas a tanh there is fine — it depends on the strides of the
    incoming gradient. mgs_torch replaces instance norm by its formula (mgs_torch.op_fixes); the
    reference loops (tests/reference.py, verify) do the same, written independently."""
    torch.manual_seed(0)
    norm, gru = nn.InstanceNorm2d(1, affine=True).double(), nn.GRU(1, 3, batch_first=True).double()
    with torch.no_grad():
        norm.weight.fill_(1.3)
    x, c = torch.randn(2, 1, 5, 7, dtype=torch.float64), torch.randn(2, 35, 3, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (gru(norm(x).flatten(2).transpose(1, 2))[0] * c).sum()

    autograd = torch.autograd.grad(loss(), norm.weight)[0]
    w = norm.weight.data
    with torch.no_grad():
        w += 1e-6
        hi = loss()
        w -= 2e-6
        lo = loss()
        w += 1e-6
    fd = (hi - lo) / 2e-6
    assert relative_error(autograd, fd.reshape(1)) > 1e-3, FIXED_UPSTREAM.format(torch.__version__, "(nothing: the loops' instance-norm formula)")


def test_vmap_rolls_a_scalar_across_the_batch():
    """``torch.roll(t, 1)`` of a 0-d tensor is the identity; vmap's rule rolls the batch instead, so
    sample i gets sample i−1's value. Found by tests/opinfo_sweep.py; ExactOps returns the scalar."""
    x = torch.arange(3.0)
    assert not torch.equal(vmap(lambda t: torch.roll(t, 1))(x), x), FIXED_UPSTREAM.format(torch.__version__, "torch.roll")


@pytest.mark.parametrize("size, channels", [(2, 3), (3, 6), (5, 6)])
def test_cross_map_lrn2d_backward_is_not_the_derivative_of_its_forward(size, channels):
    """nn.CrossMapLRN2d's old-style autograd.Function has a hand-written backward that disagrees with central
    differences of its own forward wherever a window holds several channels (mgs_torch computes the forward as
    standard ops and lets autograd differentiate it: op_fixes.EXACT_FORWARDS)."""
    torch.manual_seed(0)
    module = nn.CrossMapLRN2d(size, alpha=0.3, beta=0.75, k=1.5)
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    (backward,) = torch.autograd.grad((module(x) * c).sum(), x)
    by_values = torch.zeros_like(x)
    with torch.no_grad():
        for e in range(x.numel()):
            step = torch.zeros_like(x).view(-1)
            step[e] = 1e-6
            step = step.view_as(x)
            by_values.view(-1)[e] = ((module(x + step) - module(x - step)) * c).sum() / 2e-6
    assert relative_error(backward, by_values) > 1e-3, FIXED_UPSTREAM.format(torch.__version__, "nn.CrossMapLRN2d (EXACT_FORWARDS)")


def test_cross_map_lrn2d_backward_fails_at_size_one():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="exceeds dimension size"):
        nn.CrossMapLRN2d(1)(x).sum().backward()


def test_the_fused_fake_quantize_op_has_no_batching_rule():
    """QAT's default qconfigs use FusedMovingAvgObsFakeQuantize, whose op vmap cannot run even with its observer
    off (mgs_torch computes it from the plain fake-quantisation ops: op_fixes.fused_moving_avg_obs_fake_quant)."""
    import torch.ao.quantization as quantization

    fq = quantization.get_default_qat_qconfig("x86").activation()
    fq(torch.randn(8, 4))
    fq.apply(quantization.disable_observer)
    with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::(_fused_moving_avg_obs_fq_helper|fused_moving_avg_obs_fake_quant)"):
        vmap(fq)(torch.randn(3, 2, 4))


@pytest.mark.parametrize("p", [1.0, 2.0, float("inf")])
def test_jacrev_of_cdist_is_wrong(p):
    """torch.func's Jacobian of torch.cdist (vmap over the cotangents of its backward) against central differences;
    the plain autograd derivative agrees with them (mgs_torch computes cdist as a difference and a norm)."""
    from torch.func import jacrev

    torch.manual_seed(0)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    f = lambda t: torch.cdist(t, b, p=p).reshape(-1)  # noqa: E731
    steps = torch.eye(a.numel(), dtype=torch.float64).reshape(-1, *a.shape)
    by_values = torch.stack([(f(a + 1e-6 * e) - f(a - 1e-6 * e)) / 2e-6 for e in steps], -1)
    plain = torch.stack([torch.autograd.grad(f(a.requires_grad_()), a, v)[0].reshape(-1) for v in torch.eye(15, dtype=torch.float64)])
    assert relative_error(plain, by_values) < 1e-8
    assert relative_error(jacrev(f)(a.detach()).reshape(15, -1), by_values) > 0.1, FIXED_UPSTREAM.format(torch.__version__, "torch.cdist")


def test_prelu_double_backward_at_zero_inputs_is_not_the_derivative_of_its_first_derivative():
    """At an input of exactly 0, PyTorch's PReLU derivative with respect to the input is the slope w; the derivative
    of that with respect to w (a double backward) should count those zeros, and PyTorch's does not: the loop's
    penalty gradient uses where(x > 0, x, w·x) instead (mgs_torch._plain_loop)."""
    x = torch.tensor([0.0, 0.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)

    def input_gradient_norm(slope):  # ‖∂ prelu(x) / ∂x‖², a function of the slope alone
        (g,) = torch.autograd.grad(F.prelu(x, slope).sum(), x, create_graph=True)
        return (g**2).sum()

    (autograd,) = torch.autograd.grad(input_gradient_norm(w), w)
    h = 1e-6
    by_values = (input_gradient_norm(w + h) - input_gradient_norm(w - h)) / (2 * h)  # 3 slopes: 2·3·w = 1.8
    assert abs(float(by_values) - 1.8) < 1e-6
    assert abs(float(autograd) - float(by_values)) > 0.1, FIXED_UPSTREAM.format(torch.__version__, "F.prelu (loop formula)")


@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="Inductor's CPU backend needs a C++ compiler")
def test_inductor_differentiates_updated_batch_norm_statistics_wrongly():
    """A train-mode BatchNorm updates its running statistics; a later computation in the same compiled function that
    reads them (here an eval-mode normalisation, as mgs_penalty's default batch_norm="eval") gets the right value
    from Inductor but a gradient 6–8 % off (AOTAutograd without Inductor is exact). mgs_torch therefore computes
    such a call eagerly inside a compiled step (mgs_torch._compiled.eager_reason)."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 3, 3).double(), nn.BatchNorm2d(3).double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)

    def f(x):
        loss = bn(conv(x)).square().mean()  # training mode: batch statistics; the running ones updated in place
        rm, rv = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        z = (conv(x) - rm[:, None, None]) * torch.rsqrt(rv[:, None, None] + bn.eps) * bn.weight[:, None, None]
        return loss + z.square().sum()

    def value_and_gradient(function):
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        value = function(x)
        return value, torch.autograd.grad(value, [conv.weight, bn.weight])

    torch._dynamo.reset()
    try:
        value, grads = value_and_gradient(f)
        by_aot, grads_aot = value_and_gradient(torch.compile(f, backend="aot_eager"))
        by_inductor, grads_inductor = value_and_gradient(torch.compile(f))
    finally:
        torch._dynamo.reset()
    assert abs(float(by_inductor - value)) < 1e-10 and abs(float(by_aot - value)) < 1e-10
    assert all(relative_error(a, e) < 1e-12 for a, e in zip(grads_aot, grads))
    worst = max(relative_error(a, e) for a, e in zip(grads_inductor, grads))
    assert worst > 1e-3, FIXED_UPSTREAM.format(torch.__version__, "nothing; drop _compiled.eager_reason's BatchNorm rule")
