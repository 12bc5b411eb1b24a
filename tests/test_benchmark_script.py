"""benchmarks/bench_mgs.py: never overwrites the committed numbers by default, prints no 'nan ms', and puts a
speed-up over naive only on mgs_torch's rows (issue 11, item 8); the models and peers of issue #22, item 6 run
(resnet18's forward, the tiny BERT on token ids, the peers checked against mgs_trace before they are timed).
Times are faked or not asserted on: this tests the script, never the speed."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results-cpu.json"


def _load_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return _load_script("bench_mgs")


def _rows(measure):
    names = [("plain step", "plain step"), ("plain step @ q·n", "plain step"),
             ("trace penalty step, naive", "trace penalty step, naive"),
             ("trace penalty step, mgs_torch", "trace penalty step, naive"),
             ("Hutchinson (1 probe) step, naive", "trace penalty step, naive")]
    times = [1.0, 2.0, 100.0, 5.0, 4.0]
    return [{"model": "fcn", "params": 10, "n": 2, "q": 10, "method": m, "compared_with": c,
             "median_ms": (t if measure != "memory" else None), "peak_mb": 1.0 + i, "repeats": 1}
            for i, ((m, c), t) in enumerate(zip(names, times))]


def test_default_output_is_a_new_file_in_the_working_directory(bench, monkeypatch, tmp_path, capsys):
    before = hashlib.sha256(COMMITTED.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run_config", lambda name, n, reps, device, slow, measure, *peers: _rows(measure))
    monkeypatch.setattr(bench, "cpu_peaks_in_subprocess", lambda args: {})
    monkeypatch.setattr(bench, "hutchinson_quality", lambda name, n, device: [])
    bench.main(["--models", "fcn", "--batch", "2", "--device", "cpu"])
    assert hashlib.sha256(COMMITTED.read_bytes()).hexdigest() == before
    (written,) = tmp_path.glob("bench-results-cpu-*.json")
    out = capsys.readouterr().out
    assert str(written.name) in out and "nan" not in out.lower()
    table = {line.split("|")[3].strip(): line.split("|")[6].strip() for line in out.splitlines() if line.startswith("| fcn")}
    assert table["trace penalty step, mgs_torch"] == "20.0"  # 100 ms naive / 5 ms
    for naive_row in ("plain step", "plain step @ q·n", "trace penalty step, naive", "Hutchinson (1 probe) step, naive"):
        assert table[naive_row] == "–", naive_row


def test_memory_pass_prints_no_nan(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "methods", lambda *a: ({"plain step": ("plain step", lambda: None)}, lambda: None))
    monkeypatch.setattr(bench, "peak_memory_mb", lambda fn, device, free: 12.5)
    rows = bench.run_config("fcn", 2, 1, bench.torch.device("cpu"), False, "memory")
    assert rows[0]["median_ms"] is None
    err = capsys.readouterr().err
    assert "nan" not in err.lower() and "peak 12.5 MB" in err and " ms" not in err


def test_from_json_reprints_the_committed_tables(bench, capsys):
    bench.main(["--from-json", str(COMMITTED)])
    out = capsys.readouterr().out
    assert "| lenet5" in out and "nan" not in out.lower()
    naive_rows = [line for line in out.splitlines() if line.startswith("| ") and ", naive |" in line]
    assert naive_rows and all(line.split("|")[6].strip() == "–" for line in naive_rows)


# ------------------------------------------------------------------ issue #22, item 6: models and peers

FEW = ("plain step", "tr K (no graph), naive", "tr K (no graph), mgs_torch")


@pytest.fixture
def few_methods(bench, monkeypatch):
    """The plain step and the two tr K rows the peers are compared with: the rest of the table is not needed to
    exercise a model's inputs or the peers, and would only make the suite slower."""
    full = bench.methods

    def methods(*args):
        table, free = full(*args)
        return {k: v for k, v in table.items() if k in FEW}, free

    monkeypatch.setattr(bench, "methods", methods)
    return bench


