"""benchmarks/gpu_check.sh starts anywhere and says plainly when there is no GPU; the CUDA tests skip."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs for real")
def test_gpu_check_detects_no_cuda_and_says_so(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 3
    assert "no CUDA device" in result.stdout
    assert not (tmp_path / "results-cuda.json").exists()


def test_benchmark_knows_the_cifar_sized_model():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import INPUT_SHAPES, MODELS

    model = MODELS["cifar_cnn"]()
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 1_200_000
    assert model(torch.randn(2, *INPUT_SHAPES["cifar_cnn"])).shape == (2, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs for real")
def test_cuda_graph_benchmark_says_it_needs_a_gpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_graphs.py")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "needs a CUDA device" in result.stderr


def test_profile_script_prints_the_operator_table_on_the_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--model", "lenet5", "--n", "4", "--device", "cpu", "--rows", "5"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "# lenet5 n=4 trace on cpu, 3 steps" in result.stdout and "aten::" in result.stdout
    assert "# lenet5 n=4 trace on cpu: median of 10 steps" in result.stdout
