"""MGSRegularizedMixin: configuration, the loss it returns, and training equal to a hand-written loop."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import reference_kernel
from lightning_helpers import PlainNet, RegNet, assert_same_weights, fit, loader, pl, reference_logdet, weights
import mgs_torch.lightning.mixin as mixin_module
from mgs_torch import mgs_penalty
from mgs_torch.lightning import MGSConfigurationError, MGSRegularizedMixin


def quiet_step(model, batch, batch_idx=0):
    """training_step outside a Trainer (self.log warns there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.training_step(batch, batch_idx)


def val(t) -> float:
    return float(t.detach())


def batch_of(n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


class SpyPenalty:
    """Wraps mgs_penalty as the mixin sees it, recording every call's keyword arguments and value."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        monkeypatch.setattr(mixin_module, "mgs_penalty", self)

    def __call__(self, model, inputs, **kwargs):
        value = mgs_penalty(model, inputs, **kwargs)
        self.calls.append({**kwargs, "value": value.detach(), "n": (inputs if torch.is_tensor(inputs) else inputs[0]).shape[0]})
        return value


# ----------------------------------------------------------------------------------------------
# configuration


def test_settings_are_saved_in_hparams_with_the_models_own():
    model = RegNet(lr=0.2, mgs_alpha=0.5, mgs_kind="logdet", mgs_warmup_steps=3)
    hp = model.hparams
    assert hp.lr == 0.2 and hp.mgs_alpha == 0.5 and hp.mgs_kind == "logdet" and hp.mgs_warmup_steps == 3
    # the defaults the model did not pass are there too
    assert hp.mgs_estimator == "exact" and hp.mgs_num_probes == 1 and hp.mgs_dtype is None and hp.mgs_seed == 0


class OnlyMixinSaves(MGSRegularizedMixin, PlainNet):
    """Does not call save_hyperparameters itself."""


def test_the_mixin_saves_serialisable_values():
    model = OnlyMixinSaves(mgs_dtype=torch.float64, mgs_params=lambda name, p: name.startswith("net.2"))
    assert model.hparams.mgs_dtype == "float64" and model.mgs_dtype is torch.float64
    assert model.hparams.mgs_params is None and callable(model.mgs_params)
    assert OnlyMixinSaves(mgs_params=["net.2"]).hparams.mgs_params == ["net.2"]
    assert OnlyMixinSaves(mgs_dtype="float64").mgs_dtype is torch.float64  # how hparams give it back
    assert set(model.hparams) == set(model.mgs_hparams())


def test_load_from_checkpoint_restores_the_settings(tmp_path):
    model = RegNet(mgs_alpha=0.25, mgs_estimator="hutchinson", mgs_num_probes=3, mgs_seed=11)
    t = fit(model, tmp_path, loader(16, 8))
    t.save_checkpoint(tmp_path / "m.ckpt")
    restored = RegNet.load_from_checkpoint(tmp_path / "m.ckpt")
    assert (restored.mgs_alpha, restored.mgs_estimator, restored.mgs_num_probes, restored.mgs_seed) == (0.25, "hutchinson", 3, 11)
    assert_same_weights(weights(restored), weights(model))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mgs_kind": "det"}, r"mgs_kind must be one of \('trace', 'logdet'\)"),
        ({"mgs_alpha": float("inf")}, "mgs_alpha must be a finite number"),
        ({"mgs_alpha": "0.1"}, "mgs_alpha must be a finite number"),
        ({"mgs_estimator": "sketch"}, r"mgs_estimator must be one of \('exact', 'hutchinson'\)"),
        ({"mgs_estimator": "hutchinson", "mgs_kind": "logdet"}, "estimates the trace only"),
        ({"mgs_num_probes": 0}, "mgs_num_probes must be an int >= 1"),
        ({"mgs_reduction": "none"}, r"mgs_reduction must be one of \('mean', 'sum'\)"),
        ({"mgs_warmup_steps": -1}, "mgs_warmup_steps must be an int >= 0"),
        ({"mgs_warmup_epochs": 0.5}, "mgs_warmup_epochs must be an int >= 0"),
        ({"mgs_max_samples": 0}, "mgs_max_samples must be an int >= 1 or None"),
        ({"mgs_batch_norm": "train"}, r"mgs_batch_norm must be one of \('eval', 'batch'\)"),
        ({"mgs_outputs": "mean"}, r"mgs_outputs must be one of \('full', 'sum'\)"),
        ({"mgs_strategy": "fast"}, "mgs_strategy must be one of"),
        ({"mgs_chunk_size": 0}, "mgs_chunk_size must be an int >= 1 or None"),
        ({"mgs_jitter": -1e-3}, "mgs_jitter must be a finite number >= 0.0"),
        ({"mgs_seed": -1}, "mgs_seed must be an int >= 0"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(MGSConfigurationError, match=match):
        RegNet(**kwargs)


@pytest.mark.parametrize("dtype", [torch.int32, "int32", "double precision"])
def test_wrong_dtype_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="mgs_dtype must be a floating torch.dtype"):
        RegNet(mgs_dtype=dtype)


def test_the_mixin_must_come_before_lightning_module():
    with pytest.raises(TypeError, match="list MGSRegularizedMixin before LightningModule"):
        class Wrong(pl.LightningModule, MGSRegularizedMixin):  # noqa: F841
            pass


def test_the_mixin_needs_a_lightning_module():
    class NotLightning(MGSRegularizedMixin, nn.Module):
        pass

    with pytest.raises(TypeError, match="is for LightningModules"):
        NotLightning()


def test_bad_batches_get_a_helpful_error():
    model = RegNet(double=True)
    with pytest.raises(TypeError, match="Override `mgs_inputs"):
        model.mgs_compute_penalty({"pixels": [0.5, 1.5]})
    # a dict of tensors is taken as keyword inputs (a tokenizer's dict, issue 21): one the model does not take is named
    with pytest.raises(TypeError, match=r"RegNet.forward takes no keyword argument 'pixels' \(it takes x\)"):
        model.mgs_compute_penalty({"pixels": torch.randn(2, 4, dtype=torch.float64)})


# ----------------------------------------------------------------------------------------------
# the loss that training_step returns


@pytest.mark.parametrize("kind", ["trace", "logdet"])
def test_training_step_returns_data_loss_plus_alpha_penalty(kind):
    alpha = 0.3
    model = RegNet(double=True, mgs_alpha=alpha, mgs_kind=kind)
    x, y = batch_of()
    loss = quiet_step(model, (x, y))
    data_loss = F.cross_entropy(model(x), y)
    K = reference_kernel(model.net, x)  # brute force, independent of the engines
    g = (float(K.trace()) if kind == "trace" else reference_logdet(K)) / K.shape[0]
    assert val(loss) == pytest.approx(val(data_loss) + alpha * g, rel=1e-10)
    # and it is differentiable like the core's penalty
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = data_loss + alpha * mgs_penalty(model, x, kind=kind)
    for a, b in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dict_outputs_keep_their_other_entries():
    class DictNet(RegNet):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return {"loss": F.cross_entropy(self(x), y), "extra": 7}

    model = DictNet(double=True, mgs_alpha=0.5)
    x, y = batch_of()
    out = quiet_step(model, (x, y))
    g = float(reference_kernel(model.net, x).trace()) / 15
    assert out["extra"] == 7
    assert val(out["loss"]) == pytest.approx(val(F.cross_entropy(model(x), y)) + 0.5 * g, rel=1e-10)


def test_a_skipped_step_is_left_alone(monkeypatch):
    spy = SpyPenalty(monkeypatch)

    class Skipper(RegNet):
        def training_step(self, batch, batch_idx):
            return None

    assert quiet_step(Skipper(), batch_of(dtype=torch.float32)) is None
    assert spy.calls == []


def test_an_overriding_training_step_calling_super_adds_the_penalty_once(monkeypatch):
    spy = SpyPenalty(monkeypatch)

    class Child(RegNet):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1.0

    model = Child(double=True, mgs_alpha=0.5)
    x, y = batch_of()
    loss = quiet_step(model, (x, y))
    assert len(spy.calls) == 1
    assert val(loss) == pytest.approx(val(F.cross_entropy(model(x), y)) + 0.5 * float(spy.calls[0]["value"]), rel=1e-12)


def test_training_step_defined_in_a_base_class_is_regularised(monkeypatch):
    spy = SpyPenalty(monkeypatch)

    class Late(MGSRegularizedMixin, PlainNet):  # training_step comes from PlainNet, after the mixin
        pass

    assert Late.training_step.__wrapped__ is PlainNet.training_step
    model = Late(double=True, mgs_alpha=0.5)
    x, y = batch_of()
    quiet_step(model, (x, y))
    assert len(spy.calls) == 1


def test_overridable_inputs_module_and_cap(monkeypatch):
    spy = SpyPenalty(monkeypatch)

    class Custom(RegNet):
        def mgs_inputs(self, batch):
            return batch["x"]

        def mgs_module(self):
            return self.net

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    model = Custom(double=True, mgs_alpha=1.0, mgs_max_samples=2)
    x, y = batch_of()
    loss = quiet_step(model, {"x": x, "y": y})
    assert spy.calls[0]["n"] == 2
    g = float(reference_kernel(model.net, x[:2]).trace()) / 6
    assert val(loss) == pytest.approx(val(F.cross_entropy(model(x), y)) + g, rel=1e-10)


def test_training_step_with_only_a_batch_argument(tmp_path):
    class OneArg(RegNet):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self(x), y)

    t = fit(OneArg(mgs_alpha=0.1), tmp_path, loader(16, 8))
    assert t.global_step == 2 and len(t.logger.values("train/mgs_penalty")) == 2


def test_the_penalty_leaves_the_global_rng_alone():
    batch = batch_of(dtype=torch.float32)
    plain, regularised = PlainNet(dropout=0.5), RegNet(dropout=0.5, mgs_alpha=0.1, mgs_estimator="hutchinson")
    torch.manual_seed(5)
    quiet_step(plain, batch)  # the data forward's Dropout draws from the global RNG
    after_plain = torch.get_rng_state()
    torch.manual_seed(5)
    quiet_step(regularised, batch)
    assert torch.equal(torch.get_rng_state(), after_plain)


# ----------------------------------------------------------------------------------------------
# training equals the hand-written loop


def manual_training(model, data, *, alpha, kind="trace", accumulate=1, clip=None, epochs=1, lr=0.1):
    """loss_i = (CE + α·mgs_penalty) / accumulate; an SGD step every `accumulate` batches."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for i, (x, y) in enumerate(data):
            loss = F.cross_entropy(model(x), y) + alpha * mgs_penalty(model, x, kind=kind)
            (loss / accumulate).backward()
            if (i + 1) % accumulate == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
    return model


@pytest.mark.parametrize(
    "accumulate, clip, kind", [(1, None, "trace"), (2, None, "trace"), (2, 0.05, "logdet")],
    ids=["plain", "accumulate", "accumulate-clip-logdet"],
)
def test_trainer_run_equals_the_manual_computation(tmp_path, accumulate, clip, kind):
    alpha = 0.5
    data = loader(32, 4, dtype=torch.float64)
    model = RegNet(double=True, mgs_alpha=alpha, mgs_kind=kind)
    reference = manual_training(PlainNet(double=True), data, alpha=alpha, kind=kind, accumulate=accumulate, clip=clip)
    t = fit(model, tmp_path, data, accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    assert t.global_step == 8 // accumulate
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # the regularised run differs from the plain one
    plain = manual_training(PlainNet(double=True), data, alpha=0.0, accumulate=accumulate, clip=clip)
    assert not torch.allclose(next(model.parameters()), next(plain.parameters()))


def test_logged_values_are_the_data_loss_and_the_unweighted_penalty(tmp_path):
    data = loader(16, 8, dtype=torch.float64)
    model = RegNet(double=True, mgs_alpha=0.5)
    start = copy.deepcopy(model.net)
    x0, y0 = next(iter(data))
    t = fit(model, tmp_path, data)
    logger = t.logger
    (s0, penalty0), _ = logger.values("train/mgs_penalty")
    assert s0 == 0
    assert penalty0 == pytest.approx(float(reference_kernel(start, x0).trace()) / 24, rel=1e-10)
    assert logger.values("train/data_loss")[0][1] == pytest.approx(val(F.cross_entropy(start(x0), y0)), rel=1e-10)
    assert logger.values("train/data_loss") == logger.values("train/loss")  # the user's own loss, without the penalty
    assert [v for _, v in logger.values("train/mgs_alpha")] == [0.5, 0.5]


def test_manual_optimisation_calls_the_documented_method(tmp_path):
    class Manual(RegNet):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y) + self.mgs_regularization(batch)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return loss

    data = loader(16, 4, dtype=torch.float64)
    model = Manual(double=True, mgs_alpha=0.5)
    t = fit(model, tmp_path, data)
    reference = manual_training(PlainNet(double=True), data, alpha=0.5)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(t.logger.values("train/mgs_penalty")) == 4
    assert t.logger.values("train/data_loss") == []  # nothing is added behind a manual user's back


# ----------------------------------------------------------------------------------------------
# precision, warm-up, Hutchinson probes


def test_bf16_mixed_computes_the_kernel_in_float32(tmp_path, monkeypatch):
    spy = SpyPenalty(monkeypatch)
    data = loader(16, 8)
    model = RegNet(mgs_alpha=0.1)
    x0 = next(iter(data))[0]
    # the reference: tr K / (n·q) of a float64 copy by the autograd loop (not mgs_penalty again)
    K = reference_kernel(copy.deepcopy(model).double(), x0.double()).detach()
    expected = K.trace().item() / K.shape[0]
    t = fit(model, tmp_path, data, precision="bf16-mixed")
    assert [c["dtype"] for c in spy.calls] == [torch.float32, torch.float32]
    assert all(c["value"].dtype == torch.float32 for c in spy.calls)
    # a bfloat16 kernel would be off by ~1e-2 relative
    assert t.logger.values("train/mgs_penalty")[0][1] == pytest.approx(expected, rel=1e-5)  # float32 rounding
    assert all(math.isfinite(v) for _, v in t.logger.values("train/mgs_penalty"))


def test_bf16_true_parameters_are_upcast(monkeypatch):
    spy = SpyPenalty(monkeypatch)
    model = RegNet(mgs_alpha=0.1).to(torch.bfloat16)
    x, y = batch_of(dtype=torch.bfloat16)
    loss = quiet_step(model, (x, y))
    assert spy.calls[0]["dtype"] == torch.float32 and math.isfinite(val(loss))


def test_warmup_steps(tmp_path, monkeypatch):
    spy = SpyPenalty(monkeypatch)
    t = fit(RegNet(mgs_alpha=0.5, mgs_warmup_steps=2), tmp_path, loader(32, 8))
    assert [v for _, v in t.logger.values("train/mgs_alpha")] == [0.0, 0.0, 0.5, 0.5]
    assert [s for s, _ in t.logger.values("train/mgs_penalty")] == [2, 3]
    assert len(spy.calls) == 2  # nothing computed during the warm-up


def test_warmup_epochs(tmp_path):
    t = fit(RegNet(mgs_alpha=0.5, mgs_warmup_epochs=1), tmp_path, loader(16, 8), max_epochs=2)
    assert [v for _, v in t.logger.values("train/mgs_alpha")] == [0.0, 0.0, 0.5, 0.5]


def test_hutchinson_runs_are_reproducible(tmp_path):
    def model(seed=0):
        return RegNet(double=True, dropout=0.2, mgs_alpha=0.5, mgs_estimator="hutchinson", mgs_num_probes=2, mgs_seed=seed)

    data = loader(16, 4, dtype=torch.float64)

    def run(m, sub, **kw):
        pl.seed_everything(1, verbose=False)
        return fit(m, tmp_path / sub, data, **kw)

    straight = model()
    run(straight, "a", max_epochs=2)
    again = model()
    run(again, "b", max_epochs=2)
    assert_same_weights(weights(straight), weights(again))
    other_seed = model(seed=1)
    run(other_seed, "c", max_epochs=2)
    assert not torch.equal(other_seed.net[0].weight, straight.net[0].weight)



def test_a_resumed_hutchinson_run_draws_the_probes_of_the_uninterrupted_run(tmp_path):
    # the probes depend only on counters Lightning checkpoints (no Dropout here: Lightning does not
    # checkpoint the global RNG, so Dropout masks would differ after a resume whatever we do)
    def model():
        return RegNet(double=True, mgs_alpha=0.5, mgs_estimator="hutchinson", mgs_num_probes=2, mgs_seed=3)

    data = loader(16, 4, dtype=torch.float64)
    straight = model()
    fit(straight, tmp_path / "a", data, max_epochs=2)

    half = model()
    t = fit(half, tmp_path / "b", data, max_epochs=1)
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = model()
    t2 = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path / "c"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.fit(resumed, data, ckpt_path=str(tmp_path / "half.ckpt"))
    assert_same_weights(weights(resumed), weights(straight))


# ----------------------------------------------------------------------------------------------
# a negative α (issue 11, item 12)


def test_negative_alpha_is_refused_unless_opted_in():
    with pytest.raises(MGSConfigurationError, match=r"mgs_alpha is -0.1 < 0.*mgs_allow_negative_alpha=True"):
        RegNet(mgs_alpha=-0.1)
    model = RegNet(mgs_alpha=-0.1, mgs_allow_negative_alpha=True)
    assert model.mgs_alpha == -0.1 and model.hparams["mgs_allow_negative_alpha"] is True
    with pytest.raises(TypeError, match="mgs_allow_negative_alpha must be True or False"):
        RegNet(mgs_alpha=0.1, mgs_allow_negative_alpha="yes")


def test_a_schedule_that_turns_negative_is_refused_at_the_step(tmp_path):
    class Negative(RegNet):
        def mgs_current_alpha(self):
            return -1.0

    with pytest.raises(MGSConfigurationError, match="mgs_current_alpha\\(\\) returned -1 < 0"):
        fit(Negative(mgs_alpha=0.1), tmp_path)


def test_a_shared_block_and_backward_hooks_train_under_the_mixin_and_the_monitor(tmp_path):
    """The two model features that broke MGS outside the named tests — a block registered under two
    names (its Parameters were replaced) and module backward hooks (every call failed) — in a real fit:
    the penalty and the monitor run every step, the shared block's Parameter is the one the optimizer
    holds and it moves, and the user's hook fires in the ordinary backward."""
    from mgs_torch.lightning import MGSMonitor

    model = RegNet(mgs_alpha=0.1)
    shared = nn.Linear(6, 6)
    model.net = nn.Sequential(model.net[0], nn.Tanh(), shared, nn.Tanh(), shared, model.net[-1])
    fired = []
    model.net[0].register_full_backward_hook(lambda m, gi, go: fired.append(1))
    weight, before = shared.weight, shared.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's note that the hooked layer's input needs no grad
        t = fit(model, tmp_path, callbacks=[MGSMonitor(log_every_n_steps=1)], max_steps=3)
    assert shared.weight is weight and isinstance(model.net[4].weight, nn.Parameter)
    assert not torch.equal(shared.weight.detach(), before)
    assert fired
    traces = t.logger.values("mgs/trace")
    assert len(traces) == 3 and all(math.isfinite(v) for _, v in traces)


# ----------------------------------------------------------------------------------------------
# options that do not arrive (issue 24)


def test_a_misspelled_option_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'mgs_alhpa' \(did you mean 'mgs_alpha'\?\)") as caught:
        RegNet(mgs_alhpa=0.1)
    assert all(name in str(caught.value) for name in mixin_module.MGS_OPTIONS)
    with pytest.raises(TypeError, match="'mgs_frobnicate'. Its options are: mgs_kind, mgs_alpha"):
        RegNet(mgs_frobnicate=1)


def test_the_default_alpha_is_the_documented_one():
    assert RegNet().mgs_alpha == 1e-3 == mixin_module.MGSRegularizedMixin.__init__.__kwdefaults__["mgs_alpha"]
    assert "Default\n            1e-3" in mixin_module.MGSRegularizedMixin.__doc__


class Forgets(MGSRegularizedMixin, PlainNet):
    """Takes the options but does not pass them on."""

    def __init__(self, lr: float = 0.1, **mgs):
        super().__init__(lr=lr)


class NamesButForgets(MGSRegularizedMixin, PlainNet):
    def __init__(self, mgs_alpha: float = 0.5, mgs_kind: str = "trace"):
        super().__init__(mgs_kind=mgs_kind)


class Outer(RegNet):
    """Two levels: the outer class forwards, the inner (RegNet) forwards."""

    def __init__(self, **mgs):
        super().__init__(**mgs)


class OuterForgets(RegNet):
    def __init__(self, width: int = 3, **mgs):
        super().__init__()


def _fit_messages(model, tmp_path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, tmp_path, loader(16, 8))
    return [str(w.message) for w in caught if "did not pass it on" in str(w.message)]


@pytest.mark.parametrize(
    "make, given, used",
    [
        (lambda: Forgets(mgs_alpha=0.1), "mgs_alpha=0.1", "mgs_alpha=0.001"),
        (lambda: NamesButForgets(), "mgs_alpha=0.5", "mgs_alpha=0.001"),
        (lambda: OuterForgets(mgs_alpha=0.2, mgs_kind="logdet"), "mgs_alpha=0.2, mgs_kind='logdet'",
         "mgs_alpha=0.001, mgs_kind='trace'"),
    ],
)
def test_a_subclass_that_does_not_pass_the_options_on_says_so_at_fit_start(tmp_path, monkeypatch, make, given, used):
    spy = SpyPenalty(monkeypatch)
    model = make()
    (message,) = _fit_messages(model, tmp_path)  # once, not per step
    assert f"was given {given} but did not pass it on" in message and f"training uses {used}" in message
    assert "super().__init__(..., **mgs)" in message
    assert spy.calls and model.mgs_alpha == 1e-3  # what the message says is what trains


def test_a_swallowed_typo_is_named_at_fit_start(tmp_path):
    (message,) = _fit_messages(Forgets(mgs_alhpa=0.1), tmp_path)
    assert "mgs_alhpa=0.1" in message and "mgs_alhpa is not one of its options" in message


@pytest.mark.parametrize("make", [lambda: RegNet(mgs_alpha=0.1), lambda: Outer(mgs_alpha=0.1), lambda: OnlyMixinSaves(mgs_alpha=0.1),
                                  lambda: NamesButForgets(mgs_alpha=1e-3)])
def test_options_passed_on_are_not_reported(tmp_path, make):
    model = make()
    assert _fit_messages(model, tmp_path) == []
    assert model.mgs_alpha in (0.1, 1e-3)
