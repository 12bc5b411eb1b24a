"""mgs_torch inside ``torch.compile`` (issue 22, item 3): a compiled training step that calls ``mgs_penalty`` is one
graph, with no break caused by mgs_torch, and its loss and gradients equal the eager step's and the float64 autograd
loop's. Where the traced route would be wrong or cannot be traced, the call runs eagerly (a graph break) and is exact.

Compiling with Inductor's C++ backend takes seconds per function, so each test compiles one small function.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace
from reference import kernel_loop, penalty_grad_loop, relative_error, trainable

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler"
)

ALPHA = 0.01


def small_cnn(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 2, 3)] + ([nn.BatchNorm2d(2)] if batch_norm else []) + [nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)]
    return nn.Sequential(*layers).double()


def batch(n: int = 4):
    return torch.randn(n, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (n,))


def gradients(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, trainable(model), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(trainable(model), grads)]


def graphs_and_breaks(function, *args) -> tuple[int, list[str]]:
    """How many graphs Dynamo makes of ``function`` and why it breaks (its own counters; the graphs run as traced)."""
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    torch.compile(function, backend=counting)(*args)
    return len(graphs), list(counters["graph_break"])


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_compiled_penalty_step_is_one_graph_and_equals_eager_and_the_loop():
    model = small_cnn()
    x, y = batch()

    def step_loss(x, y):
        return F.cross_entropy(model(x), y) + ALPHA * mgs_penalty(model, x, reduction="sum")

    count, breaks = graphs_and_breaks(step_loss, x, y)
    assert (count, breaks) == (1, []), breaks
    eager_loss = step_loss(x, y)
    eager = gradients(model, eager_loss)
    compiled_loss = torch.compile(step_loss)(x, y)
    compiled = gradients(model, compiled_loss)
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-12 * abs(eager_loss.item())
    # the loop: the cross-entropy's gradient plus α·∂tr K/∂θ from the per-sample autograd loop in float64
    ce = gradients(model, F.cross_entropy(model(x), y))
    loop = [c + ALPHA * (0.0 if p is None else p) for c, p in zip(ce, penalty_grad_loop(model, x, "trace"))]
    for c, e, r in zip(compiled, eager, loop):
        assert relative_error(c, e) < 1e-12
        assert relative_error(c, r) < 1e-10


def test_compiled_kernel_trace_and_logdet_penalty_equal_the_loop():
    model = small_cnn()
    x, _ = batch(3)

    def metrics(x):
        return (mgs_kernel(model, x), mgs_trace(model, x),
                mgs_penalty(model, x, kind="logdet", reduction="sum", jitter=1e-9))

    count, breaks = graphs_and_breaks(metrics, x)
    assert (count, breaks) == (1, []), breaks
    K, trace, logdet = torch.compile(metrics)(x)
    reference = kernel_loop(model, x)
    assert relative_error(K, reference) < 1e-12
    assert abs(trace.item() - reference.trace().item()) <= 1e-12 * reference.trace().item()
    eager = mgs_penalty(model, x, kind="logdet", reduction="sum", jitter=1e-9)
    assert abs(logdet.item() - eager.item()) <= 1e-10 * abs(eager.item())
    loop = penalty_grad_loop(model, x, "logdet")
    for c, r in zip(gradients(model, logdet), loop):
        assert relative_error(c, torch.zeros_like(c) if r is None else r) < 1e-7  # jitter 1e-9 against none


def test_compiled_hutchinson_draws_from_the_graphs_random_stream():
    """Without ``generator=`` a traced call draws its probes in the graph (the global random stream, as a compiled
    Dropout does), not from mgs_torch's own generator, whose draw would break the graph. With Inductor's eager
    random numbers the compiled estimate equals an eager one drawn from the same global state."""
    model = small_cnn()
    x, _ = batch()

    def penalty(x):
        return mgs_penalty(model, x, estimator="hutchinson", num_probes=2)

    count, breaks = graphs_and_breaks(penalty, x)
    assert (count, breaks) == (1, []), breaks
    compiled = torch.compile(penalty)
    torch.manual_seed(7)
    with torch._inductor.config.patch(fallback_random=True):
        value = compiled(x)
    torch.manual_seed(7)
    eager = mgs_penalty(model, x, estimator="hutchinson", num_probes=2, generator=torch.default_generator)
    assert abs(value.item() - eager.item()) <= 1e-12 * eager.item()
    for c, e in zip(gradients(model, value), gradients(model, eager)):
        assert relative_error(c, e) < 1e-12


def test_train_mode_batch_norm_runs_the_penalty_eagerly_and_exactly():
    """BatchNorm in training mode, read with its running statistics: Inductor's gradient would be wrong there
    (tests/test_upstream_bugs.py), so the call leaves the graph (one break, from ``torch.compiler.disable``)."""
    model = small_cnn(batch_norm=True)
    x, y = batch()
    state = copy.deepcopy(model.state_dict())

    def step_loss(x, y):
        return F.cross_entropy(model(x), y) + ALPHA * mgs_penalty(model, x, reduction="sum")

    _, breaks = graphs_and_breaks(step_loss, x, y)
    assert breaks and all("disable" in reason for reason in breaks), breaks
    model.load_state_dict(state)
    eager_loss = step_loss(x, y)
    eager = gradients(model, eager_loss)
    after_eager = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    compiled_loss = torch.compile(step_loss)(x, y)
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-12 * abs(eager_loss.item())
    for c, e in zip(gradients(model, compiled_loss), eager):
        assert relative_error(c, e) < 1e-10
    for key, value in model.state_dict().items():  # the running statistics moved once, as in the eager step
        # to float64 rounding: Inductor's C++ kernels sum the batch statistics in their own order (vector width by CPU)
        torch.testing.assert_close(value, after_eager[key], rtol=1e-13, atol=1e-15, msg=key)
        moved = not torch.equal(state[key], after_eager[key])
        assert moved == (not torch.equal(value, state[key])), key  # moved in the compiled step exactly where eager moved


def test_a_chunked_penalty_runs_eagerly_inside_a_compiled_step():
    """``chunk_size`` rebuilds each chunk's graph in Python during backward: the call leaves the graph, exactly."""
    model = small_cnn()
    x, _ = batch()

    def penalty(x):
        return mgs_penalty(model, x, chunk_size=2)

    _, breaks = graphs_and_breaks(penalty, x)
    assert breaks and all("disable" in reason for reason in breaks), breaks
    compiled = torch.compile(penalty)(x)
    eager = mgs_penalty(model, x)
    assert abs(compiled.item() - eager.item()) <= 1e-12 * eager.item()
    for c, e in zip(gradients(model, compiled), gradients(model, eager)):
        assert relative_error(c, e) < 1e-12


