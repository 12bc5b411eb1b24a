"""Kernels of language models that scale (issue 21, item 4): a tiny GPT-2 with LoRA adapters (peft), the
kernel over the LoRA parameters only (``params=``), exact against the plain autograd loop over each
sample alone with its padding removed where the definition is exact:

* ``next_token_logits()``: K is the principal submatrix of the full (n·T·V)² kernel at the rows of the
  next tokens; padded positions give zero rows;
* ``label_logits()``: the same for a token-classification head with ``labels`` (−100 ignored);
* ``VocabSketch``: K_sketch = S K Sᵀ for the fixed sketch S, exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_helpers import T, batch_for, loop_jacobian, relative, unpadded
from mgs_torch import mgs_kernel, mgs_penalty, verify
from mgs_torch.hf import VocabSketch, label_logits, next_token_logits, token_rows

peft = pytest.importorskip("peft")

V = 20


def lora(name, _p) -> bool:
    return "lora_" in name


@pytest.fixture(scope="module")
def gpt2_lora():
    torch.manual_seed(0)
    base = T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=8, n_layer=2, n_head=2, vocab_size=V, n_positions=16, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).double()
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0,
                                                          fan_in_fan_out=True))
    with torch.no_grad():  # LoRA starts with B = 0, where every A-gradient vanishes: move off that point
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.eval()


def _next_token_rows_of_the_loop(out, inputs):
    ids = inputs["input_ids"]
    return out.logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_next_token_kernel_of_lora_parameters_is_exact(gpt2_lora):
    batch = batch_for("gpt2")  # lengths 6, 4, 5: 5 + 3 + 4 real next tokens
    select = next_token_logits()
    assert [n for n, p in gpt2_lora.named_parameters() if p.requires_grad] == [n for n, _ in gpt2_lora.named_parameters() if "lora_" in n]
    K = mgs_kernel(gpt2_lora, batch, logits=select, params=lora)
    rows = token_rows(select, batch)
    assert K.shape == (15, 15) and int(rows.sum()) == 12
    J = loop_jacobian(gpt2_lora, batch, select=_next_token_rows_of_the_loop, params=lora)
    assert relative(K[rows][:, rows], J @ J.T) <= 1e-12
    assert float(K[~rows].abs().max()) == 0.0  # padding: zero rows, tr K is the sum over real next tokens
    # it is the principal submatrix of the full kernel of all T·V logits at those rows
    full = mgs_kernel(gpt2_lora, batch, params=lora)  # (3·6·20)²
    ids = batch["input_ids"]
    index = torch.tensor([i * 6 * V + t * V + int(ids[i, t + 1]) for i in range(3) for t in range(5)])
    assert relative(K[rows][:, rows], full[index][:, index][rows][:, rows]) <= 1e-12
    # the penalty and verify take the same selector
    value = mgs_penalty(gpt2_lora, batch, logits=select, params=lora, reduction="sum")
    assert relative(value, (J**2).sum()) <= 1e-12
    report = verify(gpt2_lora, batch, samples=3, logits=select, params=[n for n, _ in gpt2_lora.named_parameters() if "lora_" in n])
    assert report.ok and report.kernel_error <= 1e-12, str(report)


def test_label_logits_of_a_token_classifier_ignore_minus_100():
    torch.manual_seed(0)
    model = T.BertForTokenClassification(T.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=V, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16)).double().eval()
    batch = batch_for("bert")
    labels = torch.randint(0, 3, batch["input_ids"].shape)
    labels[batch["attention_mask"] == 0] = -100
    labels[0, 0] = -100  # e.g. a [CLS] token the loss ignores
    batch = {**batch, "labels": labels}
    select = label_logits()
    K = mgs_kernel(model, batch, logits=select)
    rows = token_rows(select, batch)
    assert int(rows.sum()) == 14  # 6 + 4 + 5 real tokens, one ignored

    def label_logit(out, inputs):
        return out.logits.gather(-1, inputs["labels"].clamp_min(0)[..., None]).squeeze(-1)

    J = loop_jacobian(model, batch, select=label_logit)  # every real token of each sample alone
    kept = torch.cat([unpadded(batch, i)["labels"].reshape(-1) != -100 for i in range(3)])
    J = J[kept]
    assert relative(K[rows][:, rows], J @ J.T) <= 1e-12
    assert float(K[~rows].abs().max()) == 0.0


def test_the_vocabulary_sketch_is_an_exact_projection(gpt2_lora):
    batch = batch_for("gpt2", lengths=(5, 5))
    sketch = VocabSketch(V, num_probes=3, seed=1)
    K_sketch = mgs_kernel(gpt2_lora, batch, logits=sketch, params=lora)  # (2·5·3)²
    J = loop_jacobian(gpt2_lora, batch, select=lambda out, inputs: out.logits, params=lora)  # all (2·5·20) logits
    S = torch.block_diag(*[sketch.matrix.T] * 10)  # I_{nT} ⊗ Rᵀ/√P
    assert relative(K_sketch, S @ (J @ J.T) @ S.T) <= 1e-12
    assert K_sketch.shape == (30, 30)
    with pytest.raises(ValueError, match="logits have 20 vocabulary entries, the sketch was made for 7"):
        mgs_kernel(gpt2_lora, batch, logits=VocabSketch(7), params=lora)


def test_selector_errors(gpt2_lora):
    batch = batch_for("gpt2")
    with pytest.raises(TypeError, match=r"reads 'input_ids' from the inputs.*mapping"):
        mgs_kernel(gpt2_lora.base_model.model, (batch["input_ids"],), logits=next_token_logits(), params=lora)
    with pytest.raises(TypeError, match="shape \\(batch, positions, vocabulary\\)"):
        mgs_kernel(T.BertForSequenceClassification(T.BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=V)).double(),
            batch_for("bert"), logits=next_token_logits())
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        VocabSketch(V, num_probes=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lora_adapters_on_a_padded_bert_are_exact(attn):
    """Issue 20, class 1: LoRA adapters on a padded BERT were 15-22 % off (the boolean SDPA mask added as 1/0).
    K and the trace-penalty gradient of the adapters alone, against the loop over each sample without its padding."""
    from hf_helpers import loop_trace_gradient, tiny
    from mgs_torch import mgs_kernel, mgs_penalty

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny("bert", attn), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                                       lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at initialisation makes every A-gradient vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.eval()
    batch = batch_for("bert")
    assert (batch["attention_mask"] == 0).any()  # padded
    K = mgs_kernel(model, batch, params=lora)
    assert relative(K, loop_jacobian(model, batch, params=lora) @ loop_jacobian(model, batch, params=lora).T) < 1e-10
    grads = torch.autograd.grad(mgs_penalty(model, batch, params=lora, reduction="sum"),
                                [p for n, p in model.named_parameters() if lora(n, p)])
    expected = loop_trace_gradient(model, batch, params=lora)
    assert relative(torch.cat([g.reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in expected])) < 1e-10
