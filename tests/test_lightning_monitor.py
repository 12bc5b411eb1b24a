"""MGSMonitor: arguments, schedule, probe batches, values against an independent reference, side effects."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import eigensolver_threads, reference_kernel
from lightning_helpers import (
    MemoryLogger,
    PlainNet,
    assert_same_weights,
    fit,
    loader,
    make_data,
    pl,
    reference_logdet,
    weights,
)
import mgs_torch
from mgs_torch.lightning import MGSConfigurationError, MGSMonitor, MGSRegularizedMixin
from mgs_torch.lightning.callback import METRIC_NAMES


class Snapshot(pl.Callback):
    """Copies of the network and the batch at every on_train_batch_start (after MGSMonitor's), by step."""

    def __init__(self):
        self.nets: dict[int, nn.Module] = {}
        self.batches: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step not in self.nets:
            self.nets[step] = copy.deepcopy(pl_module.net)
            self.batches[step] = tuple(t.clone() for t in batch)


# ----------------------------------------------------------------------------------------------
# the public surface


def test_exported_names():
    assert mgs_torch.MGSMonitor is MGSMonitor
    assert mgs_torch.MGSRegularizedMixin is MGSRegularizedMixin
    assert {"MGSMonitor", "MGSRegularizedMixin"} <= set(mgs_torch.__all__)
    assert set(mgs_torch.lightning.__all__) == {"MGSMonitor", "MGSRegularizedMixin", "MGSEarlyStopping", "MGSConfigurationError"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"log_every_n_steps": -1}, "log_every_n_steps must be an int >= 0 or None"),
        ({"log_every_n_steps": 1.5}, "log_every_n_steps"),
        ({"probe": "test"}, r"probe must be one of \('current', 'train', 'val'\)"),
        ({"max_samples": 0}, "max_samples must be an int >= 1 or None"),
        ({"metrics": "trace"}, "metrics must be 'all' or a sequence"),
        ({"metrics": ["trace", "det"]}, "non-empty selection of"),
        ({"metrics": []}, "non-empty selection of"),
        ({"model_mode": "inference"}, r"model_mode must be one of \('train', 'eval'\)"),
        ({"batch_norm": "train"}, r"batch_norm must be one of \('eval', 'batch'\)"),
        ({"outputs": "mean"}, r"outputs must be one of \('full', 'sum'\)"),
        ({"strategy": "fast"}, "strategy must be one of"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1 or None"),
        ({"jitter": -1.0}, "jitter must be a finite number >= 0.0"),
        ({"jitter": float("nan")}, "jitter must be a finite number"),
        ({"seed": -3}, "seed must be an int >= 0"),
        ({"spectrum_threads": 0}, "spectrum_threads must be an int >= 1 or None"),
        ({"max_overhead": 0.0}, r"max_overhead is the monitor's largest share of the training time, in \(0, 1\]"),
        ({"max_overhead": 1.5}, r"in \(0, 1\] \(e.g. 0.05 for 5 %\)"),
        ({"max_overhead": 1.001}, r"in \(0, 1\]"),
        ({"max_overhead": -0.1}, "max_overhead must be a finite number >= 0.0"),
        ({"max_overhead": float("nan")}, "max_overhead must be a finite number"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(kwargs, match):
    with pytest.raises(MGSConfigurationError, match=match) as info:
        MGSMonitor(**kwargs)
    assert isinstance(info.value, ValueError)  # both conventions catch it
    assert isinstance(info.value, pl.utilities.exceptions.MisconfigurationException)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": torch.int64}, "dtype must be a floating torch.dtype"),
        ({"dtype": "float65"}, "dtype must be a floating torch.dtype"),
        ({"inputs_fn": "x"}, "inputs_fn must be a callable"),
        ({"targets_fn": 3}, "targets_fn must be a callable"),
        ({"module": nn.Linear(2, 2)}, "module must be the attribute name"),
        ({"prefix": None}, "prefix must be a str"),
    ],
)
def test_wrong_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        MGSMonitor(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        MGSMonitor(5)  # type: ignore[misc]


def test_a_trainer_without_logger_fails_when_fitting_starts(tmp_path):
    with pytest.raises(MGSConfigurationError, match="no logger"):
        fit(PlainNet(), tmp_path, logger=False, callbacks=[MGSMonitor()])


def test_probe_val_without_validation_data_fails_early(tmp_path):
    with pytest.raises(MGSConfigurationError, match="found no val data"):
        fit(PlainNet(), tmp_path, callbacks=[MGSMonitor(probe="val")])


def test_unknown_module_attribute_fails_at_setup(tmp_path):
    with pytest.raises(MGSConfigurationError, match="has no submodule"):
        fit(PlainNet(), tmp_path, callbacks=[MGSMonitor(module="body")])


# ----------------------------------------------------------------------------------------------
# values against the brute-force reference (float64 models)


def test_logged_values_on_a_fixed_probe_match_the_reference(tmp_path):
    data = loader(32, 8, dtype=torch.float64)
    monitor = MGSMonitor(probe="train", max_samples=5, log_every_n_steps=2)
    snap = Snapshot()
    t = fit(PlainNet(double=True), tmp_path, data, callbacks=[monitor, snap], max_epochs=2)

    # the probe is documented: max_samples samples of the data set, a random subset drawn with `seed`
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:5]
    x = data.dataset.tensors[0][order]
    assert torch.equal(monitor.probe_inputs[0], x)
    assert torch.equal(monitor.probe_targets, data.dataset.tensors[1][order])

    traces = t.logger.values("mgs/trace")
    assert [s for s, _ in traces] == [1, 3, 5, 7]  # 8 steps, (step + 1) % 2 == 0, Lightning's own convention
    logged = {s: m for s, m in t.logger.records if "mgs/trace" in m}
    for step, metrics in logged.items():
        K = reference_kernel(snap.nets[step], x)
        N = K.shape[0]
        assert N == 5 * 3
        assert metrics["mgs/trace"] == pytest.approx(float(K.trace()), rel=1e-10)
        assert metrics["mgs/trace_per_row"] == pytest.approx(float(K.trace()) / N, rel=1e-10)
        assert metrics["mgs/logdet"] == pytest.approx(reference_logdet(K), rel=1e-7, abs=1e-7)
        assert metrics["mgs/logdet_per_row"] == pytest.approx(reference_logdet(K) / N, rel=1e-7, abs=1e-7)
        assert metrics["mgs/rank"] == torch.linalg.matrix_rank(K).item() == N
    assert set(logged[1]) == {"epoch"} | {f"mgs/{k}" for k in ("trace", "logdet", "trace_per_row", "logdet_per_row", "rank")}
    assert [h["step"] for h in monitor.history] == [1, 3, 5, 7]
    # the curve moves as the network trains
    assert len({m["mgs/trace"] for m in logged.values()}) == 4


