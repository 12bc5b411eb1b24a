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
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--model", "lenet5", "--n", "4", "--device", "cpu",
           "--rows", "5", "--kernels"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "# lenet5 n=4 trace on cpu, 3 steps" in result.stdout and "aten::" in result.stdout
    assert "# lenet5 n=4 trace on cpu: median of 10 steps" in result.stdout
    table = result.stdout.split("the slowest kernels and what launched them, per step")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5 and any("Backward" in row for row in rows)  # charged to the autograd nodes that ran them


def test_kernel_attribution_charges_each_kernel_to_its_launcher_chain_and_shapes():
    """profile_step.kernel_sources on hand-made profiler events: a CUDA kernel is charged to the operator that
    launched it, with its callers (the autograd node names the derivative) and input shapes, per step."""
    from types import SimpleNamespace as Event

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_step import format_kernel_sources, kernel_sources

    node = Event(name="ConvolutionBackwardBackward0", cpu_parent=None, kernels=[], cpu_children=[1], input_shapes=[])
    conv = Event(name="aten::cudnn_convolution", cpu_parent=node, cpu_children=[], input_shapes=[[64, 1280, 32, 32], []],
                 kernels=[Event(name="fprop_tf32", duration=26000.0)] * 2)
    small = Event(name="aten::mul", cpu_parent=None, cpu_children=[], input_shapes=[[2]], kernels=[Event(name="mul", duration=500.0)])
    rows = kernel_sources([node, conv, small], steps=2)
    assert rows[0] == (26.0, 1, "fprop_tf32", "aten::cudnn_convolution < ConvolutionBackwardBackward0", "[[64, 1280, 32, 32]]")
    assert rows[1][:3] == (0.25, 0, "mul") and len(rows) == 2
    assert "| 26.00 | 1 | fprop_tf32 |" in format_kernel_sources(rows)
