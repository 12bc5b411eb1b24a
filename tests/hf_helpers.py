"""Tiny Hugging Face models built from configurations (nothing downloaded), padded batches, and the
reference every Hugging Face test compares with: a plain autograd loop over each sample run *alone
with its padding removed* (no torch.func, no mgs_torch)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from optional import require_extra

T = require_extra("transformers", "hf")  # skipped without it; MGS_REQUIRE_EXTRAS=1 fails instead

T.logging.set_verbosity_error()  # GPT-2's config warns that its default bos/eos ids lie outside a 20-token vocabulary

VOCAB = 20
TEXT = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=VOCAB, num_labels=2)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
#: the token that pads each text model's batches (its config's pad_token_id)
PAD = {"bert": 0, "roberta": 1, "distilbert": 0, "gpt2": 0, "llama": 0}

BUILDERS = {
    "bert": lambda attn: T.BertForSequenceClassification(T.BertConfig(
        **TEXT, **NO_DROPOUT, max_position_embeddings=16, attn_implementation=attn)),
    "roberta": lambda attn: T.RobertaForSequenceClassification(T.RobertaConfig(
        **TEXT, **NO_DROPOUT, max_position_embeddings=20, pad_token_id=1, attn_implementation=attn)),
    "distilbert": lambda attn: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=8, n_layers=2, n_heads=2, hidden_dim=16, vocab_size=VOCAB, max_position_embeddings=16, num_labels=2,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, attn_implementation=attn)),
    "gpt2": lambda attn: T.GPT2ForSequenceClassification(T.GPT2Config(
        n_embd=8, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, num_labels=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)),
    "llama": lambda attn: T.LlamaForSequenceClassification(T.LlamaConfig(
        **TEXT, max_position_embeddings=16, num_key_value_heads=1, head_dim=4, pad_token_id=0, attn_implementation=attn)),
    "vit": lambda attn: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, image_size=8, patch_size=4,
        num_channels=1, num_labels=2, **NO_DROPOUT, attn_implementation=attn)),
}
TEXT_MODELS = [name for name in BUILDERS if name != "vit"]


def tiny(name: str, attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A tiny model of the family (every dropout probability 0, so train and eval mode compute alike)."""
    torch.manual_seed(seed)
    return BUILDERS[name](attn).to(dtype).eval()


def batch_for(name: str, lengths=(6, 4, 5), seed: int = 0) -> dict:
    """Right-padded token ids with their attention mask (ViT: pixel values), as a tokenizer returns them."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(len(lengths), 1, 8, 8, generator=g, dtype=torch.float64)}
    width = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        ids[i, length:] = PAD[name]
    batch = {"input_ids": ids, "attention_mask": mask}
    if name == "bert":
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def unpadded(batch: dict, i: int) -> dict:
    """Sample i alone (a batch of one) with its padding removed."""
    if "attention_mask" not in batch:
        return {k: v[i : i + 1] for k, v in batch.items()}
    length = int(batch["attention_mask"][i].sum())
    return {k: v[i : i + 1, :length] for k, v in batch.items()}


def parameters(model, params=None) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if p.requires_grad and (params is None or params(name, p))]


def loop_jacobian(model, batch: dict, select=lambda out, inputs: out.logits, params=None, create_graph: bool = False) -> torch.Tensor:
    """J by plain autograd, one row per output of each sample run alone without its padding."""
    plist = parameters(model, params)
    rows = []
    with sdpa_kernel(SDPBackend.MATH):  # PyTorch's fused attention kernels have no double backward
        for i in range(next(iter(batch.values())).shape[0]):
            inputs = unpadded(batch, i)
            out = select(model(**inputs), inputs).reshape(-1)
            for a in range(out.numel()):
                grads = torch.autograd.grad(out[a], plist, retain_graph=True, create_graph=create_graph, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, plist)]))
    return torch.stack(rows)


def loop_kernel(model, batch: dict, **kwargs) -> torch.Tensor:
    J = loop_jacobian(model, batch, **kwargs)
    return J @ J.T


def loop_trace_gradient(model, batch: dict, **kwargs) -> list[torch.Tensor]:
    """∂ tr K / ∂θ of the loop: the loop differentiated once more."""
    J = loop_jacobian(model, batch, create_graph=True, **kwargs)
    plist = parameters(model, kwargs.get("params"))
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad((J**2).sum(), plist, allow_unused=True), plist)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


def text_rows(count: int = 8, seed: int = 0, pad: int = 0) -> list[dict]:
    """A tiny text data set as a tokenizer's rows: variable-length token ids and a label each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (count,), generator=g)
    return [{"input_ids": torch.randint(2, VOCAB, (int(k),), generator=g).tolist(), "labels": i % 2} for i, k in enumerate(lengths)]


def pad_collate(features: list[dict], pad: int = 0) -> dict:
    """What DataCollatorWithPadding returns for these rows: right-padded ids, the attention mask, labels."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def trace_penalty_gradient(model, batch: dict, reduction: str = "mean") -> list[torch.Tensor]:
    """∂ g / ∂θ of the loop for g = tr K / (n·q) (``"mean"``) or tr K, K over each sample alone without padding."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    grads = loop_trace_gradient(model, inputs)
    if reduction == "sum":
        return grads
    with torch.no_grad():
        q = model(**unpadded(inputs, 0)).logits.shape[-1]
    n = inputs["input_ids"].shape[0]
    return [g / (n * q) for g in grads]
