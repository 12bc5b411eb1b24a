"""Small float64 models, one per layer family a user may put in a network (the audit matrix).

Every entry builds a fresh model and its inputs from a fixed seed: batch on dim 0 at the model's
input, raw outputs (n, q) with q = 2. Shapes are tiny so the per-sample autograd reference is fast.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mgs_torch import LayerRule, UnsupportedLayerError
from mgs_torch.engines.factors import DirectFactor

N, Q = 3, 2
D = torch.float64


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, tuple]]
    kernel_kwargs: dict = field(default_factory=dict)
    whole_batch: bool = False  # the reference differentiates one batched forward
    logdet: bool = True  # K is non-singular, so the log-det penalty is checked too
    # an op without a double backward in PyTorch: the loop differentiates ``reference_model`` (or the
    # reference's formula for the op), which test_audit checks against finite differences of the model itself
    grad_by_fd: bool = False
    reference_model: Callable[[nn.Module], nn.Module] | None = None  # the function MGS differentiates, if it differs
    refused: type | None = None  # mgs_torch must refuse this model with this error, changing nothing


def randn(*shape):
    return torch.randn(*shape, dtype=D)


class Head(nn.Module):
    """body -> flatten -> Linear(q): makes any feature extractor a classifier with q outputs."""

    def __init__(self, body: nn.Module, features: int, pre=None):
        super().__init__()
        self.body, self.pre = body, pre
        self.head = nn.Linear(features, Q)

    def forward(self, *x):
        h = self.body(*x)
        if self.pre is not None:
            h = self.pre(h)
        return self.head(torch.tanh(h).flatten(1))


def seq(*layers):
    return nn.Sequential(*layers)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ------------------------------------------------ families an outside probe tried (first run: all exact)


class InplaceResidual(nn.Module):
    """torchvision's BasicBlock pattern: in-place ReLU and ``out += identity`` (conv, eval BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.c2, self.relu, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(2 * 4 * 4, Q)

    def forward(self, x):
        out = self.c2(self.relu(self.bn(self.c1(x))))
        out += x
        return self.head(self.relu(out).flatten(1))


class MaskedAttention(nn.Module):
    """MultiheadAttention with a key padding mask (and optionally add_bias_kv / add_zero_attn), or with
    a causal attention mask whose averaged attention weights are part of the output."""

    def __init__(self, weights_out: bool = False, **kw):
        super().__init__()
        self.weights_out = weights_out
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, **kw)
        self.head = nn.Linear(4 + (16 if weights_out else 0), Q)

    def forward(self, x):  # (n, T=4, 4)
        if self.weights_out:
            causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
            h, w = self.attn(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=True)
            return self.head(torch.cat([h.mean(1), w.flatten(1)], 1))
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        h, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        return self.head(h.mean(1))


class MaskedAttentionFloat(nn.Module):
    """Self-attention (no biases) with a float 3-D attention mask per head and a float key padding mask; the
    per-head attention weights (average_attn_weights=False) are part of the output."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, bias=False)
        self.head = nn.Linear(4 + 2 * 16, Q)

    def forward(self, x):  # (n, T=4, 4), time-major inside
        n = x.shape[0]
        h = x.transpose(0, 1)
        bias = torch.linspace(-1.0, 0.5, 16, dtype=x.dtype).reshape(1, 4, 4).repeat(n * 2, 1, 1)
        pad = torch.zeros(n, 4, dtype=x.dtype)
        pad[:, 0] = -2.0
        y, w = self.attn(h, h, h, attn_mask=bias, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
        return self.head(torch.cat([y.mean(0), w.flatten(1)], 1))


class UnbatchedAttention(nn.Module):
    """MultiheadAttention called on one (T, E) sequence at a time (its unbatched form), with a boolean 2-D mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, Q)

    def forward(self, x):  # (n, T=4, 4)
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask[0, 1] = True
        ys = [self.attn(s, s, s, attn_mask=mask, need_weights=False)[0] for s in x.unbind(0)]
        return self.head(torch.stack(ys).mean(1))


class ProjectedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, proj_size=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(4, Q)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, Q)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.head(h)


class StraightThrough(nn.Module):
    """Quantisation with a straight-through estimator, and a detached skip."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(4, Q)

    def forward(self, x):
        h = self.a(x)
        hq = h + (torch.round(h * 2) / 2 - h).detach()
        return self.head(torch.tanh(hq) + 0.1 * h.detach())


class FrozenAndUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head, self.unused = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, Q), nn.Linear(2, 2)
        self.b.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2 * 4 * 4, Q)

    def forward(self, x):
        h = torch.tanh(self.c(x))
        return self.head(torch.tanh(self.c(h) + h).flatten(1))


class ScalarOutput(nn.Module):
    """q = 1 returned as shape (n,)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).squeeze(-1)


class Unpooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.pool, self.unpool = nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.head = nn.Linear(32, Q)

    def forward(self, x):
        p, i = self.pool(self.c(x))
        return self.head(torch.tanh(self.unpool(p * 2, i)).flatten(1))


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(2, 2, 2), nn.Linear(3 * 2 * 6 * 6, Q)

    def forward(self, x):  # (n, 2, 4, 4) -> 3×3 features -> 6×6 three ways
        h = self.c(x)
        ups = [
            F.interpolate(h, size=6, mode="nearest"),
            F.interpolate(h, scale_factor=2, mode="bicubic", align_corners=False),
            F.interpolate(h, size=6, mode="bilinear", align_corners=True),
        ]
        return self.head(torch.tanh(torch.cat(ups, 1)).flatten(1))


class CeilPoolsLazyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 2)
        self.pools = nn.ModuleList([
            nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d((2, 3)),
        ])
        self.head = nn.LazyLinear(Q)

    def forward(self, x):
        h = self.c(x)
        return self.head(torch.tanh(torch.cat([p(h).flatten(1) for p in self.pools], 1)))


class TransposedConvsLazyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c1 = nn.ConvTranspose1d(2, 2, 2, dilation=2)
        self.head = nn.LazyLinear(Q)

    def forward(self, x):
        a, b = torch.tanh(self.c2(x)), torch.tanh(self.c1(x.flatten(2)))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))


class SparseEmbeddings(nn.Module):
    """sparse=True Embedding and EmbeddingBag (with per_sample_weights): autograd's gradients are sparse."""

    def __init__(self, sparse: bool = True):
        super().__init__()
        self.emb, self.bag = nn.Embedding(6, 3, sparse=sparse), nn.EmbeddingBag(6, 3, mode="sum", sparse=sparse)
        self.head = nn.Linear(6, Q)

    def forward(self, idx):
        w = (idx.to(self.head.weight.dtype) + 1) / 7
        return self.head(torch.tanh(torch.cat([self.emb(idx).mean(1), self.bag(idx, per_sample_weights=w)], 1)))


class CausalSDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, Q)

    def forward(self, x):  # (n, T=4, 4), two heads of 2
        q, k, v = (t.unflatten(-1, (2, 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h.transpose(1, 2).flatten(2).mean(1))


class MaskedEncoderStack(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, activation="gelu")
        self.enc, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(4, Q)

    def forward(self, x):
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        return self.head(self.enc(x, src_key_padding_mask=pad).mean(1))


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def _symmetric_parametrization():
    model = seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, Q))
    nn.utils.parametrize.register_parametrization(model[2], "weight", Symmetric())
    return model, (randn(N, 4),)


def _old_weight_norm():
    """The deprecated hook-based ``nn.utils.weight_norm`` (weight recomputed by a forward pre-hook)."""
    model, x = _mlp(nn.Tanh())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model[0])
    return model, x


class BatchCentered(nn.Module):
    """Samples interact: features centred over the batch (h − mean over dim 0)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, Q)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0)))


class NoRunningStats(nn.Module):
    """BatchNorm1d(track_running_stats=False): batch statistics even in eval mode."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, Q)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.a(x))))


class WeightOutsideItsModule(nn.Module):
    """A layer's parameters also used outside its module call (a functional reuse, a bias added
    elsewhere, a weight in the output): the layer rule alone would miss those terms."""

    def __init__(self, conv: bool):
        super().__init__()
        self.conv = conv
        self.lin = nn.Conv2d(2, 2, 3, padding=1) if conv else nn.Linear(3, 3)
        self.head = nn.Linear(32 if conv else 3, Q)

    def forward(self, x):
        if self.conv:
            h = self.lin(x) + F.conv2d(x, self.lin.weight.flip(-1), padding=1)
            return self.head(torch.tanh(h).flatten(1))
        h = torch.tanh(self.lin(x) + 0.5 * F.linear(x, self.lin.weight)) + self.lin.bias
        return self.head(h) + self.lin.weight.sum() * x[:, :1]


class ConvStemTokens(nn.Module):
    """Conv, eval BatchNorm, then the feature map as tokens (flatten(2).transpose(1, 2)) into a
    LayerNorm and a Transformer layer: a ViT-style hybrid stem."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 2), nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4)
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4 * 9, Q)

    def forward(self, x):  # (n, 2, 4, 4) -> 3×3 map -> 9 tokens of 4
        tokens = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(self.layer(self.norm(tokens)).flatten(1))


def with_running_stats(model: nn.Module) -> nn.Module:
    """Running statistics away from (0, 1) in every BatchNorm of ``model`` (or ``model`` itself, a
    BatchNorm), so eval BatchNorm is not the identity. tests/random_models.py draws its own with it."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


class NormTokensRecurrent(nn.Module):
    """PReLU and InstanceNorm on a one-channel map, then its pixels as tokens into a GRU: plain autograd
    gets the gradients upstream of the norm wrong here (tests/test_upstream_bugs.py)."""

    def __init__(self):
        super().__init__()
        self.act, self.norm = nn.PReLU(1), nn.InstanceNorm2d(1, affine=True)
        self.rnn, self.head = nn.GRU(1, 3, batch_first=True, bidirectional=True), nn.Linear(4 * 5 * 6, Q)

    def forward(self, x):  # (n, 1, 4, 5) -> 20 tokens of 1
        tokens = self.norm(self.act(x)).flatten(2).transpose(1, 2)
        return self.head(torch.tanh(self.rnn(tokens)[0]).flatten(1))


class LatentUpsampler(nn.Module):
    """A DCGAN-style generator head: the latent as a 1×1 map (made by permute, so a size-1 dimension
    carries a non-standard stride) into ConvTranspose2d, and a length-1 sequence into ConvTranspose1d."""

    def __init__(self):
        super().__init__()
        self.up2, self.up1 = nn.ConvTranspose2d(3, 2, 3, stride=2), nn.ConvTranspose1d(3, 2, 2, stride=2)
        self.head = nn.Linear(2 * 3 * 3 + 2 * 2, Q)

    def forward(self, z):  # (n, 3)
        image = self.up2(z[:, None, None, :].permute(0, 3, 1, 2))
        sequence = self.up1(z[:, None, :].transpose(1, 2))
        return self.head(torch.tanh(torch.cat([image.flatten(1), sequence.flatten(1)], 1)))


def _lazy(model, x):
    model = model.to(D)
    with torch.no_grad():
        model(*x)
    return model, x


def _channels_last(model, shape):
    return model, (randn(N, *shape).contiguous(memory_format=torch.channels_last),)


def _dense_embeddings(model):
    with torch.random.fork_rng():  # the audit checks that the global RNG is untouched around the reference
        dense = SparseEmbeddings(sparse=False).to(D)
    dense.load_state_dict(model.state_dict())
    return dense


