"""verify(), the rule registry's hygiene, stale plans, and the errors that replace raw torch.func failures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_zoo import Lambda, LayerNormSub, Scale, ScaleRule, by_name, build
from reference import kernel_loop, relative_error
from mgs_torch import (
    LayerRule, UnsupportedLayerError, layer_rule, mgs_kernel, mgs_penalty, mgs_trace, register_layer_rule, unregister_layer_rule,
    verify,
)
from mgs_torch.engines import LAYER_RULES
from mgs_torch.engines.factors import DirectFactor


def close(a, b, tol=1e-10):
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-300)


# ----------------------------------------------------------------------------------- verify


def test_verify_reports_errors_routes_and_replaced_ops():
    model, x = build(by_name("encoder_layer_default"))
    report = verify(model.float(), tuple(t.float() for t in x))
    assert report.ok and report.kernel_error < 1e-12 and report.gradient_error < 1e-12
    assert report.routes["layer.linear1.weight"] == "rule:Linear"
    assert report.routes["layer.self_attn.in_proj_weight"] == "rule:MultiheadAttention"
    assert {"layer_norm", "multi_head_attention_forward"} <= set(report.replaced_ops)
    text = str(report)
    assert "OK" in text and "rule:LayerNorm" in text


class _Gain(nn.Module):
    """A parameter no layer rule covers: its per-sample gradients come from the reference engine."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.5, -0.5]))

    def forward(self, x):
        return x * self.gain


class _ExtraOnALinear(nn.Module):
    """A Linear holding one more Parameter that its parent uses: the Linear rule covers weight and bias only."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.a.extra = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.3]))

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) * self.a.extra))


def test_verify_names_the_reference_route_of_a_parameter_no_rule_covers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2), _Gain()).double()
    report = verify(model, torch.randn(4, 3, dtype=torch.float64), strategy="structured")
    assert report.ok, str(report)
    assert report.routes["0.weight"] == "rule:Linear"
    assert report.routes["5.gain"].startswith("reference: ")
    # a parameter the rule of its own module does not know
    extra = _ExtraOnALinear().double()
    report = verify(extra, torch.randn(4, 3, dtype=torch.float64), strategy="structured")
    assert report.ok, str(report)
    assert report.routes["a.weight"] == "rule:Linear"
    assert report.routes["a.extra"] == "reference: Linear.extra is not covered by its rule"


def test_verify_runs_ops_without_a_double_backward_as_formulas_for_the_gradient_check():
    model, x = build(by_name("embedding_bag_sum"))
    report = verify(model, x)
    assert report.ok and report.kernel_error < 1e-12 and report.gradient_error < 1e-12
    assert report.gradient_check == "autograd"
    assert any("no double backward for embedding_bag" in note for note in report.notes)


class DetachedLinearRule(LayerRule):
    """A Linear (no bias) rule whose per-sample gradients are right but cut from the graph: K is exact, the
    penalty gradient misses everything that flows through this layer's factors."""

    params = ("weight",)
    leading_dims_are_positions = True

    def factors(self, module, saved, grad, names):
        (a,) = saved
        k, n = grad.shape[:2]
        return {"weight": DirectFactor(torch.einsum("kno,ni->knoi", grad.reshape(k, n, -1), a.reshape(n, -1)).flatten(2).detach())}


def _bag_model_with_a_detached_head():
    torch.manual_seed(0)
    model, x = build(by_name("embedding_bag_sum"))
    model.head = nn.Linear(3, model.head.out_features, bias=False).double()
    return model, x


def test_verify_formulas_catch_a_wrong_penalty_gradient():
    model, x = _bag_model_with_a_detached_head()
    with layer_rule(nn.Linear, DetachedLinearRule()):
        report = verify(model, x, strategy="structured")
    assert report.gradient_check == "autograd" and report.kernel_error < 1e-12
    assert not report.ok and report.gradient_error > 0.01, str(report)


@pytest.fixture
def reference_runs_out_of_memory(monkeypatch):
    """The reference's double backward, (J²).sum() differentiated, raises the CPU allocator's error once."""
    real_grad = torch.autograd.grad
    calls = {"failed": False}

    def grad(outputs, inputs, *args, **kwargs):  # the first first-order scalar gradient is the reference's (J²).sum()
        if not (calls["failed"] or args or kwargs.get("create_graph")) and kwargs.get("allow_unused") and outputs.dim() == 0:
            calls["failed"] = True
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