def test_resnet18_and_bert_are_registered_and_take_their_inputs(bench):
    from models import DEFAULT_MODELS, MODELS, make_input

    assert {"resnet18", "bert", "vit"} <= set(MODELS) and set(DEFAULT_MODELS) <= set(MODELS)
    assert "resnet18" not in DEFAULT_MODELS and "bert" not in DEFAULT_MODELS  # the committed numbers' set stays as it was
    x = make_input("resnet18", 1)
    assert x.dtype == bench.torch.float32 and x.shape == (1, 3, 32, 32)
    with bench.torch.no_grad():
        assert MODELS["resnet18"]().eval()(x).shape == (1, 10)  # torchvision's, or the same layout written out
    pytest.importorskip("transformers")
    ids = make_input("bert", 3)
    assert ids.dtype == bench.torch.int64 and ids.shape == (3, 16) and 0 <= int(ids.min()) and int(ids.max()) < 100
    model = MODELS["bert"]()
    assert model(ids).shape == (3, 10)
    assert not any(m.p for m in model.modules() if isinstance(m, bench.nn.Dropout))  # one deterministic function


def test_bert_runs_through_the_benchmark(few_methods, capsys):
    pytest.importorskip("transformers")
    rows = few_methods.run_config("bert", 2, 1, few_methods.torch.device("cpu"), False, "time")
    assert [r["method"] for r in rows] == list(FEW)
    assert all(r["median_ms"] is not None and r["params"] == rows[0]["params"] for r in rows)
    few_methods.add_ratios(rows)
    assert rows[2]["x_naive"] is not None and rows[1]["x_naive"] is None
    assert "| bert (" in few_methods.markdown(rows)


def _fake_peers(bench, monkeypatch):
    """Three stand-in peers (the real ones are optional and absent in CI): one right, one refusing the model,
    one off by a factor of two."""
    def right(model):
        return lambda x: bench.naive_trace(model, x)

    def refuses(model):
        raise NotImplementedError("no extension for this layer")

    def wrong(model):
        return lambda x: 2 * bench.naive_trace(model, x)

    prepare = {"Right": right, "Refuses": refuses, "Wrong": wrong}
    monkeypatch.setattr(bench.peers, "PREPARE", prepare)
    monkeypatch.setattr(bench.peers, "PEERS", {label: "math" for label in prepare})
    return list(prepare)


def test_peers_are_checked_against_mgs_trace_before_they_are_timed(few_methods, monkeypatch, capsys):
    bench = few_methods
    labels = _fake_peers(bench, monkeypatch)
    rows = bench.run_config("lenet5", 2, 1, bench.torch.device("cpu"), False, "time", labels)
    by = {r["method"]: r for r in rows}
    right, refuses, wrong = (by[f"tr K (no graph), {label}"] for label in labels)
    assert right["median_ms"] is not None and right["peer"] and "status" not in right
    assert refuses["median_ms"] is None and refuses["status"].startswith("unsupported: NotImplementedError")
    assert wrong["median_ms"] is None and wrong["status"].startswith("mismatch: tr K")
    bench.add_ratios(rows)
    assert right["x_naive"] is not None  # compared with the naive tr K, like mgs_torch's row
    table = bench.markdown(rows)
    assert "| unsupported |" in table and "| mismatch |" in table and "nan" not in table.lower()
    side = bench.peer_table(rows).splitlines()
    assert len(side) == 2 + 3 and "mgs_torch speed-up over the peer" in side[0]
    assert side[2].split("|")[6].strip() not in ("", "–") and side[3].split("|")[6].strip() == "–"


def test_main_runs_the_peers_that_import_and_says_which_do_not(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench.peers, "PEERS", {"Here": "math", "Absent": "no_such_module_mgs"})
    seen = {}

    def run_config(name, n, reps, device, slow, measure, peer_labels=()):
        seen["peers"] = list(peer_labels)
        return _rows(measure)

    monkeypatch.setattr(bench, "run_config", run_config)
    monkeypatch.setattr(bench, "hutchinson_quality", lambda name, n, device: [])
    monkeypatch.setattr(bench, "peer_versions", lambda labels: {})
    out = tmp_path / "r.json"
    bench.main(["--models", "fcn", "--batch", "2", "--device", "cpu", "--measure", "time", "--json", str(out)])
    assert seen["peers"] == ["Here"]
    assert "peer skipped: Absent: no_such_module_mgs not importable" in capsys.readouterr().err
    bench.main(["--models", "fcn", "--batch", "2", "--device", "cpu", "--measure", "time", "--json", str(out), "--no-peers"])
    assert seen["peers"] == [] and "peer skipped" not in capsys.readouterr().err


