"""Hugging Face ``transformers`` models (tiny random configurations, nothing downloaded) as users call
them: the tokenizer's dict with its attention mask in, a ``ModelOutput`` out.

Padded batches take the per-sample route (issue 21: they fell to the whole-batch route, because
transformers' mask helpers read ``padding_mask.all()`` in a Python ``if``, which vmap refuses) and are
exact against a plain autograd loop over each sample run alone *with its padding removed*, in float64,
with ``attn_implementation`` "eager" and "sdpa", in eval and train mode (every dropout probability 0,
so that train mode is deterministic). ``verify`` passes on each padded batch. LLaMA's RMSNorm and
rotary embeddings compute in float32 even in a float64 model, so LLaMA agrees to float32 rounding.

Skipped without ``transformers`` (the optional extra ``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_helpers import BUILDERS, T, batch_for, loop_kernel, loop_trace_gradient, relative, tiny
from mgs_torch import mgs_kernel, mgs_penalty, verify
from mgs_torch._guards import preserved_state
from mgs_torch._problem import build_problem


def _tolerance(name: str) -> float:
    return 1e-5 if name == "llama" else 1e-10  # LLaMA computes RMSNorm and rotary embeddings in float32


def _takes_the_per_sample_route(model, batch) -> bool:
    with preserved_state(model, "eval"):
        return build_problem(model, batch, revalidate=True).per_sample


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_padded_batch_is_per_sample_and_exact_against_the_unpadded_loop(name, attn, mode):
    model = tiny(name, attn).train(mode == "train")
    batch = batch_for(name)
    assert _takes_the_per_sample_route(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no whole-batch fallback, no samples-interact warning
        K = mgs_kernel(model, batch)
        value = mgs_penalty(model, batch, reduction="sum")
    plist = [p for p in model.parameters() if p.requires_grad]
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(value, plist, allow_unused=True), plist)]
    K_loop = loop_kernel(model, batch)
    assert K.shape == K_loop.shape == (6, 6)  # n·q = 3·2
    assert relative(K, K_loop) <= _tolerance(name)
    assert relative(torch.cat([g.reshape(-1) for g in grads]),
                    torch.cat([g.reshape(-1) for g in loop_trace_gradient(model, batch)])) <= _tolerance(name)
    assert [m.training for m in model.modules()] == [mode == "train"] * len(list(model.modules()))


@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_verify_passes_on_a_padded_batch(name, strategy):
    model = tiny(name, "sdpa", dtype=torch.float32)  # verify checks on a float64 copy of the user's model
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch_for(name).items()}
    report = verify(model, batch, samples=3, strategy=strategy)
    assert report.ok, str(report)
    assert report.gradient_check == "autograd" and report.gradient_error is not None, str(report)
    assert not any("whole-batch" in route for route in report.routes.values()), str(report)
    if name == "llama":
        assert report.tolerance > 1e-8 and any("float32" in note for note in report.notes), str(report)
    else:
        assert report.kernel_error <= 1e-12 and report.gradient_error <= 1e-12, str(report)


def test_verify_passes_on_a_convolutional_classifier():
    torch.manual_seed(0)
    model = T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], num_labels=2)).eval()
    report = verify(model, {"pixel_values": torch.randn(3, 1, 8, 8)}, samples=3)
    assert report.ok and report.kernel_error <= 1e-12, str(report)


def test_a_padded_batch_without_its_mask_is_another_function():
    """The mask is what makes a padded sample equal to the sample alone: without it the kernel differs from the
    unpadded loop (so the test above is not passing by accident), and mgs_torch still runs per sample."""
    model = tiny("bert")
    batch = batch_for("bert")
    K_loop = loop_kernel(model, batch)
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    exact = relative(mgs_kernel(model, batch), K_loop)
    assert exact <= 1e-11
    assert relative(mgs_kernel(model, no_mask), K_loop) > 1e4 * max(exact, 1e-16)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_without_the_mask_fix_padded_batches_fall_to_the_whole_batch_route(name, monkeypatch):
    """The root cause, pinned: with transformers' mask helpers left to read the padding mask under vmap, the
    forward is refused per sample and mgs_torch differentiates the whole-batch function (n times the cost). That
    route is exact too for a masked batch (the boolean SDPA mask through op_fixes, commit c5e1183)."""
    import contextlib

    import mgs_torch.hf._masks as masks

    model, batch = tiny(name), batch_for(name)
    monkeypatch.setattr(masks, "masks_built_under_transforms", contextlib.nullcontext)
    assert not _takes_the_per_sample_route(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its one-time whole-batch warning
        K = mgs_kernel(model, batch)
    assert relative(K, loop_kernel(model, batch)) <= 1e-11
    monkeypatch.undo()
    assert _takes_the_per_sample_route(model, batch)


def test_gpt2_conv1d_takes_the_linear_rule():
    """GPT-2's ``Conv1D`` (y = x W + b, the weight stored transposed) is a linear layer: the Linear rule covers it by
    its exact type (matched by name, so the core never imports transformers); K is exact (the tests above)."""
    report = verify(tiny("gpt2", "sdpa", dtype=torch.float32), {k: v.float() if v.is_floating_point() else v
                                                                for k, v in batch_for("gpt2").items()}, samples=3)
    conv = {name: route for name, route in report.routes.items() if ".attn.c_" in name or ".mlp.c_" in name}
    assert conv and set(conv.values()) == {"rule:Conv1D"}, str(report)
    assert report.ok and report.kernel_error <= 1e-12, str(report)