def test_verify_checks_by_finite_differences_when_the_reference_runs_out_of_memory(reference_runs_out_of_memory):
    """A big model's reference double backward can exhaust memory: the gradient is then checked by finite
    differences (first-order loops only), and the note says why, rather than blaming an op."""
    report = verify(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 3))
    assert reference_runs_out_of_memory["failed"] and report.failure is None, str(report)
    assert report.ok and report.kernel_error < 1e-12 and report.gradient_error < 1e-7
    assert report.gradient_check == "finite differences" and report.gradient_tolerance == 1e-4
    assert any("ran out of memory" in note and "finite differences" in note for note in report.notes)
    assert "central finite differences" in str(report)


def test_verify_checks_big_models_whose_loop_with_a_graph_does_not_fit(monkeypatch):
    """Where even the loop that keeps its graph runs out of memory, K comes from a loop without one and the
    gradient from finite differences; the model is not reported as failing."""
    import sys

    module = sys.modules["mgs_torch.verify"]
    real_row = module._gradient_row

    def row(output, params, create_graph):
        if create_graph:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_row(output, params, create_graph)

    monkeypatch.setattr(module, "_gradient_row", row)
    torch.manual_seed(0)
    report = verify(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 3))
    assert report.failure is None and report.ok, str(report)
    assert report.kernel_error < 1e-12 and report.gradient_check == "finite differences" and report.gradient_error < 1e-7
    assert any("ran out of memory" in note for note in report.notes)


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB", "some op has no derivative"])
def test_verify_reports_rather_than_raises_when_the_penalty_itself_fails(monkeypatch, message):
    import sys

    def penalty(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(sys.modules["mgs_torch.verify"], "mgs_penalty", penalty)
    report = verify(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 3))
    assert report.kernel_error < 1e-12 and report.gradient_error is None
    if "memory" in message:  # a resource limit of this check, not a fault of the model: K stands, the gradient is unchecked
        assert report.failure is None and report.gradient_check == "not checked"
        assert any("ran out of memory" in note for note in report.notes)
    else:
        assert not report.ok and "the penalty's gradient fails" in report.failure


def test_verify_does_not_blame_mgs_torch_where_tr_k_jumps_under_finite_differences(reference_runs_out_of_memory):
    """A bias-free convolution over a blank region and a fresh BatchNorm (shift 0) feed ReLUs exactly 0 and
    max-pools ties; moving the shift makes J, hence tr K, jump, so finite differences say nothing (autograd
    agrees to 1e-15 there)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2),
    )
    x = torch.randn(2, 1, 8, 8)
    x[:, :, :6, :6] = 0.0
    report = verify(model, x)
    assert report.failure is None and report.kernel_error < 1e-12, str(report)
    assert report.gradient_check == "not checked" and report.gradient_error is None, str(report)
    assert any("inconclusive" in note and "not smooth" in note for note in report.notes)
    assert verify(model, x).gradient_error < 1e-12  # the autograd loop, where it runs, settles it


def test_verify_reports_a_check_that_runs_out_of_memory_anywhere(monkeypatch):
    import sys

    def relative(a, b):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(sys.modules["mgs_torch.verify"], "_relative", relative)
    report = verify(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 3))
    assert report.failure is None and not report.ok and report.kernel_error is None
    assert any("ran out of memory before it finished" in note for note in report.notes)


def test_verify_does_not_use_finite_differences_on_a_forward_that_casts_to_float32(reference_runs_out_of_memory):
    class CastsToFloat32(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).float().to(x.dtype))

    report = verify(CastsToFloat32(), torch.randn(3, 3))
    assert report.failure is None and report.kernel_error is not None and report.gradient_check == "not checked"
    assert any("computes in float32, too coarse" in note for note in report.notes)


def test_verify_finite_differences_catch_a_wrong_penalty_gradient(reference_runs_out_of_memory):
    model, x = _bag_model_with_a_detached_head()
    with layer_rule(nn.Linear, DetachedLinearRule()):
        report = verify(model, x, strategy="structured")
    assert report.gradient_check == "finite differences" and report.kernel_error < 1e-12
    assert not report.ok and report.gradient_error > 0.01, str(report)


def test_verify_takes_params_given_as_the_models_own_modules_parameters_or_callables():
    """verify works on a copy of the model: a filter naming the user's own objects must still select them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 3)
    for params in ([model[2]], [model[2].weight, model[2].bias], lambda name, p: p is model[2].weight or p is model[2].bias, "2"):
        report = verify(model, x, params=params)
        assert report.failure is None and report.ok, str(report)
        assert set(report.routes) == {"2.weight", "2.bias"}


