"""The self-check on first use (mgs_torch.self_check): when it runs, what it catches, what it costs nothing.

Most tests here make mgs_torch wrong on purpose — a wrong layer rule, or one of the bugs fixed in op_fixes and
_problem patched back in ("replays") — and check that the self-check alone notices before a number is returned.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgs_torch
from model_zoo import Scale
from reference import kernel_loop, relative_error
from mgs_torch import SelfCheckError, layer_rule, mgs_kernel, mgs_penalty, mgs_trace, self_check_reports, set_self_check
from mgs_torch.op_fixes import REPLACED_OPS
from test_trust import WrongScaleRule, scale_model

D = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double(), torch.randn(4, 3, dtype=D)


def test_the_check_runs_once_per_route_and_reports_what_it_compared():
    model, x = mlp()
    mgs_kernel(model, x)
    mgs_kernel(model, x)
    (report,) = self_check_reports(model)
    assert report.outcome == "ok" and set(report.errors) == {"rows", "kernel"} and max(report.errors.values()) < 1e-12
    assert report.samples == 2 and report.dtype == torch.float64 and report.tolerance == 1e-6
    mgs_penalty(model, x).backward()  # the gradient had not been checked yet
    assert self_check_reports(model)[-1].gradient_check == "autograd" and self_check_reports(model)[-1].errors["gradient"] < 1e-12
    mgs_penalty(model, x)
    mgs_trace(model, x)
    assert len(self_check_reports(model)) == 2


def test_a_changed_forward_is_checked_again():
    model, x = mlp()
    mgs_kernel(model, x)
    with torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None):
        mgs_kernel(model, x)
    assert len(self_check_reports(model)) == 2


def test_it_can_be_switched_off():
    model, x = mlp()
    set_self_check(False)
    try:
        mgs_kernel(model, x)
    finally:
        set_self_check(True)
    assert self_check_reports(model) == []


@pytest.mark.self_check_switch  # a rule made wrong on purpose: the switch is what the test checks
def test_a_wrong_rule_is_caught_and_the_reference_engine_used_instead():
    """A user's rule registered after a first call: the rebuilt plan is checked, fails, and the reference engine
    (which passes) computes K from then on, with one warning."""
    model, x = scale_model()
    mgs_kernel(model, x)
    with layer_rule(Scale, WrongScaleRule()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = mgs_kernel(model, x, strategy="structured")
    assert relative_error(K, kernel_loop(model, x)) < 1e-12
    assert self_check_reports(model)[-1].outcome == "switched to the reference engine"
    assert any("reference engine" in str(w.message) for w in caught)


def _old_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The replacement before it converted boolean masks (the math kernel adds them as 1/0)."""
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


def _old_hardsigmoid(input, inplace=False):
    return torch.clamp(input / 6.0 + 0.5, 0.0, 1.0)  # inplace ignored


@pytest.mark.parametrize("replay", ["boolean attention mask", "inplace activation"])
@pytest.mark.parametrize("strategy", ["jacobian", "auto"])
def test_replays_of_wrong_op_replacements_are_caught_before_a_number_is_returned(monkeypatch, replay, strategy):
    """Issue classes 1 and 2 patched back in: the reference engine runs the same replacement, so no route passes
    and SelfCheckError says so (with the way to compute anyway)."""
    from test_faithful_forwards import InPlaceActivation, MaskedAttention, padded_batch

    torch.manual_seed(0)
    if replay == "boolean attention mask":
        monkeypatch.setitem(REPLACED_OPS, F.scaled_dot_product_attention, _old_sdpa)
        model, inputs = MaskedAttention().double(), padded_batch()
    else:
        monkeypatch.setitem(REPLACED_OPS, F.hardsigmoid, _old_hardsigmoid)
        model, inputs = InPlaceActivation("hardsigmoid").double(), 3 * torch.randn(4, 3, dtype=D)
    with pytest.raises(SelfCheckError, match=r"set_self_check\(False\)") as info:
        mgs_kernel(model, inputs, strategy=strategy)
    assert info.value.report.errors["rows"] > 1e-3
    assert str(info.value) == info.value.args[0]  # the message alone, not a tuple with the report