# ------------------------------------------------------------------------------------ builders


def _mlp(act: nn.Module):
    return seq(nn.Linear(4, 5), act, nn.Linear(5, Q)), (randn(N, 4),)


def _conv(layer: nn.Module, in_shape, feats):
    return Head(layer, feats), (randn(N, *in_shape),)


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(3, 4, 3)
        self.head = nn.Linear(3, Q)

    def forward(self, a, b):
        return self.head(torch.tanh(self.bil(a, b)))


class FoldedSequence(nn.Module):
    """A sequence folded into the batch: (n, T, d) -> (n·T, d) -> Linear -> back to (n, T, h)."""

    def __init__(self, T=4):
        super().__init__()
        self.T, self.lin, self.head = T, nn.Linear(3, 4), nn.Linear(4, Q)

    def forward(self, x):
        n = x.shape[0]
        h = torch.tanh(self.lin(x.reshape(-1, 3))).reshape(n, self.T, 4)
        return self.head(h.mean(1))


class TimeMajor(nn.Module):
    """(n, T, d) -> time-major (T, n, d) -> Linear and LayerNorm -> back; T = n, so sizes match."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, Q)

    def forward(self, x):
        h = self.norm(torch.tanh(self.lin(x.transpose(0, 1))))
        return self.head(h.transpose(0, 1).mean(1))


class TransposedNorm(nn.Module):
    """Channels-last features transposed before a BatchNorm1d/GroupNorm that normalise dim 1."""

    def __init__(self):
        super().__init__()
        self.lin, self.gn, self.head = nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4 * N, Q)

    def forward(self, x):  # x (n, T=n, 3)
        h = torch.tanh(self.lin(x)).transpose(1, 2)  # (n, 4, T)
        return self.head(self.gn(h).flatten(1))


class PermutedBatch(nn.Module):
    """Reverses the batch before a Linear and restores it after: row i of the layer is sample n−1−i."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, Q)

    def forward(self, x):
        h = torch.tanh(self.lin(x.flip(0))).flip(0)
        return self.head(h)


class RecurrentNet(nn.Module):
    def __init__(self, cell: str, batch_first: bool, tagger: bool, layers=2, bidirectional=True):
        super().__init__()
        rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.batch_first, self.tagger = batch_first, tagger
        self.rnn = rnn(3, 3, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        width = 3 * (2 if bidirectional else 1)
        self.head = nn.Linear(width * (4 if tagger else 1), Q)

    def forward(self, x):  # x (n, T=4, 3)
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.flatten(1) if self.tagger else h[:, -1])


class AttentionNet(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, Q)

    def forward(self, x):  # (n, T, 4)
        h = x if self.batch_first else x.transpose(0, 1)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class EncoderNet(nn.Module):
    def __init__(self, batch_first: bool, decoder: bool = False, norm_first: bool = False):
        super().__init__()
        self.batch_first, self.decoder = batch_first, decoder
        kw = dict(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.layer = nn.TransformerDecoderLayer(**kw) if decoder else nn.TransformerEncoderLayer(**kw)
        self.head = nn.Linear(4, Q)

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.layer(h, h) if self.decoder else self.layer(h)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class LayerNormSub(nn.LayerNorm):
    """A LayerNorm subclass (no rule by exact type: its weight goes to the reference engine)."""


class TwiceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, Q)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.norm(self.lin(x)))))


class Tied(nn.Module):
    """Embedding tied to the output projection (language-model style)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(5, Q)

    def forward(self, idx):
        return self.head(torch.tanh(self.out(torch.tanh(self.mix(self.emb(idx).mean(1))))))


class BareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4, dtype=D))
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, Q)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x) * self.scale))


class ReusedWeight(nn.Module):
    """A Python flag changes the forward's structure: with ``reuse`` the first layer runs twice."""

    def __init__(self):
        super().__init__()
        self.reuse = False
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, Q)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.reuse:
            h = torch.tanh(self.lin(h))
        return self.head(h)


class CellNet(nn.Module):
    """An RNN cell unrolled by hand (nn.LSTMCell / GRUCell / RNNCell)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](3, 3)
        self.head = nn.Linear(3, Q)

    def forward(self, x):  # (n, T, 3)
        h = torch.zeros(x.shape[0], 3, dtype=x.dtype)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


class SqueezeExcite(nn.Module):
    """MobileNetV3-style block: Hardswish conv, squeeze-excitation gate with Hardsigmoid."""

    def __init__(self, exact_gate: bool = False):
        super().__init__()
        self.exact_gate = exact_gate
        self.conv, self.fc1, self.fc2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, Q)

    def forward(self, x):
        h = F.hardswish(self.conv(x))
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1))))
        s = torch.clamp((s + 3.0) / 6.0, 0.0, 1.0) if self.exact_gate else F.hardsigmoid(s)
        return self.head((h * s).mean((2, 3)))


def _exact_gate(model):
    model = copy.deepcopy(model)
    model.exact_gate = True
    return model


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: a subclass that permutes around the parent's forward."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm and MLP, layer scale (a bare parameter), residual."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm, self.pw1, self.pw2 = nn.LayerNorm(4), nn.Linear(4, 8), nn.Linear(8, 4)
        self.gamma = nn.Parameter(torch.full((4,), 0.5))
        self.ln2d, self.head = LayerNorm2d(4), nn.Linear(4, Q)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(self.norm(h)))) * self.gamma
        return self.head(self.ln2d(x + h.permute(0, 3, 1, 2)).mean((2, 3)))


class CausalEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(4, Q)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.enc(x, mask=mask, is_causal=True).mean(1))


class PoolsAndResampling(nn.Module):
    """Max pooling, pixel shuffle, local response norm and bilinear interpolation after a conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 2 * 2 + 1 + 4, Q)

    def forward(self, x):
        h = self.conv(x)
        a = F.max_pool2d(h, 2)
        b = F.pixel_shuffle(h, 2).mean((1, 2, 3)).unsqueeze(1)
        c = F.interpolate(F.local_response_norm(a, 2), scale_factor=2, mode="bilinear").mean((2, 3))
        return self.head(torch.cat([a.flatten(1), b, c], 1))


