"""Hugging Face ``transformers`` classifiers (tiny random configurations) through ``verify``: K and the
trace-penalty gradient against the float64 per-sample autograd loop, both strategies.

Skipped without ``transformers`` (an optional extra: ``pip install -e ".[hf]"``; nothing is downloaded:
the models are built from configurations). They bring what hand-written models may not: learned and
rotary position embeddings, attention masks built from padding, grouped-query attention, GPT-2's
Conv1D layers, the pooler, and classifiers that read the last non-padding token. LLaMA's RMSNorm and
rotary embeddings compute in float32 even in a float64 model: verify says so and checks to that rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from optional import require_extra
from mgs_torch import verify

T = require_extra("transformers", "hf")


class Logits(nn.Module):
    """The raw outputs MGS needs: the ``logits`` field of a Hugging Face model output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


_TEXT = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=20, num_labels=2)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

ARCHITECTURES = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**_TEXT, **_NO_DROPOUT, max_position_embeddings=16)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_TEXT, **_NO_DROPOUT, max_position_embeddings=20, pad_token_id=1)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=8, n_layers=2, n_heads=2, hidden_dim=16, vocab_size=20, max_position_embeddings=16, num_labels=2, dropout=0.0, attention_dropout=0.0)),
    "gpt2": lambda: T.GPT2ForSequenceClassification(T.GPT2Config(
        n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=16, num_labels=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**_TEXT, max_position_embeddings=16, num_key_value_heads=1, head_dim=4, pad_token_id=0)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, image_size=8, patch_size=4, num_channels=1, num_labels=2, **_NO_DROPOUT)),
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], num_labels=2)),
}


@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_transformers_architecture_matches_the_autograd_loop(name, strategy):
    torch.manual_seed(0)
    model = Logits(ARCHITECTURES[name]()).eval()
    if name in ("vit", "resnet"):
        x = torch.randn(3, 1, 8, 8)
    else:
        x = torch.randint(2, 20, (3, 6))
        x[1, 4:] = 0  # padding at the end (the pad token of GPT-2 and LLaMA): their classifiers read the last real token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify(model, x, samples=3, strategy=strategy)
    assert report.ok, str(report)
    assert report.gradient_error is not None, str(report)
    if name == "llama":
        assert report.tolerance > 1e-8 and any("float32" in note for note in report.notes), str(report)
    else:
        assert report.kernel_error <= 1e-12 and report.gradient_error <= 1e-12, str(report)