def test_a_replay_of_the_spectral_norm_state_bug_is_caught(monkeypatch):
    """Issue class 4 patched back in (every internal forward runs another power iteration): the loop, which calls
    the model itself from its current state, disagrees."""
    from mgs_torch import _problem
    from test_faithful_forwards import spectral_model

    real = _problem.validated_output_shape
    monkeypatch.setattr(_problem, "validated_output_shape", lambda problem: real(problem)[:3] + (frozenset(), frozenset()) + real(problem)[5:])
    torch.manual_seed(3)
    model = spectral_model("parametrization")
    with torch.no_grad():
        model[0].parametrizations.weight[0]._u.normal_()  # far from converged, as at initialisation
    with pytest.raises(SelfCheckError):
        mgs_kernel(model, torch.randn(4, 6, dtype=D), strategy="jacobian")


def test_a_replay_of_held_parameters_is_caught(monkeypatch):
    """Parameters reached outside module attributes, with the op-level substitution switched off again."""
    from mgs_torch import _problem
    from test_faithful_forwards import HeldInAList

    real = _problem.validated_output_shape
    monkeypatch.setattr(_problem, "validated_output_shape", lambda problem: real(problem)[:4] + (frozenset(),) + real(problem)[5:])
    torch.manual_seed(0)
    with pytest.raises(SelfCheckError):
        mgs_kernel(HeldInAList().double(), torch.randn(3, 3, dtype=D))


@pytest.mark.self_check_switch  # a rule made wrong on purpose: the switch is what the test checks
def test_a_wrong_penalty_gradient_is_caught_where_values_agree(monkeypatch):
    """A rule whose values are right but whose double backward is not: only the gradient check can see it."""
    from mgs_torch.engines.factors import DirectFactor
    from model_zoo import ScaleRule

    class DetachedScaleRule(ScaleRule):
        def factors(self, module, saved, grad, names):
            (a,) = saved
            return {"weight": DirectFactor(grad * a.detach())}  # the same values, a gradient that stops at a

    model, x = scale_model()
    with layer_rule(Scale, DetachedScaleRule()):
        mgs_kernel(model, x)  # the values pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = mgs_penalty(model, x, strategy="structured", reduction="sum")
    report = self_check_reports(model)[-1]
    assert report.errors["gradient"] > 1e-3 and report.outcome == "switched to the reference engine"
    params = list(model.parameters())[:-1]  # the last bias does not enter tr K
    ours = torch.autograd.grad(value, params)
    theirs = torch.autograd.grad(kernel_loop(model, x, create_graph=True).trace(), params)
    assert all(relative_error(a, b) < 1e-10 for a, b in zip(ours, theirs))


def test_dropout_in_train_mode_is_checked_with_its_masks_off_and_changes_no_random_draw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)).double().train()
    x = torch.randn(4, 3, dtype=D)
    set_self_check(False)
    try:
        torch.manual_seed(5)
        unchecked = mgs_kernel(model, x)
    finally:
        set_self_check(True)
    torch.manual_seed(5)
    checked = mgs_kernel(model, x)
    assert torch.equal(checked, unchecked)  # the same masks: the check drew from a forked stream
    assert self_check_reports(model)[-1].outcome == "ok" and model[1].p == 0.5


class NoisyTanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x) + 0.1 * torch.randn_like(x) if self.training else torch.tanh(x)


def test_random_ops_outside_dropout_modules_make_the_check_inconclusive_not_wrong():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), NoisyTanh(), nn.Linear(4, 2)).double().train()
    mgs_kernel(model, torch.randn(3, 3, dtype=D))
    assert self_check_reports(model)[-1].outcome.startswith("skipped: the forward draws random numbers")


def test_float32_is_checked_to_float32_rounding_and_half_precision_not_at_all():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    mgs_kernel(model, torch.randn(4, 3))
    assert self_check_reports(model)[-1].tolerance == 1e-3 and self_check_reports(model)[-1].outcome == "ok"
    half = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(torch.bfloat16)
    mgs_kernel(half, torch.randn(4, 3, dtype=torch.bfloat16))
    assert self_check_reports(half)[-1].outcome.startswith("skipped: the forward computes in torch.bfloat16")


def test_ops_without_a_double_backward_get_the_gradient_checked_by_finite_differences():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(6, 4, mode="mean"), nn.Linear(4, 2)

        def forward(self, idx):
            return self.head(torch.tanh(self.bag(idx)))

    torch.manual_seed(0)
    model = Bag().double()
    mgs_penalty(model, torch.tensor([[0, 2, 5], [1, 1, 4], [3, 0, 2]]))
    report = self_check_reports(model)[-1]
    assert report.gradient_check == "finite differences" and report.outcome == "ok"