class SpatialOps(nn.Module):
    """Unfold/Fold, pixel unshuffle, channel shuffle, adaptive max and LP pooling, shrink/threshold/softmin."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 16 + 4 * 4 + 4, Q)
        self.fold = nn.Sequential(nn.Unfold(2, stride=2), nn.Fold((4, 4), 2, stride=2))

    def forward(self, x):
        h = self.conv(x)
        a = F.pixel_unshuffle(nn.ChannelShuffle(2)(self.fold(h)), 2)  # (n, 16, 2, 2)
        a = F.softmin(F.threshold(F.softshrink(F.hardshrink(a, 0.1), 0.1), 0.05, -1.0), dim=1)
        b = F.adaptive_max_pool2d(h, 2).flatten(1)
        c = F.lp_pool2d(h, 2, 4).flatten(1)
        return self.head(torch.cat([a.flatten(1), b, c], 1))


class WarpedSampling(nn.Module):
    """A spatial transformer: affine_grid from a Linear, grid_sample of conv features."""

    def __init__(self):
        super().__init__()
        self.conv, self.theta, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(2 * 4 * 4, 6), nn.Linear(3 * 4 * 4, Q)

    def forward(self, x):
        grid = F.affine_grid(self.theta(x.flatten(1)).view(-1, 2, 3), (x.shape[0], 3, 4, 4), align_corners=False)
        return self.head(F.grid_sample(self.conv(x), grid, align_corners=False).flatten(1))


class TensorOps(nn.Module):
    """topk, sort, max/amax/logsumexp, gather/scatter_add, cumsum/cumprod, normalize, cosine and pairwise distance."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(3 + 2 + 2 + 3 + 3 + 6 + 2, Q)
        self.register_buffer("idx", torch.tensor([[0, 2, 5], [1, 1, 2]]))

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        n = x.shape[0]
        top = torch.topk(h, 3, dim=1).values.sort(dim=1).values
        red = torch.stack([h.view(n, 2, 3).max(dim=2).values.sum(1), torch.logsumexp(h, 1)], 1)
        am = h.view(n, 2, 3).amax(2)
        gat = torch.gather(h, 1, self.idx[:1].expand(n, 3))
        sca = torch.zeros(n, 3, dtype=h.dtype).scatter_add(1, self.idx[1:].expand(n, 3), g[:, :3])
        cum = torch.cumsum(h, 1) * torch.cumprod(torch.sigmoid(g), 1) + F.normalize(h, dim=1)
        sim = torch.stack([F.cosine_similarity(h, g, dim=1), F.pairwise_distance(h, g)], 1)
        return self.head(torch.tanh(torch.cat([top, red, am, gat, sca, cum, sim], 1)))


class CrossAttention(nn.Module):
    """MultiheadAttention with kdim/vdim (separate projection weights), then nn.Transformer (encoder and decoder)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)
        self.transformer = nn.Transformer(4, 2, 1, 1, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, Q)

    def forward(self, x):
        h = self.mha(x[:, :, :4], x[:, :, 1:4], x[:, :, :5])[0]
        return self.head(self.transformer(h, h[:, :2]).mean(1))


def _orthogonal():
    model, x = _mlp(nn.Tanh())
    nn.utils.parametrizations.orthogonal(model[2])  # a 2×5 weight: orthonormal rows
    return model, x


class Scale(nn.Module):
    """A custom layer x ⊙ w, for the rule-registry tests (no rule unless a test registers one)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight


class ScaleRule(LayerRule):
    """The exact rule for :class:`Scale`: ∂(c·f)/∂w_d = g_d a_d per sample."""

    params = ("weight",)

    def factors(self, module, saved, grad, names):
        (a,) = saved
        return {"weight": DirectFactor(grad * a)}


def _backward_hooked():
    """Backward hooks that rescale gradients (as gradient-clipping or logging code does): they concern
    training gradients, so K must stay the true Jacobian — the reference is the same model without them."""
    model, x = _mlp(nn.Tanh())
    model[0].register_full_backward_hook(lambda m, gi, go: tuple(None if g is None else 2 * g for g in gi))
    model[2].register_full_backward_pre_hook(lambda m, go: (3 * go[0],))
    return model, x


def _without_backward_hooks(model):
    model = copy.deepcopy(model)
    for m in model.modules():
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
    return model


def _hooked():
    model, x = _mlp(nn.Tanh())
    model[0].register_forward_hook(lambda m, a, out: out * 2.0 + out**2)
    return model, x


def _weight_norm():
    model, x = _mlp(nn.Tanh())
    nn.utils.parametrizations.weight_norm(model[0])
    return model, x


def _spectral_norm():
    model, x = _mlp(nn.Tanh())
    nn.utils.parametrizations.spectral_norm(model[0])
    model.eval()
    return model, x


def _batchnorm_eval(bn: nn.Module, in_shape, feats):
    model, x = _conv(seq(bn), in_shape, feats)
    with_running_stats(bn)
    return model.eval(), x


def _embedding(**kw):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3, **kw)
            self.head = nn.Linear(3 * 4, Q)

        def forward(self, idx):
            return self.head(torch.tanh(self.emb(idx)).flatten(1))

    idx = torch.tensor([[1, 2, 2, 0], [3, 1, 5, 1], [4, 4, 4, 2]])
    return Net(), (idx,)