def test_compiled_dropout_draws_masks_with_the_eager_distribution():
    """A traced call draws its per-sample Dropout masks from the compiled graph's random stream: not the eager masks,
    but the same distribution. Mean tr K over 1,000 calls each (eager reseeded per call) within 5 standard errors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def penalty(x):
        return mgs_penalty(model, x)

    assert graphs_and_breaks(penalty, x) == (1, [])
    compiled = torch.compile(penalty)
    traced = torch.tensor([compiled(x).item() for _ in range(1000)])
    eager = []
    for i in range(1000):
        torch.manual_seed(10_000 + i)  # mgs_torch forks the global state: reseed for independent eager masks
        eager.append(mgs_penalty(model, x).item())
    eager = torch.tensor(eager)
    assert traced.unique().numel() > 900  # fresh masks on every call
    standard_error = (traced.var() / 1000 + eager.var() / 1000).sqrt()
    assert abs(traced.mean() - eager.mean()) < 5 * standard_error


def test_a_compiled_hugging_face_step_on_a_padded_batch_is_one_graph_and_equals_the_loop():
    """A BERT classifier from a config (nothing downloaded) on a padded batch passed as the tokenizer's dict: one
    graph, and the penalty gradient equals the loop's over each sample run alone without its padding."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    from hf_helpers import loop_trace_gradient

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).double()
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:], mask[2, 3:] = 0, 0
    inputs = {"input_ids": torch.randint(1, 50, (3, 8)), "attention_mask": mask}

    def penalty(inputs):
        return mgs_penalty(model, inputs, reduction="sum")

    assert graphs_and_breaks(penalty, inputs) == (1, [])
    compiled = gradients(model, torch.compile(penalty)(inputs))
    loop = loop_trace_gradient(model, inputs)
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731 - one norm over every parameter
    assert relative_error(flat(compiled), flat(loop)) < 1e-10