def test_the_check_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    model(torch.randn(8, 3, dtype=D))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mgs_penalty(model, torch.randn(4, 3, dtype=D), batch_norm="batch").backward()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if "num_batches" not in k or True)
    assert self_check_reports(model)[-1].outcome == "ok" and "whole batch" in self_check_reports(model)[-1].route


def test_the_public_api_names_the_self_check():
    for name in ("set_self_check", "self_check_reports", "SelfCheckError", "SelfCheckReport"):
        assert name in mgs_torch.__all__


@pytest.mark.parametrize("replay", ["cdist", "torch.layer_norm"])
def test_replays_of_the_bugs_the_extended_sweeps_found_are_caught(monkeypatch, replay):
    """Without their replacements: cdist's K is wrong under torch.func; torch.layer_norm's K is right but its penalty
    gradient is not (the double-backward bug), which only the gradient comparison sees."""
    from test_faithful_forwards import NormAliases, Prototypes

    torch.manual_seed(0)
    if replay == "cdist":
        monkeypatch.delitem(REPLACED_OPS, torch.cdist)
        model, x, call = Prototypes().double(), torch.randn(4, 3, dtype=D), mgs_kernel
    else:
        monkeypatch.delitem(REPLACED_OPS, torch.layer_norm)
        model, x, call = NormAliases("torch.layer_norm").double(), torch.randn(4, 3, dtype=D), mgs_penalty
    with pytest.raises(SelfCheckError) as info:
        call(model, x, strategy="jacobian")
    assert max(info.value.report.errors.values()) > 1e-3


def test_a_new_model_never_inherits_the_reports_of_a_dead_one():
    """Reports were keyed by id(model): a new model built where a collected one lived (CPython reuses the
    address) showed the dead model's reports, and a full-suite run saw two reports after one check."""
    for _ in range(40):
        model, x = mlp()
        assert self_check_reports(model) == []
        mgs_kernel(model, x)
        assert len(self_check_reports(model)) == 1
        del model
        gc.collect()


def test_parameters_whose_part_of_j_is_round_off_are_no_false_alarm():
    """LayerNorm over two features is flat (its output is ±1 whatever its input), so J of the layers before it is
    round-off; with params= selecting only those, both sides of the check held noise and it raised SelfCheckError
    for a correct K (found by tests/random_models.py, seed 131). Errors are now measured against the whole J."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2, eps=0.0), nn.Tanh(), nn.Linear(2, 2)).double()
    x = torch.randn(4, 3, dtype=D)
    first = lambda name, p: name.startswith("0.")  # noqa: E731
    K = mgs_kernel(model, x, params=first)
    assert float(K.norm()) < 1e-20 * float(mgs_kernel(model, x).norm())  # round-off, as the loop's
    (report,) = [r for r in self_check_reports(model) if r.outcome == "ok"][:1]
    assert report.errors["rows"] <= report.tolerance
    mgs_penalty(model, x, params=first).backward()  # the gradient check is skipped there, not failed
    assert self_check_reports(model)[-1].outcome == "ok"
    assert "round-off" in self_check_reports(model)[-1].gradient_check


def test_the_check_compares_in_full_float32_and_restores_the_users_precision_settings(monkeypatch):
    """TF32 round-off (10 bits of mantissa) once failed the float32 check of a correct engine on a GPU, and oneDNN's
    bfloat16 (``set_float32_matmul_precision("medium")``) would on CPUs that have it: the check runs every per-op
    float32 setting at "ieee" while it compares, and the user's settings are back after it. The user's settings here
    mix TF32 for cuDNN convolutions with full float32 for its RNNs, the state in which PyTorch's legacy
    ``torch.backends.cudnn.allow_tf32`` getter raises: the check must not read it."""
    from mgs_torch import self_check

    settings = [getattr(getattr(torch.backends, module), op) for module, op in self_check._FP32_PRECISION_SETTINGS]
    seen = []
    real_compare = self_check._compare

    def spy(*args, **kwargs):
        seen.append([s.fp32_precision for s in settings])
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(self_check, "_compare", spy)
    saved = [s.fp32_precision for s in settings]
    users = ["tf32", "tf32", "ieee", "bf16", "bf16", "none"]
    try:
        for s, value in zip(settings, users):
            s.fp32_precision = value
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            torch.backends.cudnn.allow_tf32  # noqa: B018 - the legacy getter refuses this state
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        mgs_trace(model, torch.randn(4, 1, 4, 4))
        assert seen == [["ieee"] * len(settings)]
        assert [s.fp32_precision for s in settings] == users
    finally:
        for s, value in zip(settings, saved):
            s.fp32_precision = value