def _embedding_bag(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(6, 3, mode=mode)
            self.head = nn.Linear(3, Q)

        def forward(self, idx):
            return self.head(torch.tanh(self.bag(idx)))

    return Net(), (torch.tensor([[1, 2, 2, 0], [3, 1, 5, 1], [4, 4, 4, 2]]),)


def _tokens():
    return (randn(N, 4, 4),)


class ExactHardsigmoid(nn.Module):
    def forward(self, x):
        return torch.clamp((x + 3.0) / 6.0, 0.0, 1.0)


def _exact_hardsigmoid(model):
    model = copy.deepcopy(model)
    model[1] = ExactHardsigmoid()
    return model


CASES: list[Case] = []


def case(name, build, **kw):
    CASES.append(Case(name, build, **kw))


# linear and bilinear
case("linear", lambda: _mlp(nn.Tanh()))
case("bilinear", lambda: (BilinearNet(), (randn(N, 3), randn(N, 4))))
# convolutions
case("conv1d", lambda: _conv(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), (2, 7), 3 * 4))
case("conv1d_same_dilated", lambda: _conv(nn.Conv1d(2, 3, 3, padding="same", dilation=2), (2, 6), 3 * 6))
case("conv2d_valid", lambda: _conv(nn.Conv2d(2, 2, 3, padding="valid"), (2, 5, 5), 2 * 3 * 3))
case("conv1d_circular", lambda: _conv(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), (2, 5), 2 * 5))
case("conv2d_groups", lambda: _conv(nn.Conv2d(4, 4, 2, groups=2), (4, 3, 3), 4 * 2 * 2))
case("conv2d_reflect_stride", lambda: _conv(nn.Conv2d(1, 2, (3, 2), padding=1, padding_mode="reflect", stride=(1, 2)), (1, 5, 4), 2 * 5 * 3))
case("conv2d_replicate_valid", lambda: _conv(nn.Conv2d(2, 2, 2, padding=1, padding_mode="replicate"), (2, 3, 3), 2 * 4 * 4))
case("conv3d", lambda: _conv(nn.Conv3d(1, 2, 2), (1, 3, 3, 3), 2 * 2 * 2 * 2))
case("conv2d_same_even_kernel_no_bias", lambda: _conv(nn.Conv2d(2, 2, (2, 4), padding="same", bias=False), (2, 3, 5), 2 * 3 * 5))
case("convtranspose1d", lambda: _conv(nn.ConvTranspose1d(2, 3, 3, stride=2), (2, 3), 3 * 7))
case("convtranspose2d", lambda: _conv(nn.ConvTranspose2d(2, 2, 2, stride=1, padding=0), (2, 2, 2), 2 * 3 * 3))
# normalisation
case("batchnorm1d_eval", lambda: _batchnorm_eval(nn.BatchNorm1d(3), (3, 4), 3 * 4))
case("batchnorm2d_eval", lambda: _batchnorm_eval(nn.BatchNorm2d(2), (2, 2, 2), 2 * 2 * 2))
case("batchnorm2d_eval_no_affine",  # no γ, β: the rule's shift is −μ·s alone; a convolution before it has parameters
     lambda: _batchnorm_eval(seq(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, affine=False)), (2, 2, 2), 2 * 2 * 2))
case(
    "batchnorm2d_batch",
    lambda: (_conv(seq(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2)), (1, 3, 3), 2 * 2 * 2)[0].train(), (randn(N, 1, 3, 3),)),
    kernel_kwargs={"batch_norm": "batch"}, whole_batch=True,
)
case("instancenorm1d_affine", lambda: _conv(seq(nn.Conv1d(2, 2, 2), nn.InstanceNorm1d(2, affine=True)), (2, 5), 2 * 4))
case("instancenorm2d_affine", lambda: _conv(seq(nn.Conv2d(1, 2, 2), nn.InstanceNorm2d(2, affine=True)), (1, 3, 3), 2 * 2 * 2))
case("layernorm", lambda: _conv(seq(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), 4))
case("layernorm_2d_shape", lambda: _conv(seq(nn.Conv1d(2, 2, 2), nn.LayerNorm((2, 3))), (2, 4), 2 * 3))
case("layernorm_subclass", lambda: _conv(seq(nn.Linear(4, 4), LayerNormSub(4)), (4,), 4))
case("layernorm_twice", lambda: (TwiceNorm(), (randn(N, 3),)))
case("groupnorm", lambda: _conv(seq(nn.Conv1d(2, 4, 2), nn.GroupNorm(2, 4)), (2, 4), 4 * 3))
case("norms_without_affine_or_bias", lambda: _conv(
    seq(nn.Linear(4, 4), nn.LayerNorm(4, bias=False), nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 4)),
    (4,), 4,
))
case("rmsnorm", lambda: _conv(seq(nn.Linear(4, 4), nn.RMSNorm(4)), (4,), 4))
# embeddings
case("embedding_padding_idx", lambda: _embedding(padding_idx=0))


def _without_freq_scaling(model):
    model = copy.deepcopy(model)
    model.emb.scale_grad_by_freq = False
    return model


