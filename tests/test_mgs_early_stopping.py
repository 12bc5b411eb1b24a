"""The MGS growth-plateau stopping rule and its Lightning callback (issue 11, item 2)."""

from __future__ import annotations

import math

import pytest

from lightning_helpers import PlainNet, fit, loader
from mgs_torch.lightning import MGSConfigurationError, MGSEarlyStopping, MGSMonitor
from mgs_torch.stopping import GrowthPlateau, growth_plateau_stop


def test_rule_on_a_hand_made_curve():
    # growth 100 %, 50 %, 1 %, 1 %, 1 % -> the third 1 % epoch (index 5) completes patience 3
    values = [1.0, 2.0, 3.0, 3.03, 3.0603, 3.090903, 10.0]
    assert growth_plateau_stop(values, threshold=0.02, patience=3) == 5
    assert growth_plateau_stop(values, threshold=0.02, patience=4) is None
    assert growth_plateau_stop(values, threshold=0.02, patience=3, min_checks=7) is None
    # window 2: growth over two epochs: 3/1 - 1 = 200 % (index 2), 3.03/2 - 1 = 51.5 %, 3.0603/3 - 1 = 2 % -> stop at 4
    rule = GrowthPlateau(threshold=0.05, patience=1, window=2)
    assert [rule.update(v) for v in values[:6]] == [False, False, False, False, True, True]
    assert rule.stopped_at == 4
    assert rule.growths[:2] == [None, None] and rule.growths[5] == pytest.approx(3.090903 / 3.03 - 1)


def test_a_fall_counts_as_plateau_and_nan_resets():
    assert growth_plateau_stop([5.0, 4.0, 3.0], threshold=0.0, patience=2) == 2
    rule = GrowthPlateau(threshold=0.1, patience=2)
    for v in (1.0, 1.0, math.nan, 1.0, 1.0):
        stop = rule.update(v)
    assert not stop and rule.wait == 1  # nan broke the run of plateau epochs


@pytest.mark.parametrize("kwargs, match", [({"threshold": math.inf}, "threshold"), ({"patience": 0}, "patience"),
                                           ({"window": 0}, "window"), ({"min_epochs": -1}, "min_checks")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MGSConfigurationError, match=match):
        MGSEarlyStopping(**kwargs)


def test_needs_an_epoch_end_monitor(tmp_path):
    with pytest.raises(MGSConfigurationError, match="log_on_epoch_end=True"):
        fit(PlainNet(), tmp_path, callbacks=[MGSMonitor(), MGSEarlyStopping()])


def test_callback_stops_where_the_rule_says_on_the_logged_curve(tmp_path):
    monitor = MGSMonitor(probe="train", max_samples=8, log_every_n_steps=0, log_on_epoch_end=True, model_mode="eval")
    stop = MGSEarlyStopping(threshold=0.5, patience=2, window=1)  # generous: tr K / N grows less than 50 % per epoch soon
    trainer = fit(PlainNet(lr=0.2), tmp_path, loader(32, 8), callbacks=[stop, monitor], max_epochs=40)
    curve = [h["mgs/trace_per_row_epoch"] for h in monitor.history]
    expected = growth_plateau_stop(curve, threshold=0.5, patience=2, window=1)
    assert expected is not None and trainer.should_stop
    assert len(curve) == expected + 1 and stop.stopped_epoch == expected
    assert stop.growths[1] == pytest.approx(curve[1] / curve[0] - 1, rel=1e-3, abs=1e-6)  # callback metrics are float32
    state = stop.state_dict()
    fresh = MGSEarlyStopping(threshold=0.5, patience=2, window=1)
    fresh.load_state_dict(state)
    assert fresh.rule.values == pytest.approx(curve, rel=1e-6) and fresh.stopped_epoch == expected


def test_stopping_analysis_on_a_history():
    from mgs_bench.stopping import stopping_points

    hist = [{"epoch": e, "test_acc": a, "val_loss": v, "mgs_trace": t, "mgs_size": 10}
            for e, (a, v, t) in enumerate([(0.1, 2.0, 10), (0.5, 1.0, 20), (0.8, 0.5, 30), (0.9, 0.6, 30.1),
                                           (0.85, 0.7, 30.2), (0.7, 0.8, 30.3), (0.6, 0.9, 40)])]
    pts = stopping_points({"history": hist}, {"threshold": 0.02, "patience": 3, "window": 1, "min_checks": 0}, val_patience=2)
    assert (pts["mgs_epoch"], pts["mgs_acc"]) == (5, 0.7)
    assert (pts["val_epoch"], pts["val_acc"], pts["val_stop_epoch"]) == (2, 0.8, 4)
    assert (pts["final_acc"], pts["oracle_acc"], pts["oracle_epoch"]) == (0.6, 0.9, 3)