def test_verify_is_right_where_pytorch_differentiates_hardsigmoid_in_single_precision():
    """PyTorch's CPU hardsigmoid derivative is a float32 1/6 even in float64: a loop using it put timm's
    HardCoReNAS 1.2e-8 off, over the tolerance, though mgs_torch was right. The loop uses the formula."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Hardsigmoid(), nn.Linear(8, 2))
    report = verify(model, torch.randn(4, 3))
    assert report.ok and report.kernel_error < 1e-14 and report.gradient_error < 1e-14, str(report)


def test_verify_catches_a_wrong_rule():
    class WrongLinearRule(LayerRule):  # forgets the bias entirely and doubles the weight's gradient
        params = ("weight", "bias")
        leading_dims_are_positions = True

        def factors(self, module, saved, grad, names):
            (a,) = saved
            k, n = grad.shape[:2]
            g = torch.einsum("kno,ni->knoi", grad.reshape(k, n, -1), a.reshape(n, -1)) * 2
            return {"weight": DirectFactor(g.flatten(2))}

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with layer_rule(nn.Linear, WrongLinearRule()):
        report = verify(model, torch.randn(3, 3))
    assert not report.ok and report.kernel_error > 0.1
    assert "PROBLEM" in str(report)


class Unique(nn.Module):
    """Uses torch.unique: dynamic shape (no per-sample vmap, so the whole-batch route) and no derivative."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + torch.unique(h).sum()


def test_verify_names_the_layer_that_fails():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the whole-batch route's warning
        report = verify(Unique(), torch.randn(3, 3))
    assert not report.ok and "unique" in report.failure
    assert report.routes["a.weight"].startswith("FAILS")