# scale_grad_by_freq rescales what autograd reports, not the function: MGS uses the true derivative
case("embedding_scale_grad_by_freq", lambda: _embedding(scale_grad_by_freq=True), reference_model=_without_freq_scaling)
case("embedding_max_norm", lambda: _embedding(max_norm=0.5), refused=UnsupportedLayerError)
case("embedding_bag_mean", lambda: _embedding_bag("mean"), grad_by_fd=True)
case("embedding_bag_sum", lambda: _embedding_bag("sum"), grad_by_fd=True)
case("embedding_bag_max", lambda: _embedding_bag("max"), grad_by_fd=True)
# activations
case("prelu_single", lambda: _mlp(nn.PReLU()))
case("prelu_channels", lambda: _conv(seq(nn.Conv1d(2, 3, 2), nn.PReLU(3)), (2, 4), 3 * 3))
for _act in (
    nn.ReLU(), nn.LeakyReLU(0.1), nn.ELU(), nn.SELU(), nn.CELU(), nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Mish(),
    nn.Hardswish(), nn.Hardsigmoid(), nn.Hardtanh(), nn.ReLU6(), nn.Softplus(), nn.Sigmoid(), nn.LogSigmoid(),
    nn.Softsign(), nn.Tanhshrink(), nn.Softmax(-1), nn.LogSoftmax(-1), nn.RReLU(),
):
    case(
        f"act_{type(_act).__name__.lower()}{'_tanh' if getattr(_act, 'approximate', '') == 'tanh' else ''}",
        (lambda a: lambda: (lambda m: (m[0].eval(), m[1]))(_mlp(a)))(_act),
        # hardsigmoid_backward has no derivative upstream, and its first derivative uses a float32 1/6
        # (5e-9 off in float64): the reference differentiates the exact formula, by finite differences
        grad_by_fd=isinstance(_act, nn.Hardsigmoid),
        reference_model=_exact_hardsigmoid if isinstance(_act, nn.Hardsigmoid) else None,
    )
case("act_glu", lambda: (seq(nn.Linear(4, 6), nn.GLU(), nn.Linear(3, Q)), (randn(N, 4),)))
# recurrent
for _cell in ("rnn", "lstm", "gru"):
    for _bf in (True, False):
        for _tag in (False, True):
            case(f"{_cell}_{'bf' if _bf else 'tm'}_{'tagger' if _tag else 'clf'}", (lambda c, b, t: lambda: (RecurrentNet(c, b, t), (randn(N, 4, 3),)))(_cell, _bf, _tag))
for _kind in ("lstm", "gru", "rnn"):
    case(f"{_kind}_cell", (lambda k: lambda: (CellNet(k), (randn(N, 4, 3),)))(_kind))
# attention
case("mha_batch_first", lambda: (AttentionNet(True), _tokens()))
case("mha_time_major", lambda: (AttentionNet(False), _tokens()))
case("encoder_layer_default", lambda: (EncoderNet(False).eval(), _tokens()))
case("encoder_layer_batch_first", lambda: (EncoderNet(True).eval(), _tokens()))
case("encoder_layer_norm_first", lambda: (EncoderNet(True, norm_first=True).eval(), _tokens()))
case("decoder_layer", lambda: (EncoderNet(False, decoder=True).eval(), _tokens()))
case("causal_encoder_stack", lambda: (CausalEncoder().eval(), _tokens()))
# blocks of common architectures
case("squeeze_excite", lambda: (SqueezeExcite().eval(), (randn(N, 2, 4, 4),)), grad_by_fd=True, reference_model=_exact_gate)
case("convnext_block", lambda: (ConvNeXtBlock().eval(), (randn(N, 4, 3, 3),)))
case("pools_and_resampling", lambda: (PoolsAndResampling().eval(), (randn(N, 2, 4, 4),)))
case("spatial_ops", lambda: (SpatialOps(), (randn(N, 2, 4, 4),)))
case("warped_sampling", lambda: (WarpedSampling(), (randn(N, 2, 4, 4),)))
case("tensor_ops", lambda: (TensorOps(), (randn(N, 3),)))
case("cross_attention_transformer", lambda: (CrossAttention().eval(), (randn(N, 4, 5),)))
# layouts
case("folded_sequence", lambda: (FoldedSequence(), (randn(N, 4, 3),)))
case("folded_sequence_n1", lambda: (FoldedSequence(), (randn(1, 4, 3),)))
case("time_major_t_eq_n", lambda: (TimeMajor(), (randn(N, N, 3),)))
case("transposed_groupnorm", lambda: (TransposedNorm(), (randn(N, N, 3),)))
case("permuted_batch", lambda: (PermutedBatch(), (randn(N, 3),)))
# parametrizations, hooks, sharing
case("weight_norm", _weight_norm)
case("spectral_norm", _spectral_norm)
case("orthogonal", _orthogonal)
case("forward_hook", _hooked)
case("backward_hooks", _backward_hooked, reference_model=_without_backward_hooks)
case("tied_weights", lambda: (Tied(), (torch.tensor([[1, 2, 0], [3, 4, 4], [0, 1, 1]]),)))
case("bare_parameter", lambda: (BareParameter(), (randn(N, 3),)))
case("reused_weight", lambda: (lambda m: (m, (randn(N, 4),)))(ReusedWeight()))


