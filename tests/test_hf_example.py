"""examples/hf_label_noise.py runs end to end (a few steps, tiny data): Trainer with the MGS penalty and the
callback, TensorBoard event files with the MGS metrics, results.json with one row per run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from optional import require_extra  # noqa: E402

require_extra("transformers", "hf")
pytest.importorskip("tensorboard")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore")
def test_the_label_noise_example_runs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("hf_label_noise", ROOT / "examples" / "hf_label_noise.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--alphas", "0", "0.1", "--seeds", "0", "--max-steps", "2", "--logging-steps", "1",
                            "--train", "64", "--test", "32", "--out", str(tmp_path)])
    assert [(r["alpha"], r["steps"]) for r in results] == [(0.0, 2), (0.1, 2)]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["final_trace"] > 0 for r in results)
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "alpha0.1_seed0"))
    events.Reload()
    assert {"train/mgs/trace", "train/mgs/logdet", "train/mgs/penalty"} <= set(events.Tags()["scalars"])