def test_unsupported_ops_raise_an_error_that_says_what_to_do():
    for strategy in ("jacobian", "structured"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(UnsupportedLayerError, match=r"(?s)derivative for '_unique2'.*verify"):
                mgs_kernel(Unique(), torch.randn(3, 3), strategy=strategy)


def test_no_batching_rule_warnings_reach_the_user():
    model, x = build(by_name("bilinear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgs_kernel(model, x)


# ----------------------------------------------------------------------------------- registry


class WrongScaleRule(ScaleRule):
    def factors(self, module, saved, grad, names):
        (a,) = saved
        return {"weight": DirectFactor(3 * grad * a)}


def scale_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).double(), torch.randn(4, 3, dtype=torch.float64)


def test_registering_or_removing_a_rule_takes_effect_at_once(no_self_check):
    model, x = scale_model()
    expected = kernel_loop(model, x)
    assert close(mgs_kernel(model, x), expected)  # planned without a rule: reference for Scale
    register_layer_rule(Scale, WrongScaleRule())
    try:
        assert not close(mgs_kernel(model, x), expected, 1e-3)  # the new (deliberately wrong) rule is used at once
        register_layer_rule(Scale, ScaleRule())
        assert close(mgs_kernel(model, x), expected)
    finally:
        unregister_layer_rule(Scale)
    assert Scale not in LAYER_RULES
    with pytest.raises(KeyError):
        unregister_layer_rule(Scale)


def test_register_layer_rule_as_decorator_and_context_manager(no_self_check):
    model, x = scale_model()
    expected = kernel_loop(model, x)

    @register_layer_rule(Scale)
    class DecoratedRule(ScaleRule):
        pass

    try:
        assert isinstance(LAYER_RULES[Scale], DecoratedRule)
        assert close(mgs_kernel(model, x), expected)
    finally:
        unregister_layer_rule(Scale)
    with layer_rule(nn.Linear, None):  # no rule for Linear inside the block: everything on the reference
        assert nn.Linear not in LAYER_RULES
        assert close(mgs_kernel(model, x), expected)
    assert nn.Linear in LAYER_RULES
    with layer_rule(Scale, WrongScaleRule()):
        assert not close(mgs_kernel(model, x), expected, 1e-3)
    assert Scale not in LAYER_RULES


# ----------------------------------------------------------------------------------- stale plans


class Reuse(nn.Module):
    """A Python flag makes the forward use the first layer's weight a second time, functionally."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.reuse = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reuse:
            h = torch.tanh(F.linear(h, self.a.weight))
        return self.head(h)


@pytest.mark.parametrize("quantity", ["kernel", "trace"])
def test_a_cached_plan_is_rebuilt_when_the_forward_starts_reusing_a_weight(quantity):
    torch.manual_seed(0)
    model = Reuse().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    compute = (lambda: mgs_kernel(model, x)) if quantity == "kernel" else (lambda: mgs_trace(model, x))
    expect = (lambda: kernel_loop(model, x)) if quantity == "kernel" else (lambda: kernel_loop(model, x).trace())
    assert close(compute(), expect())
    model.reuse = True  # same signature, different use of a.weight
    assert close(compute(), expect())
    model.reuse = False
    assert close(compute(), expect())


class CallsChange(nn.Module):
    """A Python flag makes the forward call its first layer twice, or skip it, with the same shapes throughout."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.calls = 1

    def forward(self, x):
        for _ in range(self.calls):
            x = torch.tanh(self.a(x))
        return self.head(x)


@pytest.mark.parametrize("calls", [2, 0])
def test_a_cached_plan_is_rebuilt_when_a_layer_runs_twice_or_not_at_all(calls):
    torch.manual_seed(0)
    model = CallsChange().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert close(mgs_kernel(model, x, strategy="structured"), kernel_loop(model, x))
    model.calls = calls  # same key, same shapes: the plan is stale
    assert close(mgs_kernel(model, x, strategy="structured"), kernel_loop(model, x))
    assert close(mgs_trace(model, x, strategy="structured"), kernel_loop(model, x).trace())


class ReuseWithDropout(Reuse):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return super().forward(self.drop(x))


def test_a_plan_rebuilt_mid_call_keeps_the_dropout_masks_model_x_would_draw():
    """A cached plan found stale during the forward is rebuilt and the call computed again from the random state it
    started with: the same masks as a call that found nothing stale, from the same seed."""
    torch.manual_seed(0)
    model = ReuseWithDropout().double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    mgs_kernel(model, x, strategy="structured")
    model.reuse = True  # same key, the plan is stale
    torch.manual_seed(1)
    rebuilt = mgs_kernel(model, x, strategy="structured")
    torch.manual_seed(1)
    assert close(rebuilt, mgs_kernel(model, x, strategy="structured"))  # the plan is fresh now


class ReuseInAList(Reuse):
    """The first layer's weight also enters an op as an element of a list (torch.cat), outside the layer."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mixed = torch.cat([self.a.weight, self.a.weight], dim=0).sum(0)  # (4,): a.weight outside a's forward
        return self.head(h * mixed)


@pytest.mark.parametrize("strategy", ["structured", "auto"])
def test_a_weight_used_elsewhere_inside_a_list_is_seen(strategy):
    """The use monitor looks one level into list arguments: a.weight also reaches J through torch.cat, which a's
    rule does not describe, so a goes to the reference engine and K is exact."""
    torch.manual_seed(0)
    model = ReuseInAList().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert close(mgs_kernel(model, x, strategy=strategy), kernel_loop(model, x))
    assert close(mgs_trace(model, x, strategy=strategy), kernel_loop(model, x).trace())


def test_embedding_max_norm_is_refused_before_the_weight_is_touched():
    emb = nn.Embedding(5, 3, max_norm=0.1)
    with torch.no_grad():
        emb.weight.mul_(10)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 2))
    before = emb.weight.detach().clone()
    with pytest.raises(UnsupportedLayerError, match="max_norm"):
        mgs_kernel(model, torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(emb.weight, before)


# ----------------------------------------------------------------------------------- float32 and refusals


@pytest.mark.parametrize("name", ["lstm_bf_tagger", "lstm_tm_clf", "gru_tm_clf", "rnn_bf_clf", "lstm_cell", "encoder_layer_default"])
@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_recurrent_and_attention_layers_in_float32(name, strategy):
    model, x = build(by_name(name))
    expected = kernel_loop(model, x)  # float64 reference
    model32, x32 = copy.deepcopy(model).float(), tuple(t.float() for t in x)
    K = mgs_kernel(model32, x32, strategy=strategy)
    assert K.dtype == torch.float32 and close(K.double(), expected, 1e-5)
    penalty = mgs_penalty(model32, x32, strategy=strategy)
    grads = torch.autograd.grad(penalty, [p for p in model32.parameters()], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_activation_checkpointing_is_refused_with_advice():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))

    with pytest.raises(UnsupportedLayerError, match="chunk_size"):
        mgs_kernel(Checkpointed(), torch.randn(3, 4), strategy="jacobian")


# ----------------------------------------------------------------------------------- cached output shapes


class Heads(nn.Module):
    """A Python flag switches between a 2-output and a 3-output head (same parameters, same signature)."""

    def __init__(self):
        super().__init__()
        self.body, self.two, self.three = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 3)
        self.wide = False

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.three(h) if self.wide else self.two(h)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_a_cached_output_shape_is_rebuilt_when_the_forward_changes(strategy):
    torch.manual_seed(0)
    model = Heads().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    for wide in (False, True, False, True):
        model.wide = wide
        expected = kernel_loop(model, x)
        assert close(mgs_kernel(model, x, strategy=strategy), expected)
        assert close(mgs_trace(model, x, strategy=strategy), expected.trace())
        value = mgs_penalty(model, x, strategy=strategy, reduction="sum")
        assert torch.isclose(value, expected.trace())
        assert mgs_trace(model, x, strategy=strategy, estimator="hutchinson").isfinite()


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_the_validation_forward_runs_once_per_shape_and_outputs_are_still_checked(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    from mgs_torch import _problem

    calls = []
    real = _problem.validated_output_shape
    try:
        _problem.validated_output_shape = lambda problem: calls.append(1) or real(problem)
        for _ in range(3):
            mgs_kernel(model, x, strategy=strategy)
    finally:
        _problem.validated_output_shape = real
    assert len(calls) <= 1  # the first call of this test may find the shape cached by an earlier one
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):  # the engine validates its own forward's outputs
        mgs_kernel(model, x, strategy=strategy)


def test_only_provably_row_wise_sequentials_skip_the_per_sample_vmap():
    from mgs_torch._guards import preserved_state
    from mgs_torch._problem import build_problem
    from mgs_torch.engines import structured

    def plan(model, x):
        with preserved_state(model, "eval"):
            return structured.plan(build_problem(model, x))

    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    rowwise = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Dropout(0.2), nn.Linear(8, 3)).double().eval()
    assert plan(rowwise, x).rowwise
    assert not structured._is_rowwise(nn.Sequential(nn.Flatten(0), nn.Linear(48, 3)))  # would fold the batch
    assert not structured._is_rowwise(nn.Sequential(LayerNormSub(4)))  # a subclass may do anything
    permuting = nn.Sequential(nn.Flatten(), Lambda(lambda h: h.flip(0)), nn.Linear(16, 3)).double()
    hooked = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    hooked[0].register_forward_hook(lambda m, a, out: out.flip(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both reorder the batch, so "samples interact" (tested below)
        assert not plan(permuting, x).rowwise  # an unknown module: the vmapped forward, which is exact
        assert close(mgs_kernel(permuting, x), kernel_loop(permuting, x))
        assert not plan(hooked, x).rowwise
        assert close(mgs_kernel(hooked, x), kernel_loop(hooked, x))
    assert close(mgs_kernel(rowwise, x), kernel_loop(rowwise, x))


def test_rnn_weight_pointers_are_readable_inside_mgs_computations():
    """nn.LSTM/GRU/RNN on CUDA call ``data_ptr()`` on their (functionally swapped) weights in
    flatten_parameters; a torch.func wrapper has no storage and raised there (seen on an H200).
    Inside ExactOps the pointer of a wrapper reads as 0, so the aliasing check leaves them alone."""
    from torch.func import grad, vmap

    from mgs_torch.op_fixes import ExactOps

    weights = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="storage"):
        vmap(lambda w: torch.tensor(float(w.data_ptr())))(weights)
    with ExactOps():
        pointers = vmap(lambda w: torch.tensor(float(w.data_ptr())))(weights)
        inner = grad(lambda w: (w * w.data_ptr()).sum())(weights[0])
    assert pointers.eq(0).all() and inner.eq(0).all()
    assert weights.data_ptr() != 0  # plain tensors keep their real pointer


@pytest.mark.parametrize(
    "dims, x_shape, w_shape, options",
    [
        (2, (2, 4, 7, 6), (6, 2, 3, 2), dict(stride=2, padding=1, groups=2)),
        (2, (2, 3, 8, 8), (4, 3, 2, 2), dict(padding="same", dilation=2)),
        (2, (2, 3, 8, 8), (4, 3, 3, 3), dict(padding="valid", stride=(2, 1))),
        (1, (2, 3, 9), (5, 3, 4), dict(stride=3, padding=2, dilation=2)),
        (3, (1, 2, 5, 4, 4), (3, 2, 2, 3, 2), dict(stride=(1, 2, 1), padding=(1, 0, 1))),
        (2, (3, 7, 7), (2, 3, 3, 3), dict(padding=1)),  # unbatched input
    ],
)
def test_transposed_convolution_backward_is_the_convolution_to_second_order(dims, x_shape, w_shape, options):
    """The opt-in convolution of op_fixes: F.convNd's values, and first and second derivatives that
    match finite differences (gradcheck, gradgradcheck), for strides, 'same'/'valid', dilation, groups."""
    from mgs_torch.op_fixes import _convolution

    torch.manual_seed(0)
    x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*w_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True)
    ours = lambda x, w, b: _convolution(dims)(x, w, b, **options)  # noqa: E731
    reference = getattr(torch.nn.functional, f"conv{dims}d")
    assert torch.allclose(ours(x, w, b), reference(x, w, b, **options), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x, w, b)) and torch.autograd.gradgradcheck(ours, (x, w, b))


@pytest.mark.parametrize(
    "error",
    [RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 GB"),
     torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")],
    ids=["cpu", "cuda"],
)
def test_out_of_memory_is_not_blamed_on_the_layer(error):
    """Running out of memory keeps its own error type (so `except torch.cuda.OutOfMemoryError` works),
    gains a note on what bounds the memory, and is never reported as an unsupported layer."""

    class Hungry(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            raise error

    for call in (lambda m, x: mgs_kernel(m, x), lambda m, x: mgs_penalty(m, x)):
        with pytest.raises(type(error)) as caught:
            call(Hungry(), torch.randn(4, 3))
        assert not isinstance(caught.value, UnsupportedLayerError)
        assert any("chunk_size" in note and "hutchinson" in note for note in caught.value.__notes__)
        error.__notes__.clear()


# ------------------------------------------------------------------- samples that interact


def _interacting_models():
    """Forwards whose output for sample i depends on other samples: a per-sample K is of another function."""
    return {
        "batch_centred": build(by_name("batch_centred_whole_batch"))[0],
        "softmax_over_batch": nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), Lambda(lambda h: h.softmax(0))).double(),
        "sorted_over_batch": nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), Lambda(lambda h: h.sort(0).values)).double(),
    }


@pytest.mark.parametrize("name", ["batch_centred", "softmax_over_batch", "sorted_over_batch"])
@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
@pytest.mark.parametrize("n", [2, 4])
def test_interacting_samples_are_reported_and_batch_mode_differentiates_the_batch(name, strategy, n):
    from mgs_torch import _warnings

    model = _interacting_models()[name]
    x = torch.randn(n, 3, dtype=torch.float64)  # two samples interact already
    key = f"samples-interact-{type(model).__qualname__}"
    _warnings._warned.discard(key)
    with pytest.warns(RuntimeWarning, match="samples interact") as caught:
        K = mgs_kernel(model, x, strategy=strategy)
    assert "batch_norm='batch'" in str(caught[0].message)
    assert close(K, kernel_loop(model, x, batch_of_one=True))  # still the documented per-sample kernel (each sample alone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, never per step
        mgs_kernel(model, x, strategy=strategy)
        whole = mgs_kernel(model, x, strategy=strategy, batch_norm="batch")
    assert close(whole, kernel_loop(model, x, whole_batch=True))
    assert not close(whole, K)
    report = verify(model, x)
    assert not report.ok and report.samples_interact > 1e-3 and "samples interact" in str(report)


def test_no_model_of_the_audit_is_taken_for_an_interacting_one():
    """The check's threshold (√ε of the outputs' dtype) against rounding: every per-sample model of the
    zoo, in float64 and float32, compares equal batched and alone; the interacting ones do not."""
    from model_zoo import CASES
    from mgs_torch._guards import preserved_state
    from mgs_torch._problem import build_problem

    flagged = {}
    for case in CASES:
        if case.refused is not None:
            continue
        for dtype in (torch.float64, torch.float32):
            model, x = build(case)
            model = model.to(dtype)
            x = tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
            policy = case.kernel_kwargs.get("batch_norm", "eval")
            with preserved_state(model, policy), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                problem = build_problem(model, x, batch_norm=policy, revalidate=True)
            if problem.samples_interact is not None:
                flagged[case.name, str(dtype)] = problem.samples_interact
    assert set(name for name, _ in flagged) == {"batch_centred_whole_batch"}, flagged


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_a_module_registered_twice_keeps_its_parameters_and_trains(strategy):
    """torch.func.functional_call left such a module holding a detached tensor instead of its
    Parameter (tests/test_upstream_bugs.py): the optimizer's step then no longer reached the model."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight, before = shared.weight, shared.weight.detach().clone()
    x = torch.randn(5, 3)
    mgs_kernel(model, x, strategy=strategy)
    loss = model(x).square().mean() + 0.1 * mgs_penalty(model, x, strategy=strategy)
    loss.backward()
    opt.step()
    assert shared.weight is weight and isinstance(model[4].weight, nn.Parameter)
    assert not torch.equal(shared.weight.detach(), before)  # the step reached the layer the model uses


def test_verify_is_right_where_plain_autograd_at_batch_size_one_is_not():
    """A conv stem feeding tokens to a Transformer: the reference loop would hit PyTorch's CPU
    batch_norm backward bug at batch size one and report a problem that is not mgs_torch's."""
    model, x = build(by_name("conv_stem_tokens"))
    report = verify(model, x, samples=3)
    assert report.ok, str(report)


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_backward_hooks_do_not_change_k_and_still_fire_in_training(strategy):
    """Module backward hooks act on training gradients: K is the true Jacobian whatever they do
    (torch.func could not even run them before), and they are back in place for the user's backward."""
    torch.manual_seed(0)
    clean = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    hooked = copy.deepcopy(clean)
    K = kernel_loop(clean, x)
    expected = torch.autograd.grad(mgs_penalty(clean, x, strategy=strategy), list(clean.parameters())[:3])
    calls = []
    handles = [
        hooked[0].register_full_backward_hook(lambda m, gi, go: calls.append("full") or tuple(None if g is None else 2 * g for g in gi)),
        hooked[2].register_full_backward_pre_hook(lambda m, go: calls.append("pre") or (go[0] * 3,)),
        torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append("global")),
    ]
    try:
        assert close(mgs_kernel(hooked, x, strategy=strategy), K)
        value = mgs_penalty(hooked, x, strategy=strategy)
        grads = torch.autograd.grad(value, list(hooked.parameters())[:3])  # the output bias does not move K
        assert all(close(a, b) for a, b in zip(grads, expected))
        assert calls == []  # none ran inside the MGS computation or its backward
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PyTorch's note that the first layer's input needs no grad
            hooked(x).sum().backward()
        assert {"full", "pre", "global"} <= set(calls)  # the user's own backward still runs them
    finally:
        for h in handles:
            h.remove()
    assert not torch.nn.modules.module._global_backward_hooks


