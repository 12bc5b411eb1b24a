"""CUDA checks (``pytest -m cuda``; skipped without a GPU): the same guarantees as on the CPU.

K, tr K and both penalty gradients on the GPU against the float64 per-sample autograd loop (run on
the CPU, independent of torch.func); no side effects, the CUDA random state included; ``chunk_size``
bounding ``torch.cuda.max_memory_allocated``; a Lightning fit on the GPU in bf16-mixed precision.
Runs without pytest too (``python tests/test_cuda.py``), for GPU machines that lack it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_zoo import by_name, build  # noqa: E402
from reference import flat_gradients, kernel_loop, penalty_grad_loop, relative_error, trainable  # noqa: E402
from mgs_torch import capture_step, mgs_kernel, mgs_penalty, mgs_trace  # noqa: E402

try:
    import pytest

    pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
except ImportError:  # pragma: no cover - the GPU machine may lack pytest
    pytest = None

CASES = [
    "linear", "conv2d_groups", "conv1d_circular", "batchnorm2d_eval", "batchnorm2d_batch", "layernorm", "groupnorm",
    "embedding_padding_idx", "prelu_channels", "lstm_bf_tagger", "gru_tm_clf", "encoder_layer_default",
    "folded_sequence", "time_major_t_eq_n", "convnext_block",
]


def _to_cuda(model, inputs):
    return copy.deepcopy(model).cuda(), tuple(x.cuda() for x in inputs)


def check_case_on_gpu(name: str) -> dict:
    """Relative errors of K, tr K and the penalty gradients on the GPU (float64) against the CPU loop."""
    case = by_name(name)
    model, x = build(case)
    kw = case.kernel_kwargs
    K_ref = kernel_loop(model, x, whole_batch=case.whole_batch)
    g_ref = {kind: penalty_grad_loop(model, x, kind, whole_batch=case.whole_batch) for kind in ("trace", "logdet")}
    gm, gx = _to_cuda(model, x)
    errors = {}
    for strategy in ("jacobian", "structured"):
        errors[f"{strategy} K"] = relative_error(mgs_kernel(gm, gx, strategy=strategy, **kw).cpu(), K_ref)
        errors[f"{strategy} tr K"] = relative_error(mgs_trace(gm, gx, strategy=strategy, **kw).cpu(), K_ref.trace())
        for kind, ref in g_ref.items():
            value = mgs_penalty(gm, gx, kind=kind, strategy=strategy, reduction="sum", **kw)
            ours = torch.autograd.grad(value, trainable(gm), allow_unused=True)
            errors[f"{strategy} ∂{kind}"] = relative_error(flat_gradients(ours, trainable(gm)).cpu(), flat_gradients(ref, trainable(model)))
    return errors


def test_kernels_and_penalty_gradients_on_gpu():
    failures = {}
    for name in CASES:  # every case is checked, also after one fails
        try:
            bad = {k: v for k, v in check_case_on_gpu(name).items() if not v <= 1e-9}
        except Exception as error:  # noqa: BLE001 - report it with the others
            bad = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        if bad:
            failures[name] = bad
    assert not failures, failures


def test_exact_trace_penalty_takes_the_transposed_convolution_backward_on_gpu():
    """The automatic choice (``use_transposed_convolution_backward(None)``, measured 14–31 % faster on an H200) routes
    the exact trace penalty's convolutions through the transposed backward on CUDA, and not Hutchinson's (53 % slower
    there); the gradient stays the float64 loop's (the cases above check it on every convolution case too)."""
    from mgs_torch.op_fixes import recording_replacements

    case = by_name("conv2d_groups")
    model, x = build(case)
    gm, gx = _to_cuda(model, x)
    with recording_replacements() as names:
        value = mgs_penalty(gm, gx, strategy="structured", reduction="sum", **case.kernel_kwargs)
        grads = torch.autograd.grad(value, trainable(gm), allow_unused=True)
    assert "conv2d" in names, names
    expected = penalty_grad_loop(model, x, "trace", whole_batch=case.whole_batch)
    assert relative_error(flat_gradients(grads, trainable(gm)).cpu(), flat_gradients(expected, trainable(model))) <= 1e-9
    with recording_replacements() as names:
        mgs_penalty(gm, gx, estimator="hutchinson", strategy="structured", generator=torch.Generator(device="cuda"), **case.kernel_kwargs)
    assert "conv2d" not in names, names