@pytest.mark.parametrize("label", ["BackPACK BatchL2Grad", "Opacus per-sample grads"])
@pytest.mark.parametrize("name", ["lenet5", "fcn"])
def test_installed_peer_trace_equals_mgs_trace(bench, label, name):
    """The real peers, where installed: their tr K on the models both support is mgs_trace's, and stays so on a
    second call (nothing accumulates between calls)."""
    pytest.importorskip(bench.peers.PEERS[label])
    from models import MODELS, make_input

    torch = bench.torch
    torch.manual_seed(0)
    model = MODELS[name]()
    x = make_input(name, 3)
    reference = bench.mgs_trace(model, x)
    fn, why = bench.peers.prepare(label, model, x, reference)
    assert why is None
    for _ in range(2):
        torch.testing.assert_close(fn(), reference, rtol=1e-4, atol=0)
    assert not any(hasattr(m, "_backpack_extend") or hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())


def test_installed_backpack_on_batchnorm_and_its_refusal_of_the_vit(bench):
    pytest.importorskip("backpack")
    from models import MODELS, make_input

    bench.torch.manual_seed(0)
    for name, ok in (("resnet", True), ("vit", False)):
        model = MODELS[name]()
        x = make_input(name, 2)
        fn, why = bench.peers.prepare("BackPACK BatchL2Grad", model, x, bench.mgs_trace(model, x))
        assert (fn is not None) == ok, why
        assert ok or why.startswith("unsupported: NotImplementedError")  # the ViT's bare Parameters get no batch_l2


def test_module_walks_script_counts_one_walk_per_call(capsys):
    """benchmarks/module_walks.py on LeNet-5 (15 modules): about 4 walks a call (60 visits), not 29 (432)."""
    module = _load_script("module_walks")
    module.main(["--models", "lenet5"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("lenet5 (15 modules) | exact tr K: ")
    visits = [int(cell.split(": ")[1].split()[0]) for cell in line.split(" | ")[1:]]
    assert len(visits) == 3 and all(15 <= v <= 6 * 15 for v in visits), line


def test_hutchinson_engines_script_prints_both_engines(capsys):
    module = _load_script("hutchinson_engines")
    module.main(["--models", "fcn", "--n", "4", "--repeats", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fcn |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    structured, reference, plain, ratio, plain_ratio = (float(c) for c in cells[2:])
    assert structured > 0 and reference > 0 and plain > 0
    # the times are printed to 0.1 ms and the ratios to 0.01: on a fast machine a 1 ms time is rounded by up to 5 %
    rounded = lambda a, b: 0.011 + (0.05 / a + 0.05 / b) * a / b * 1.1  # noqa: E731 - first-order error of a / b
    assert abs(ratio - reference / structured) < rounded(reference, structured)
    assert abs(plain_ratio - plain / structured) < rounded(plain, structured)


def test_hutchinson_steps_naive_probe_matches_a_per_sample_loop():
    """The script's naive per-sample probe Σ_i ‖∇θ⟨f(x_i), v_i⟩‖² against a plain autograd loop, float64."""
    import torch

    module = _load_script("hutchinson_steps")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, v = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    expected = 0.0
    for i in range(4):
        g = torch.autograd.grad((model(x[i : i + 1])[0] * v[i]).sum(), list(model.parameters()))
        expected += sum(float(t.pow(2).sum()) for t in g)
    assert abs(float(module.naive_per_sample_probe(model, x, v).detach()) - expected) < 1e-10 * expected


def test_hutchinson_steps_script_prints_ratios_and_families(capsys):
    module = _load_script("hutchinson_steps")
    module.PROFILES.clear()
    module.main(["--models", "fcn", "--n", "4", "--repeats", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| fcn | 4 |")]
    assert len(rows) == 2  # the timing row and the operator families
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    plain = float(cells[2].split()[0])
    for cell in cells[3:6]:
        ms, ratio = float(cell.split()[0]), float(cell.split("(")[1].rstrip("×)"))
        assert abs(ratio - ms / plain) < 0.05 + 0.05 * ratio
    assert float(cells[6]) <= 1e-4  # mgs_torch and the naive per-sample probe agree on the same probe
    assert "matmul" in rows[1] and "→" in rows[1]