def test_verify_is_right_for_instance_norm_before_tokens():
    """InstanceNorm's CPU kernel is a batch_norm on a batch of one: plain autograd gets the gradients
    upstream of it wrong when the map is then turned into tokens; verify's loop must not."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.norm = nn.PReLU(1), nn.InstanceNorm2d(1, affine=True)
            self.rnn, self.head = nn.GRU(1, 3, batch_first=True), nn.Linear(35 * 3, 2)

        def forward(self, x):
            h = self.norm(self.act(x)).flatten(2).transpose(1, 2)
            return self.head(self.rnn(h)[0].flatten(1))

    report = verify(Tokens(), torch.randn(3, 1, 5, 7), samples=3)
    assert report.ok, str(report)


def test_a_data_dependent_forward_gets_the_whole_batch_jacobian_with_a_warning():
    """Mixture-of-experts routing by boolean-mask indexing cannot run under a per-sample vmap: instead
    of refusing, mgs_torch differentiates the whole-batch function (the one model(X) trains) and says
    so once; chunked, Hutchinson and verify take the same route."""
    import mgs_torch._warnings

    model, x = build(by_name("data_dependent_routing"))
    K_ref = kernel_loop(model, x, whole_batch=True)
    mgs_torch._warnings._warned.discard("whole-batch-DataDependent")  # issued once per class and process
    with pytest.warns(RuntimeWarning, match=r"cannot run one sample at a time.*boolean mask.*whole-batch function"):
        K = mgs_kernel(model, x)
    assert torch.allclose(K, K_ref, rtol=1e-10, atol=1e-12)
    plain = torch.autograd.grad(mgs_penalty(model, x), list(model.parameters()), allow_unused=True)
    chunked = torch.autograd.grad(mgs_penalty(model, x, chunk_size=1), list(model.parameters()), allow_unused=True)
    for a, b, p in zip(plain, chunked, model.parameters()):  # an expert no sample picked has no gradient
        assert torch.allclose(torch.zeros_like(p) if a is None else a, torch.zeros_like(p) if b is None else b, rtol=1e-10, atol=1e-13)
    probes = mgs_trace(model, x, estimator="hutchinson", num_probes=4000, generator=torch.Generator().manual_seed(0))
    assert abs(float(probes) / float(K_ref.trace()) - 1) < 0.05
    report = verify(model, x, samples=3)
    assert report.ok and any("whole-batch function" in note for note in report.notes), report


class _UpcastRMSNorm(nn.Module):
    """LLaMA's RMSNorm: computes in float32 whatever the input dtype, then casts back."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


