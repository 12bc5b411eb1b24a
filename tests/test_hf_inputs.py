"""Inputs and outputs as they come (issue 21, item 1): a mapping of keyword inputs in, a ``ModelOutput``,
dict or tuple out through ``logits=``, the same in every entry point — ``mgs_kernel``, ``mgs_trace``,
``mgs_penalty``, ``verify``, the per-sample scores, ``MGSMonitor`` and the mixin — each against the
plain autograd loop over each sample alone with its padding removed; and one test per documented error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_helpers import T, batch_for, loop_kernel, loop_trace_gradient, relative, tiny, unpadded
from mgs_torch import mgs_kernel, mgs_penalty, mgs_sample_scores, mgs_trace, verify


@pytest.fixture(scope="module")
def bert():
    return tiny("bert")


@pytest.fixture(scope="module")
def batch():
    return batch_for("bert")


def test_the_tokenizer_dict_and_model_output_go_in_as_they_come(bert, batch):
    """The issue's first attempt: mgs_kernel(model, batch) with the tokenizer's dict, no wrapper."""
    K_loop = loop_kernel(bert, batch)
    assert relative(mgs_kernel(bert, batch), K_loop) <= 1e-11
    assert relative(mgs_kernel(bert, batch, strategy="jacobian"), K_loop) <= 1e-11
    assert relative(mgs_trace(bert, batch), K_loop.trace()) <= 1e-11
    n_q = K_loop.shape[0]
    assert relative(mgs_penalty(bert, batch), K_loop.trace() / n_q) <= 1e-11
    assert relative(mgs_penalty(bert, batch, kind="logdet", reduction="sum"), torch.linalg.slogdet(K_loop)[1]) <= 1e-9
    # the chunked trace penalty (graphs recomputed in backward) takes the mapping too
    value = mgs_penalty(bert, batch, chunk_size=2, reduction="sum")
    plist = [p for p in bert.parameters() if p.requires_grad]
    ours = torch.autograd.grad(value, plist, allow_unused=True)
    theirs = loop_trace_gradient(bert, batch)
    assert relative(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(ours, plist)]),
                    torch.cat([g.reshape(-1) for g in theirs])) <= 1e-10


def test_other_values_in_the_mapping_pass_through_unchanged(bert, batch):
    """return_dict=False makes the model return a tuple: the flag reaches the model, and logits=0 reads it."""
    K_loop = loop_kernel(bert, batch)
    as_tuple = {**batch, "return_dict": False, "output_hidden_states": None}
    with pytest.raises(TypeError, match=r"returned tuple of 1 items.*logits="):
        mgs_kernel(bert, as_tuple)
    assert relative(mgs_kernel(bert, as_tuple, logits=0), K_loop) <= 1e-11
    assert relative(mgs_kernel(bert, {**batch, "output_hidden_states": True}), K_loop) <= 1e-11


def test_selectors_by_key_and_by_callable(bert, batch):
    K_loop = loop_kernel(bert, batch)
    assert relative(mgs_kernel(bert, batch, logits="logits"), K_loop) <= 1e-11
    first = loop_kernel(bert, batch, select=lambda out, inputs: out.logits[:, :1])
    assert relative(mgs_kernel(bert, batch, logits=lambda out: out.logits[:, :1]), first) <= 1e-11

    # a two-argument selector also gets the same samples' inputs (under vmap: one sample's)
    def scaled(out, inputs):
        return out.logits * inputs["attention_mask"].sum(-1, keepdim=True)

    assert relative(mgs_kernel(bert, batch, logits=scaled), loop_kernel(bert, batch, select=scaled)) <= 1e-11


def test_a_question_answering_head_names_its_outputs():
    torch.manual_seed(0)
    model = T.BertForQuestionAnswering(T.BertConfig(**{k: v for k, v in dict(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=20,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16).items()})).double().eval()
    batch = batch_for("bert", lengths=(5, 5))  # unpadded: per-position outputs of equal length
    with pytest.raises(TypeError, match=r"QuestionAnsweringModelOutput with keys \['start_logits', 'end_logits'\].*logits="):
        mgs_kernel(model, batch)
    with pytest.raises(TypeError, match=r"logits='logit' names no entry.*start_logits"):
        mgs_kernel(model, batch, logits="logit")

    def both(out, inputs=None):
        return torch.stack([out.start_logits, out.end_logits], -1)

    assert relative(mgs_kernel(model, batch, logits=both), loop_kernel(model, batch, select=both)) <= 1e-11
    assert relative(mgs_kernel(model, batch, logits="start_logits"),
                    loop_kernel(model, batch, select=lambda out, inputs: out.start_logits)) <= 1e-11


def test_verify_and_the_scores_take_the_mapping(bert, batch):
    report = verify(bert, {**batch, "return_dict": False}, samples=3, logits=0)
    assert report.ok and report.kernel_error <= 1e-12, str(report)

    K_loop = loop_kernel(bert, batch)
    n, q = 3, 2
    blocks = K_loop.reshape(n, q, n, q)
    outputs_form = mgs_sample_scores(bert, batch)
    assert relative(outputs_form.gram, blocks.diagonal(dim1=1, dim2=3).sum(-1)) <= 1e-11

    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        logits = torch.cat([bert(**unpadded(batch, i)).logits for i in range(n)])
    w = torch.softmax(logits, 1) - F.one_hot(labels, q).double()  # ∂ cross-entropy / ∂ logits
    loss_form = mgs_sample_scores(bert, batch, targets=labels)
    assert relative(loss_form.gram, torch.einsum("ia,iajb,jb->ij", w, blocks, w)) <= 1e-10
    # and with a selector: the first logit alone, squared error against 0 (w_i = 2 f_i1)
    first = mgs_sample_scores(bert, {**batch, "return_dict": False}, targets=torch.zeros(n, 1), loss="mse",
                              logits=lambda out: out[0][:, :1])
    w1 = 2 * logits[:, :1]
    assert relative(first.gram, torch.einsum("ia,iajb,jb->ij", w1, blocks[:, :1, :, :1], w1)) <= 1e-10


class DictNet(nn.Module):
    """A plain module with keyword inputs and a dict output (the shape many hand-written models have)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3).double(), nn.Linear(2, 3).double()

    def forward(self, image, meta, scale: float = 1.0):
        return {"logits": scale * torch.tanh(self.a(image) + self.b(meta)), "features": image}