def test_current_batch_with_a_cap_matches_the_reference(tmp_path):
    data = loader(24, 8, shuffle=True, dtype=torch.float64)
    monitor = MGSMonitor(max_samples=3, metrics=("trace", "logdet", "size"))
    snap = Snapshot()
    t = fit(PlainNet(double=True), tmp_path, data, callbacks=[monitor, snap], log_every_n_steps=1)
    assert monitor.probe_inputs is None
    records = [(s, m) for s, m in t.logger.records if "mgs/trace" in m]
    assert [s for s, _ in records] == [0, 1, 2]
    for step, metrics in records:
        x = snap.batches[step][0][:3]
        K = reference_kernel(snap.nets[step], x)
        assert metrics["mgs/size"] == 9
        assert metrics["mgs/trace"] == pytest.approx(float(K.trace()), rel=1e-10)
        assert metrics["mgs/logdet"] == pytest.approx(reference_logdet(K), rel=1e-7)


def test_alignment_and_all_metrics(tmp_path):
    data = loader(16, 8, dtype=torch.float64)
    monitor = MGSMonitor(probe="val", max_samples=4, metrics="all", prefix="kernel/")
    snap = Snapshot()
    t = fit(PlainNet(double=True), tmp_path, data, val=loader(16, 8, seed=1, dtype=torch.float64),
            callbacks=[monitor, snap])
    step, metrics = next((s, m) for s, m in t.logger.records if "kernel/trace" in m)
    assert set(metrics) == {"epoch"} | {f"kernel/{name}" for name in METRIC_NAMES}
    x, y = monitor.probe_inputs[0], monitor.probe_targets
    val = make_data(16, seed=1, dtype=torch.float64)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:4]
    assert torch.equal(x, val.tensors[0][order])
    K = reference_kernel(snap.nets[step], x)
    target = F.one_hot(y, 3).double().reshape(-1, 1)  # rows ordered (sample, class)
    expected = float(target.T @ K @ target) / (float(torch.linalg.matrix_norm(K)) * float(torch.linalg.matrix_norm(target @ target.T)))
    assert metrics["kernel/alignment"] == pytest.approx(expected, rel=1e-9)
    eig = torch.linalg.eigvalsh(K)
    assert metrics["kernel/max_eigenvalue"] == pytest.approx(float(eig[-1]), rel=1e-9)
    assert metrics["kernel/min_eigenvalue"] == pytest.approx(float(eig[0]), rel=1e-6)
    assert metrics["kernel/condition_number"] == pytest.approx(float(eig[-1] / eig[0]), rel=1e-6)