def test_verify_checks_a_model_with_float32_casts_to_float32_rounding_and_says_so():
    """A Hugging Face LLaMA classifier failed verify at 7e-8 (tolerance 1e-8): its RMSNorm and rotary
    embeddings compute in float32 even in the float64 copy, and with those casts removed both
    computations agreed to 5e-16. The report now says so and checks to float32's rounding."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)
    upcast = nn.Sequential(nn.Linear(5, 6), _UpcastRMSNorm(6), nn.Tanh(), nn.Linear(6, 2))
    report = verify(upcast, x, samples=3)
    assert report.ok and report.tolerance == pytest.approx(100 * torch.finfo(torch.float32).eps)
    assert any("computes some ops in float32" in note for note in report.notes), report
    plain = verify(nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 2)), x, samples=3)
    assert plain.ok and plain.tolerance == 1e-8 and not any("float32" in note for note in plain.notes)


def test_verify_handles_outputs_that_do_not_depend_on_the_parameters():
    """A thresholded output (no grad_fn at all) made verify's own loop raise; K is 0 and so is its gradient."""

    class Thresholded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return (self.a(x) > 0).to(x.dtype)

    report = verify(Thresholded(), torch.randn(4, 3))
    assert report.ok and report.kernel_error == 0 and report.gradient_error == 0, report


