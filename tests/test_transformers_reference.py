"""Hugging Face ``transformers`` classifiers (tiny random configurations, eval mode, float64): K and the
trace-penalty gradient of both strategies against the independent per-sample autograd loop of
``tests/reference.py`` — not ``verify``, which takes "per-sample or whole-batch" from the library's
own problem (issue 25). Nothing is downloaded: the models are built from configurations.

Skipped without ``transformers`` (``pip install -e ".[hf]"``; MGS_REQUIRE_EXTRAS=1 fails instead, see
tests/optional.py). LLaMA's RMSNorm and rotary embeddings compute in float32 inside a float64 model, so
their penalty gradients agree only to that rounding (measured 7e-8 structured, 8e-9 jacobian; K to 6e-16).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from architectures import assert_matches_the_loop, loop_reference
from optional import require_extra

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
GRAD_TOLERANCE = {"llama": 1e-6}  # float32 RMSNorm and rotary embeddings inside the float64 model


def _model_and_input(name):
    torch.manual_seed(0)
    model = Logits(ARCHITECTURES[name]()).double().eval()
    if name in ("vit", "resnet"):
        return model, torch.randn(3, 1, 8, 8, dtype=torch.float64)
    x = torch.randint(2, 20, (3, 6))
    x[1, 4:] = 0  # padding at the end (the pad token of GPT-2 and LLaMA): their classifiers read the last real token
    return model, x


@functools.lru_cache(maxsize=None)
def _reference(name):
    """The loop's K and ∂ tr K/∂θ, once per architecture (both strategies compare with it)."""
    return loop_reference(*_model_and_input(name))


@pytest.mark.parametrize("strategy", ["structured", "jacobian"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_transformers_architecture_matches_the_autograd_loop(name, strategy):
    assert_matches_the_loop(*_model_and_input(name), strategy, _reference(name), tol=1e-12, grad_tol=GRAD_TOLERANCE.get(name, 1e-12))