# families an outside probe tried (first run: all exact)
case("inplace_relu_mlp", lambda: (seq(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, Q)), (randn(N, 3),)), logdet=False)
case("inplace_residual_block", lambda: (InplaceResidual().eval(), (randn(N, 2, 4, 4),)))
case("channels_last_residual_block", lambda: _channels_last(InplaceResidual().eval(), (2, 4, 4)))
case("channels_last_conv_stack", lambda: _channels_last(seq(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(8, Q)), (2, 4, 4)))
case("non_contiguous_input", lambda: (seq(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, Q)), (randn(4, N).t(),)))
case("mha_key_padding_mask", lambda: (MaskedAttention(), _tokens()))
case("mha_bias_kv_zero_attn", lambda: (MaskedAttention(add_bias_kv=True, add_zero_attn=True), _tokens()))
case("mha_causal_weights_out", lambda: (MaskedAttention(weights_out=True), _tokens()))
case("mha_float_masks_head_weights", lambda: (MaskedAttentionFloat(), _tokens()))
case("mha_unbatched", lambda: (UnbatchedAttention(), _tokens()))
case("sdpa_causal", lambda: (CausalSDPA(), _tokens()))
case("encoder_stack_padding_mask", lambda: (MaskedEncoderStack().eval(), _tokens()))
case("lstm_proj_size", lambda: (ProjectedLSTM(), (randn(N, 4, 3),)))
case("straight_through", lambda: (StraightThrough(), (randn(N, 3),)))
case("frozen_and_unused", lambda: (FrozenAndUnused(), (randn(N, 3),)))
case("reused_conv", lambda: (ReusedConv(), (randn(N, 2, 4, 4),)))
case("scalar_output", lambda: (ScalarOutput(), (randn(N, 3),)))
case("max_unpool", lambda: (Unpooling(), (randn(N, 2, 4, 4),)))
case("upsampling_modes", lambda: (Upsampling(), (randn(N, 2, 4, 4),)))
case("ceil_pools_lazy_linear", lambda: _lazy(CeilPoolsLazyHead(), (randn(N, 2, 5, 5),)))
case("convtranspose_output_padding_groups", lambda: _lazy(TransposedConvsLazyHead(), (randn(N, 2, 2, 2),)))
case("conv1d_stride_above_kernel", lambda: _conv(nn.Conv1d(2, 3, 2, stride=3, padding=2), (2, 9), 3 * 4))
case("conv2d_depthwise_dilated", lambda: _conv(nn.Conv2d(3, 6, 3, dilation=2, groups=3, padding=2), (3, 5, 5), 6 * 5 * 5))
case("embedding_sparse", lambda: (SparseEmbeddings(), (torch.tensor([[1, 2, 2, 0], [3, 1, 5, 1], [4, 4, 4, 2]]),)), reference_model=_dense_embeddings, grad_by_fd=True)
case("old_style_weight_norm", _old_weight_norm)
case("symmetric_parametrization", _symmetric_parametrization)
case("weight_outside_its_module", lambda: (WeightOutsideItsModule(False), (randn(N, 3),)))
case("conv_weight_outside_its_module", lambda: (WeightOutsideItsModule(True), (randn(N, 2, 4, 4),)))
case("latent_upsampler", lambda: (LatentUpsampler(), (randn(N, 3),)))
case("instance_norm_tokens_gru", lambda: (NormTokensRecurrent(), (randn(N, 1, 4, 5),)))
case("conv_stem_tokens", lambda: (with_running_stats(ConvStemTokens()).eval(), (randn(N, 2, 4, 4),)))
case("shared_module_two_names", lambda: (lambda lin: (seq(nn.Linear(3, 4), nn.Tanh(), lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, Q)), (randn(N, 3),)))(nn.Linear(4, 4)))
# samples that interact: the whole-batch function under batch_norm="batch" (a warning under "eval", see test_trust)
case("batch_centred_whole_batch", lambda: (BatchCentered(), (randn(N, 3),)), kernel_kwargs={"batch_norm": "batch"}, whole_batch=True)
case("batchnorm_no_running_stats", lambda: (NoRunningStats().eval(), (randn(N, 3),)), kernel_kwargs={"batch_norm": "batch"}, whole_batch=True)
case("checkpoint_non_reentrant", lambda: (Checkpointed(False), (randn(N, 3),)), refused=UnsupportedLayerError)
case("checkpoint_reentrant", lambda: (Checkpointed(True), (randn(N, 3),)), refused=UnsupportedLayerError)
# families a second outside probe tried: FFTs and complex intermediates, custom autograd Functions,
# antialiased resampling, a random op in eval mode, packed sequences (refused)
case("fourier_token_mixing", lambda: (FourierMixing(), (randn(N, 5, 3),)))
# plain double backward through view_as_complex fails upstream ("storage_offset divisible by 2"): the
# reference differentiates the same function with the weight built by torch.complex
case("spectral_conv_complex_weight", lambda: (SpectralConv(), (randn(N, 2, 8),)), grad_by_fd=True,
     reference_model=lambda model: _complex_from_parts(model))  # defined with the model class, below
case("spectrogram", lambda: (SpectrogramNet(), (randn(N, 1, 16),)))
case("custom_function_vmap_rule", lambda: (CustomFunctionNet(_SwishFunction), (randn(N, 3),)))
case("antialiased_resampling", lambda: (AntialiasedResampling(), (randn(N, 2, 7, 7),)))
# FractionalMaxPool2d draws its pooling regions at random even in eval mode; with (6 − 2)/(3 − 1) an
# integer the regions do not depend on the draw, so K is deterministic and the random op still runs
case("fractional_max_pool", lambda: _conv(seq(nn.Conv2d(1, 2, 3), nn.FractionalMaxPool2d(2, output_size=(3, 3))), (1, 8, 8), 2 * 3 * 3))
for _kind in ("branch", "item", "routing"):
    case(f"data_dependent_{_kind}", (lambda k: lambda: (DataDependent(k), (randn(N, 3),)))(_kind), whole_batch=True)