def test_a_per_sample_scalar_roll_is_the_identity_inside_mgs():
    """A model that handles each sample in a loop and rolls a per-sample scalar: under vmap that roll
    moved values between samples (upstream bug, see test_upstream_bugs); K must match the loop."""

    class ScalarRoll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(1, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(torch.stack([torch.roll(h[i, 0] * h[i, 1], 1) for i in range(x.shape[0])])[:, None])

    torch.manual_seed(0)
    model, x = ScalarRoll().double(), torch.randn(3, 3, dtype=torch.float64)
    for strategy in ("jacobian", "structured"):
        assert relative_error(mgs_kernel(model, x, strategy=strategy), kernel_loop(model, x)) < 1e-12


def test_per_model_caches_keep_at_most_their_size_and_drop_the_oldest():
    """Plans and output shapes are cached per model and key: a model called on ever new shapes must not grow them
    without bound, and a key written again is updated in place (it does not push an older one out)."""
    from mgs_torch._problem import PerModelCache

    cache, model = PerModelCache(size=3), nn.Linear(2, 2)
    for key in range(5):
        cache.put(model, key, f"value {key}")
    assert [cache.get(model, k) for k in range(5)] == [None, None, "value 2", "value 3", "value 4"]
    cache.put(model, 3, "updated")
    assert [cache.get(model, k) for k in (2, 3, 4)] == ["value 2", "updated", "value 4"]


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "auto"])
def test_dropout_in_training_is_not_taken_for_interacting_samples(strategy):
    """Each sample draws its own Dropout mask, so its outputs alone differ from its outputs in the batch:
    the interaction check must not run on random forwards (no warning, the per-sample route)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K = mgs_kernel(model, torch.randn(5, 3, dtype=torch.float64), strategy=strategy)
    assert K.shape == (10, 10)