def test_strategy_structured_runs_eagerly_inside_a_compiled_step():
    """The structured engine registers forward hooks per call, which Dynamo cannot trace: asked for by name, it
    runs eagerly inside the compiled step (where it is often faster than the traced reference engine)."""
    model = small_cnn()
    x, y = batch()

    def step_loss(x, y):
        return F.cross_entropy(model(x), y) + ALPHA * mgs_penalty(model, x, strategy="structured")

    _, breaks = graphs_and_breaks(step_loss, x, y)
    assert breaks and all("disable" in reason for reason in breaks), breaks
    compiled = gradients(model, torch.compile(step_loss)(x, y))
    for c, e in zip(compiled, gradients(model, step_loss(x, y))):
        assert relative_error(c, e) < 1e-12


def test_the_compile_benchmark_reports_one_graph_and_equal_steps(monkeypatch, capsys):
    """benchmarks/bench_compile.py (also part 5 of gpu_check.sh) on the smallest configuration: its rows say one graph,
    no break, and a compiled step equal to the eager one; times are printed, never asserted on."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_compile_under_test", root / "benchmarks" / "bench_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--models", "fcn", "--batch", "2", "--steps", "exact trace penalty", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| fcn")]
    assert len(rows) == 1
    graphs, breaks, loss_diff, grad_diff = (cell.strip() for cell in rows[0][3:7])
    assert (graphs, breaks) == ("1", "0")
    assert float(loss_diff) < 1e-5 and float(grad_diff) < 1e-5  # float32


def test_compiled_whole_batch_penalty_with_train_mode_batch_norm_equals_eager_and_the_loop():
    """``batch_norm="batch"``: the Jacobian of the whole-batch function (batch statistics), traced into the graph;
    it never reads the running statistics the step's forward updates, so Inductor's bug does not apply."""
    model = small_cnn(batch_norm=True)
    x, y = batch()
    state = copy.deepcopy(model.state_dict())

    def step_loss(x, y):
        return F.cross_entropy(model(x), y) + ALPHA * mgs_penalty(model, x, batch_norm="batch", reduction="sum")

    assert graphs_and_breaks(step_loss, x, y) == (1, [])
    model.load_state_dict(state)
    eager = gradients(model, step_loss(x, y))
    model.load_state_dict(state)
    compiled = gradients(model, torch.compile(step_loss)(x, y))
    model.load_state_dict(state)
    ce = gradients(model, F.cross_entropy(model(x), y))
    model.load_state_dict(state)
    loop = [c + ALPHA * (0.0 if p is None else p) for c, p in zip(ce, penalty_grad_loop(model, x, "trace", whole_batch=True))]
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731 - one norm: the conv bias before a
    # train-mode BatchNorm has a gradient of zero up to rounding
    assert relative_error(flat(compiled), flat(eager)) < 1e-10
    assert relative_error(flat(compiled), flat(loop)) < 1e-9


def test_a_model_with_backward_hooks_runs_the_penalty_eagerly_and_exactly():
    """Module backward hooks: torch.func cannot run them, so the eager route sets them aside for the call; a traced
    graph cannot, so the call runs eagerly (it failed with torch.func's autograd.Function error before). The hook
    still fires once, in the step's own backward."""
    model = small_cnn()
    x, y = batch()
    calls = []
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(1))

    def step_loss(x, y):
        return F.cross_entropy(model(x), y) + ALPHA * mgs_penalty(model, x, reduction="sum")

    _, breaks = graphs_and_breaks(step_loss, x, y)
    assert any("disable" in reason for reason in breaks), breaks
    calls.clear()
    eager = gradients(model, step_loss(x, y))
    assert len(calls) == 1
    compiled = gradients(model, torch.compile(step_loss)(x, y))
    assert len(calls) == 2
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    assert relative_error(flat(compiled), flat(eager)) < 1e-12


def test_traced_code_never_asks_cuda_whether_it_captures_a_graph(monkeypatch):
    """``torch.cuda.is_current_stream_capturing`` breaks Dynamo's graph on CUDA (found on an H200: one of the
    compiled penalty step's breaks); the NaN check and the log-det ask ``is_compiling`` first and stop there."""
    from mgs_torch import _linalg, _validation

    def asked(device):
        raise AssertionError("capturing_cuda_graph was called while compiling")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(_validation, "capturing_cuda_graph", asked)
    monkeypatch.setattr(_linalg, "capturing_cuda_graph", asked)
    out = torch.full((2, 3), float("nan"))
    assert _validation.check_outputs(out, 2) is out  # no host sync, no NaN error while compiling
    K = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(_linalg.logdet_psd(K), torch.zeros((), dtype=torch.float64))
