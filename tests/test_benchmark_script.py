"""benchmarks/bench_mgs.py: never overwrites the committed numbers by default, prints no 'nan ms', and puts a
speed-up over naive only on mgs_torch's rows (issue 11, item 8). Measurements are faked: this tests the script."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results-cpu.json"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_mgs_under_test", ROOT / "benchmarks" / "bench_mgs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    monkeypatch.setattr(bench, "run_config", lambda name, n, reps, device, slow, measure: _rows(measure))
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