# a scripted LayerNorm's ops bypass ExactOps: its penalty gradient was 0.5 % off without an error
case("scripted_submodule", lambda: (seq(nn.Linear(3, 4), torch.jit.script(nn.LayerNorm(4)), nn.Tanh(), nn.Linear(4, Q)), (randn(N, 3),)), refused=TypeError)
case("old_style_autograd_function", lambda: (CustomFunctionNet(_OldStyleFunction), (randn(N, 3),)), refused=UnsupportedLayerError)
for _cell in ("lstm", "gru", "rnn"):
    for _last in (False, True):
        case(f"packed_{_cell}_{'last_state' if _last else 'bidirectional_outputs'}",
             (lambda c, l: lambda: (PackedRecurrent({"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[c], l), (randn(N, 4, 3), torch.tensor([4, 2, 3]))))(_cell, _last),
             refused=UnsupportedLayerError)


# ------------------------------------------------ families a second outside probe tried


class FourierMixing(nn.Module):
    """FNet-style token mixing: the real part of a 2-D FFT over (tokens, features), complex arithmetic
    between real layers."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(5 * 4, Q)

    def forward(self, x):
        h = torch.fft.fft2(self.inp(x)).real
        return self.head(torch.tanh(h).flatten(1))


class SpectralConv(nn.Module):
    """An FNO spectral convolution: rfft, complex weights on the lowest modes, irfft. The complex weight
    is stored as a real (…, 2) Parameter (view_as_complex), the form mgs_torch asks complex weights in."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(2, 3, 4, 2, dtype=D))
        self.skip, self.head = nn.Conv1d(2, 3, 1), nn.Linear(3 * 8, Q)

    def forward(self, x):
        xf = torch.fft.rfft(x, dim=-1)[..., :4]
        y = torch.fft.irfft(torch.einsum("nci,coi->noi", xf, self.complex_weight()), n=8, dim=-1)
        return self.head(torch.tanh(y + self.skip(x)).flatten(1))

    def complex_weight(self):
        return torch.view_as_complex(self.w)


class SpectralConvFromParts(SpectralConv):
    """The same function with the complex weight built by ``torch.complex`` from its parts, which has
    a double backward (plain autograd through view_as_complex fails: "storage_offset divisible by 2")."""

    def complex_weight(self):
        return torch.complex(self.w[..., 0], self.w[..., 1])


def _complex_from_parts(model):
    ref = copy.deepcopy(model)
    ref.__class__ = SpectralConvFromParts
    return ref


class _SwishFunction(torch.autograd.Function):
    """A custom activation in torch.func's style: separate setup_context, generated vmap rule, and a
    backward written with differentiable ops (so the penalty can differentiate it again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


class _OldStyleFunction(torch.autograd.Function):
    """A gradient-reversal layer written the old way (forward(ctx, x)): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class CustomFunctionNet(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function, self.a, self.b = function, nn.Linear(3, 4), nn.Linear(4, Q)

    def forward(self, x):
        return self.b(torch.tanh(self.function.apply(self.a(x))))


class AntialiasedResampling(nn.Module):
    """interpolate with antialias (bilinear, bicubic), area, nearest-exact; trilinear on a volume."""

    def __init__(self):
        super().__init__()
        self.c, self.v = nn.Conv2d(2, 2, 3, padding=1), nn.Conv3d(1, 1, 2)
        self.head = nn.Linear(2 * 9 + 2 * 9 + 2 * 6 + 2 * 18 + 2 * 4 * 4, Q)

    def forward(self, x):
        h = self.c(x)
        parts = [
            F.interpolate(h, size=(3, 3), mode="bilinear", antialias=True),
            F.interpolate(h, size=(3, 3), mode="bicubic", antialias=True, align_corners=False),
            F.interpolate(h, size=(3, 2), mode="area"),
            F.interpolate(h, size=(6, 3), mode="nearest-exact"),
            F.interpolate(self.v(h[:, None, :, :3, :3]), scale_factor=2, mode="trilinear", align_corners=True),
        ]
        return self.head(torch.tanh(torch.cat([p.flatten(1) for p in parts], 1)))


class SpectrogramNet(nn.Module):
    """A learned 1-D filter, then a log-magnitude STFT (complex intermediate), then a Linear."""

    def __init__(self):
        super().__init__()
        self.filt, self.head = nn.Conv1d(1, 1, 3, padding=1), nn.Linear(5 * 5, Q)
        self.register_buffer("window", torch.hann_window(8, dtype=D))

    def forward(self, x):
        s = torch.stft(self.filt(x).squeeze(1), n_fft=8, hop_length=4, window=self.window, return_complex=True)
        return self.head(torch.log1p(s.abs()).flatten(1))


class PackedRecurrent(nn.Module):
    """Variable-length sequences through pack_padded_sequence: refused (see op_fixes)."""

    def __init__(self, cell, last_state: bool):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True, bidirectional=not last_state)
        self.last_state, self.head = last_state, nn.Linear(4 if last_state else 8, Q)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        if self.last_state:
            return self.head((h[0] if isinstance(h, tuple) else h)[-1])
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.head(out.sum(1))


class Routed(nn.Module):
    """Top-1 mixture of experts on vectors: each sample through the expert its router picks (boolean-mask
    indexing, so no per-sample vmap: mgs_torch takes the whole-batch route), weighted by its gate."""

    def __init__(self, d: int, experts: int):
        super().__init__()
        self.router, self.experts = nn.Linear(d, experts), nn.ModuleList([nn.Linear(d, d) for _ in range(experts)])

    def forward(self, x):
        gate = torch.softmax(self.router(x), -1)
        pick = gate.argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = pick == e
            out[rows] = gate[rows, e : e + 1] * torch.tanh(expert(x[rows]))
        return out


class DataDependent(nn.Module):
    """Forwards vmap cannot run one sample at a time: a Python ``if`` on a batch statistic, a scale
    read with ``.item()``, or mixture-of-experts routing by boolean-mask indexing. mgs_torch
    differentiates the whole-batch function (with a warning); so does the reference."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.a, self.routed, self.b = kind, nn.Linear(3, 4), Routed(4, 2), nn.Linear(4, Q)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.kind == "branch":
            if h.abs().max() > 0.5:
                h = 0.5 * h
        elif self.kind == "item":
            h = h / h.detach().abs().max().item()
        else:
            h = self.routed(h)
        return self.b(h)


def build(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    model, inputs = case.build()
    return model.to(D), inputs


def by_name(name: str) -> Case:
    return next(c for c in CASES if c.name == name)