class DictModel(pl.LightningModule):
    """A module whose forward does not return logits: the callback is pointed at ``body``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()

    def forward(self, x):
        return {"probs": self.body(x).softmax(-1)}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.body(batch["features"]), batch["label"] % 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_and_inputs_fn_options(tmp_path):
    data = make_data(8, dtype=torch.float64)
    batches = torch.utils.data.DataLoader(
        [{"features": x, "label": y} for x, y in zip(*data.tensors)], batch_size=4
    )
    monitor = MGSMonitor(module="body", inputs_fn=lambda b: b["features"], metrics=("trace",))
    model = DictModel()
    start = copy.deepcopy(model.body)
    t = fit(model, tmp_path, batches, callbacks=[monitor])
    (step, value), _ = t.logger.values("mgs/trace")
    assert step == 0
    assert value == pytest.approx(float(reference_kernel(start, data.tensors[0][:4]).trace()), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# schedule


def test_default_interval_is_the_trainers_and_epoch_end_values_have_their_own_keys(tmp_path):
    monitor = MGSMonitor(probe="train", log_on_epoch_end=True)
    t = fit(PlainNet(), tmp_path, loader(32, 8), callbacks=[monitor], max_epochs=2, log_every_n_steps=3)
    assert [s for s, _ in t.logger.values("mgs/trace")] == [2, 5]
    assert [s for s, _ in t.logger.values("mgs/trace_epoch")] == [4, 8]
    assert [h["stage"] for h in monitor.history] == ["step", "epoch", "step", "epoch"]
    # the epoch-end value is the kernel of the final weights on the probe
    final = monitor.compute(t.lightning_module)
    assert t.logger.values("mgs/logdet_epoch")[-1][1] == pytest.approx(final.logdet, rel=1e-12)


def test_epoch_end_only(tmp_path):
    monitor = MGSMonitor(log_every_n_steps=0, log_on_epoch_end=True)
    t = fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[monitor], max_epochs=2)
    assert t.logger.values("mgs/trace") == []
    assert [s for s, _ in t.logger.values("mgs/trace_epoch")] == [2, 4]


def test_nothing_to_log_warns(tmp_path):
    with pytest.warns(RuntimeWarning, match="logs nothing"):
        fit(PlainNet(), tmp_path, loader(8, 8), callbacks=[MGSMonitor()], log_every_n_steps=0)


class FakeClock:
    """Seconds that pass only when told to: each training step takes 1, each kernel ``kernel_seconds``."""

    def __init__(self):
        self.now = 1000.0  # not 0: elapsed time is a difference of readings

    def __call__(self) -> float:
        return self.now


class StepSeconds(pl.Callback):
    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_train_batch_end(self, *args, **kwargs):
        self.clock.now += 1.0


def budgeted_fit(tmp_path, monkeypatch, *, budget, kernel_seconds, steps, epochs=1, **kwargs):
    clock = FakeClock()
    monitor = MGSMonitor(log_every_n_steps=1, max_overhead=budget, **kwargs)
    monitor._clock = clock
    compute = monitor._kernel_and_metrics

    def costly(*args, **kw):
        clock.now += kernel_seconds
        return compute(*args, **kw)

    monkeypatch.setattr(monitor, "_kernel_and_metrics", costly)
    t = fit(PlainNet(), tmp_path, loader(2 * steps, 2), callbacks=[monitor, StepSeconds(clock)], max_epochs=epochs)
    return monitor, t, clock


def test_max_overhead_keeps_the_monitors_share_of_the_fit_within_the_budget(tmp_path, monkeypatch, caplog):
    """A kernel costs 4 training steps; with a 20 % budget the monitor computes about one scheduled step in 20 and its
    share of the fit ends within one kernel of the budget, never above it after the first kernel."""
    with caplog.at_level("INFO"):
        monitor, t, clock = budgeted_fit(tmp_path, monkeypatch, budget=0.2, kernel_seconds=4.0, steps=200)
    steps = [h["step"] for h in monitor.history]
    assert steps[0] == 0  # the first scheduled step is always computed
    assert len(steps) + monitor.skipped_steps == 200 and monitor.skipped_steps > 150
    assert [s for s, _ in t.logger.values("mgs/trace")] == steps  # what is logged is what was computed
    own, elapsed = sum(h["seconds"] for h in monitor.history), clock.now - 1000.0
    assert own == 4.0 * len(steps)
    assert 0.2 - 4.0 / elapsed < own / elapsed <= 0.2
    for i, step in enumerate(steps[1:], start=2):  # after each computation but the first: i kernels and `step` steps
        assert 4.0 * i <= 0.2 * (step + 4.0 * i) + 1e-9
    announced = [r.getMessage() for r in caplog.records if "max_overhead=0.2" in r.getMessage()]
    first_skipped = min(set(range(200)) - set(steps))
    assert len(announced) == 1 and f"step {first_skipped} and others are skipped" in announced[0]  # once, at the first skip


def test_max_overhead_never_skips_epoch_end_values_and_a_budget_of_one_skips_nothing(tmp_path, monkeypatch):
    monitor, t, _ = budgeted_fit(tmp_path, monkeypatch, budget=0.01, kernel_seconds=4.0, steps=10, epochs=2, log_on_epoch_end=True)
    assert [s for s, _ in t.logger.values("mgs/trace_epoch")] == [10, 20]
    assert [h["step"] for h in monitor.history if h["stage"] == "step"] == [0]
    assert monitor.skipped_steps == 19
    monitor, _, _ = budgeted_fit(tmp_path / "one", monkeypatch, budget=1.0, kernel_seconds=4.0, steps=10)
    assert monitor.skipped_steps == 0 and [h["step"] for h in monitor.history] == list(range(10))


def test_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    monitor = MGSMonitor(probe="train")
    t = fit(PlainNet(), tmp_path, loader(32, 4), callbacks=[monitor], accumulate_grad_batches=2)
    assert [s for s, _ in t.logger.values("mgs/trace")] == [0, 1, 2, 3]  # 8 batches, 4 optimiser steps
    assert len(monitor.history) == 4


@pytest.mark.parametrize("threads, expected", [(1, 1), (None, 2)])
def test_the_spectrum_runs_with_bounded_threads_and_restores_them(tmp_path, monkeypatch, threads, expected):
    seen = eigensolver_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[MGSMonitor(spectrum_threads=threads)])
        assert seen == [expected, expected] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_logs_to_every_logger(tmp_path):
    first, second = MemoryLogger(), MemoryLogger()
    fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[MGSMonitor(metrics=("trace",))], logger=[first, second])
    assert first.values("mgs/trace") == second.values("mgs/trace")
    assert len(first.values("mgs/trace")) == 2


# ----------------------------------------------------------------------------------------------
# never changes training


@pytest.mark.parametrize(
    "options",
    [
        dict(probe="current", log_on_epoch_end=True),
        dict(probe="train", model_mode="eval", max_samples=6, log_kernel_image=True, log_spectrum=True),
        dict(probe="val", metrics="all", dtype=None, spectrum_threads=None),
    ],
    ids=["current", "train-eval", "val-all"],
)
def test_a_seeded_run_ends_with_the_same_weights_with_and_without_the_callback(tmp_path, options):
    def run(callbacks, sub):
        pl.seed_everything(7, verbose=False)
        model = PlainNet(dropout=0.3, batch_norm=True, seed=7)  # Dropout draws from the RNG, BN has buffers
        logger = pl.loggers.TensorBoardLogger(str(tmp_path / sub))
        fit(model, tmp_path / sub, loader(32, 8, shuffle=True), val=loader(16, 8, seed=3), logger=logger,
            callbacks=callbacks, max_epochs=2, log_every_n_steps=1)
        return weights(model), torch.get_rng_state()

    monitor = MGSMonitor(log_every_n_steps=1, **options)
    with_cb, rng_with = run([monitor], "with")
    without_cb, rng_without = run([], "without")
    assert len(monitor.history) >= 8  # it did compute, and successfully
    assert all(math.isfinite(h.get("mgs/trace", h.get("mgs/trace_epoch"))) for h in monitor.history)
    assert_same_weights(with_cb, without_cb)
    assert torch.equal(rng_with, rng_without)


class NoisyData(torch.utils.data.Dataset):
    """Random augmentation from all three global generators (torch, Python, NumPy)."""

    def __init__(self):
        self.data = make_data(32)

    def __len__(self):
        return 32

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.data[i]
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return x * scale + 0.01 * torch.randn(4), y


def test_drawing_the_probe_from_augmented_data_leaves_every_rng_alone(tmp_path):
    import random

    import numpy as np

    def run(callbacks, sub):
        pl.seed_everything(3, verbose=False)
        model = PlainNet(dropout=0.3, seed=3)
        fit(model, tmp_path / sub, torch.utils.data.DataLoader(NoisyData(), batch_size=8, shuffle=True),
            callbacks=callbacks, max_epochs=1)
        return weights(model), torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()

    monitor = MGSMonitor(probe="train", max_samples=8, log_every_n_steps=2)
    with_cb, without_cb = run([monitor], "with"), run([], "without")
    assert monitor.probe_inputs[0].shape == (8, 4) and len(monitor.history) == 2
    assert_same_weights(with_cb[0], without_cb[0])
    assert torch.equal(with_cb[1], without_cb[1])
    assert with_cb[2] == without_cb[2]
    assert (with_cb[3] == without_cb[3]).all()


# ----------------------------------------------------------------------------------------------
# what cannot be computed is reported, training goes on


def test_singular_kernel_logs_minus_infinity(tmp_path):
    # only the last layer (6·3 + 3 = 21 parameters) for N = 8·3 = 24 rows: K has rank 21
    monitor = MGSMonitor(probe="train", max_samples=8, params=["net.2"], metrics=("logdet", "rank", "trace"))
    t = fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[monitor])
    for _, metrics in [r for r in t.logger.records if "mgs/logdet" in r[1]]:
        assert metrics["mgs/logdet"] == -math.inf
        assert metrics["mgs/rank"] == 21
        assert math.isfinite(metrics["mgs/trace"])
    assert t.state.finished


def test_a_failing_computation_warns_once_logs_nan_and_training_goes_on(tmp_path):
    val = make_data(8, seed=1)
    val.tensors[0][0, 0] = float("nan")  # the probe's outputs are not finite: the core raises
    monitor = MGSMonitor(probe="val", max_samples=8)
    model = PlainNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(model, tmp_path, loader(32, 8), val=torch.utils.data.DataLoader(val, batch_size=8),
                callbacks=[monitor], limit_val_batches=0)
    ours = [w for w in caught if "MGSMonitor could not compute" in str(w.message)]
    assert len(ours) == 1 and "non-finite outputs" in str(ours[0].message)
    values = t.logger.values("mgs/trace")
    assert len(values) == 4 and all(math.isnan(v) for _, v in values)
    assert t.state.finished and t.global_step == 4


# ----------------------------------------------------------------------------------------------
# state: probe batch and schedule survive a checkpoint


def test_state_dict_round_trip(tmp_path):
    monitor = MGSMonitor(probe="train", max_samples=4)
    fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[monitor])
    state = monitor.state_dict()
    torch.save(state, tmp_path / "state.pt")
    restored = MGSMonitor(probe="train", max_samples=4)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert torch.equal(restored.probe_inputs[0], monitor.probe_inputs[0])
    assert torch.equal(restored.probe_targets, monitor.probe_targets)
    assert restored.state_dict()["last_step"] == monitor.state_dict()["last_step"] == 1
    assert restored.state_key == monitor.state_key != MGSMonitor(probe="val").state_key


def test_state_from_other_probe_settings_is_not_reused(tmp_path):
    monitor = MGSMonitor(probe="train", max_samples=4)
    fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[monitor])
    other = MGSMonitor(probe="train", max_samples=6)
    with pytest.warns(RuntimeWarning, match="drawn with other settings"):
        other.load_state_dict(monitor.state_dict())
    assert other.probe_inputs is None


def test_a_resumed_run_keeps_its_probe_and_schedule(tmp_path):
    first = MGSMonitor(probe="train", max_samples=6, log_every_n_steps=1)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(PlainNet(), tmp_path, loader(32, 8), callbacks=[first, checkpoint], enable_checkpointing=True)
    # resume with *different* training data: a redrawn probe would differ from the checkpoint's
    second = MGSMonitor(probe="train", max_samples=6, log_every_n_steps=1)
    t = pl.Trainer(
        max_epochs=2, logger=MemoryLogger(), callbacks=[second], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(PlainNet(), loader(32, 8, seed=5), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(second.probe_inputs[0], first.probe_inputs[0])
    assert [s for s, _ in t.logger.values("mgs/trace")] == [4, 5, 6, 7]
    # the history holds the whole run: the checkpoint's records, then the resumed ones (issue 24)
    assert [r["step"] for r in second.history] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert second.history[:4] == first.history and second.last_metrics == second.history[-1]
    assert [r["mgs/trace"] for r in second.history[4:]] == [v for _, v in t.logger.values("mgs/trace")]


def test_the_history_survives_a_checkpoint_file(tmp_path):
    monitor = MGSMonitor(probe="train", max_samples=4, log_every_n_steps=1, log_on_epoch_end=True)
    t = fit(PlainNet(), tmp_path, loader(16, 8), callbacks=[monitor])
    t.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["callbacks"][monitor.state_key]  # plain values only
    restored = MGSMonitor(probe="train", max_samples=4, log_every_n_steps=1, log_on_epoch_end=True)
    restored.load_state_dict(state)
    assert restored.history == monitor.history and [r["stage"] for r in restored.history] == ["step", "step", "epoch"]
    assert restored.last_metrics == monitor.last_metrics
    old = {k: v for k, v in state.items() if k != "history"}  # a checkpoint written before the history was kept
    restored.load_state_dict(old)
    assert restored.history == [] and restored.last_metrics is None