def test_no_side_effects_on_gpu_including_the_cuda_rng():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(8, 3)).cuda().train()
    x = torch.randn(5, 4, device="cuda")
    params = [p.detach().clone() for p in model.parameters()]
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    for strategy in ("jacobian", "structured"):
        mgs_kernel(model, x, strategy=strategy)
        mgs_penalty(model, x, strategy=strategy).backward()
        model.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert torch.equal(cpu_rng, torch.get_rng_state()) and torch.equal(cuda_rng, torch.cuda.get_rng_state())
    assert model.training


def test_chunk_size_bounds_gpu_memory():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from models import CifarCNN

    torch.manual_seed(0)
    model = CifarCNN().cuda()
    x = torch.randn(32, 3, 32, 32, device="cuda")
    peaks = {}
    for chunk in (None, 1):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        mgs_penalty(model, x, chunk_size=chunk).backward()
        torch.cuda.synchronize()
        peaks[chunk] = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)
    assert peaks[1] < 0.5 * peaks[None], peaks


def check_graph_replay(kind: str) -> None:
    """A whole training step with the exact trace (or log-det, or Hutchinson) penalty, captured once
    into a CUDA graph and replayed, moves the weights as the same steps run eagerly do (no host sync
    inside; for Hutchinson each replay draws the next probes of a registered CUDA generator, as the
    eager steps draw from theirs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from cuda_graphs import make_step
    from models import LeNet5

    torch.manual_seed(0)
    base = LeNet5().cuda()
    x, y = torch.randn(16, 1, 28, 28, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    eager_model, graph_model = copy.deepcopy(base), copy.deepcopy(base)
    gen_eager, gen_graph = (torch.Generator(device="cuda").manual_seed(1) for _ in range(2))
    probes = kind == "hutchinson"
    eager = make_step(eager_model, torch.optim.SGD(eager_model.parameters(), lr=1e-2), x, y, kind, gen_eager if probes else None)
    replay = capture_step(
        make_step(graph_model, torch.optim.SGD(graph_model.parameters(), lr=1e-2), x, y, kind, gen_graph if probes else None),
        generators=[gen_graph] if probes else [],
    )
    for _ in range(6):  # capture_step() ran 3 warm-up steps; 3 replays make 6
        eager()
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    moved = (flat(eager_model) - flat(base)).norm()
    assert moved > 0 and (flat(eager_model) - flat(graph_model)).norm() <= 1e-4 * moved


def test_trace_penalty_step_replays_from_a_cuda_graph():
    check_graph_replay("trace")


def test_logdet_penalty_step_replays_from_a_cuda_graph():
    check_graph_replay("logdet")


def test_hutchinson_penalty_step_replays_from_a_cuda_graph_with_new_probes():
    check_graph_replay("hutchinson")


def test_self_check_passes_in_float32_under_tf32_convolutions():
    """PyTorch's default on CUDA computes float32 convolutions in TF32, whose round-off (≈ 1.6e-3 on this net's
    penalty gradient) once failed the float32 self-check of a correct engine; the check runs in full float32 now."""
    from mgs_torch import self_check_reports

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from models import CifarCNN, make_input

    torch.manual_seed(0)
    model, x = CifarCNN().cuda(), make_input("cifar_cnn", 8, torch.device("cuda"))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        value = mgs_penalty(model, x, reduction="sum")
        torch.autograd.grad(value, list(model.parameters()), allow_unused=True)  # the last bias: no gradient
        assert [r.outcome for r in self_check_reports(model)] == ["ok"]
        assert torch.backends.cudnn.allow_tf32 is True  # the user's setting, back after the check
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_lightning_fit_on_gpu_in_bf16():
    import pytorch_lightning as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from mgs_torch.lightning import MGSMonitor, MGSRegularizedMixin

    class Net(MGSRegularizedMixin, pl.LightningModule):
        def __init__(self, **mgs):
            super().__init__(**mgs)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = Net(mgs_alpha=1e-3)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6, logger=pl.loggers.CSVLogger(str(Path.cwd() / "gpu_check_logs")),
        callbacks=[MGSMonitor(log_every_n_steps=2)], enable_progress_bar=False, enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    assert all(torch.isfinite(p).all() for p in model.parameters())


if __name__ == "__main__":  # without pytest: run every check, print the errors, exit non-zero on failure
    if not torch.cuda.is_available():
        print("test_cuda: no CUDA device; nothing to check")
        sys.exit(0)
    checks = [fn for name, fn in sorted(globals().items()) if name.startswith("test_") and callable(fn)]
    failed = 0
    for fn in checks:
        try:
            fn()
            print(f"PASSED {fn.__name__}")
        except Exception as error:  # noqa: BLE001 - report every check
            failed += 1
            print(f"FAILED {fn.__name__}: {type(error).__name__}: {error}")
    print(f"{len(checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