def test_a_plain_module_with_keyword_inputs_and_a_dict_output():
    net = DictNet()
    image, meta = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    J = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(net(image[i:i + 1], meta[i:i + 1], 2.0)["logits"][0, a], list(net.parameters()))])
        for i in range(3) for a in range(3)
    ])
    K = mgs_kernel(net, {"image": image, "meta": meta, "scale": 2.0})
    assert relative(K, J @ J.T) <= 1e-12
    # positional inputs and a key selector give the same
    assert relative(mgs_kernel(net, (image, meta), logits="logits"), mgs_kernel(net, {"image": image, "meta": meta})) <= 1e-14


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        ({"image": torch.randn(3, 4), "meta": torch.randn(2, 2)}, ValueError, r"disagree on the batch size.*'image': 3, 'meta': 2"),
        ({"image": [1.0], "scale": 2.0}, TypeError, "holds no tensor"),
        ({"image": torch.randn(3, 4), "meta": torch.tensor(1.0)}, ValueError, r"'meta' is a 0-dimensional tensor.*Python number"),
        ({"image": torch.randn(3, 4), "meta": torch.randn(3, 2), "labels": torch.zeros(3)}, TypeError,
         r"DictNet.forward takes no keyword argument 'labels' \(it takes image, meta, scale\)"),
        ({}, TypeError, "empty mapping"),
        ({0: torch.randn(3, 4)}, TypeError, "keys must be strings"),
    ],
    ids=["batch-mismatch", "no-tensor", "0-d", "unknown-keyword", "empty", "non-str-key"],
)
def test_bad_mappings(inputs, error, match):
    net = DictNet()
    inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    for fn in (mgs_kernel, mgs_trace, mgs_penalty):
        with pytest.raises(error, match=match):
            fn(net, inputs)


@pytest.mark.parametrize(
    "logits, error, match",
    [
        (1.5, TypeError, "got float"),
        (True, TypeError, "got bool"),
        ("scores", TypeError, r"logits='scores' names no entry.*\['logits', 'features'\]"),
        (3, TypeError, r"logits=3 indexes a tuple output, but the model returned dict"),
        (lambda out: out["logits"].tolist(), TypeError, "gave list, not a tensor"),
    ],
    ids=["float", "bool", "missing-key", "index-of-dict", "not-a-tensor"],
)
def test_bad_selectors(logits, error, match):
    net = DictNet()
    inputs = {"image": torch.randn(3, 4, dtype=torch.float64), "meta": torch.randn(3, 2, dtype=torch.float64)}
    for fn in (mgs_kernel, mgs_trace, mgs_penalty):
        with pytest.raises(error, match=match):
            fn(net, inputs, logits=logits)


def test_a_dict_output_without_logits_says_how_to_select():
    class Scores(DictNet):
        def forward(self, image, meta, scale: float = 1.0):
            return {"scores": super().forward(image, meta, scale)["logits"]}

    inputs = {"image": torch.randn(3, 4, dtype=torch.float64), "meta": torch.randn(3, 2, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"returned dict with keys \['scores'\].*logits='start_logits'"):
        mgs_kernel(Scores(), inputs)
    assert mgs_kernel(Scores(), inputs, logits="scores").shape == (9, 9)


# ------------------------------------------------------------------------------------------------
# Lightning: the monitor and the mixin on a Hugging Face model with the collator's dict batches

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import fit  # noqa: E402
from mgs_torch.lightning import MGSMonitor, MGSRegularizedMixin  # noqa: E402


class HFModule(MGSRegularizedMixin, pl.LightningModule):
    """A LightningModule around a Hugging Face classifier; batches are the collator's dicts with labels."""

    def __init__(self, **mgs):
        super().__init__(**mgs)
        self.model = tiny("bert")

    def mgs_module(self):
        return self.model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss  # the model's own cross-entropy on batch["labels"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dict_loader(n: int = 6, batch_size: int = 3):
    data = batch_for("bert", lengths=(6, 4, 5, 3, 6, 2))
    rows = [{**{k: v[i] for k, v in data.items()}, "labels": torch.tensor(i % 2)} for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)  # default_collate stacks the dicts


def test_the_mixin_and_the_monitor_read_a_dict_batch(tmp_path):
    module = HFModule(mgs_alpha=0.1)
    batch = next(iter(_dict_loader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # the default leaves the targets out
    K_loop = loop_kernel(module.model, inputs)
    assert relative(module.mgs_compute_penalty(batch), K_loop.trace() / K_loop.shape[0]) <= 1e-11
    monitor = MGSMonitor(dtype=torch.float64)
    assert relative(torch.tensor(monitor.compute(module, batch).trace, dtype=torch.float64), K_loop.trace()) <= 1e-11

    # and both inside a fit, with a fixed probe drawn from the dict dataset
    monitor = MGSMonitor(probe="train", max_samples=3, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(module, tmp_path, train=_dict_loader(), callbacks=[monitor], max_steps=2)
    assert isinstance(monitor.probe_inputs, dict) and set(monitor.probe_inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    traces = trainer.logger.values("mgs/trace")
    penalties = trainer.logger.values("train/mgs_penalty")
    assert len(traces) == 2 and len(penalties) == 2
    assert all(torch.isfinite(torch.tensor(v)) for _, v in traces + penalties)
