"""Random architectures for the audit: layer families composed the way users compose them.

The hand-written zoo (:mod:`model_zoo`) names one family per model; users stack them. ``random_model(seed)``
draws a small float64 network from a grammar over three per-sample layouts — images (C, H, W),
sequences (T, d) and vectors (d) — and the blocks that fit each: convolutions with random stride,
padding (and padding mode), dilation and groups, transposed convolutions, every normalisation,
pooling, upsampling, pixel shuffle, residual blocks, recurrent layers, attention and Transformer
layers, bilinear and GLU layers, and, now and then, a block reused later in the network (weight
sharing) or a top-1 mixture-of-experts router on vectors (boolean-mask indexing: the whole-batch route). Layouts change along the way (image → sequence → vector). The last layer is Linear(q).

``python tests/random_models.py --seeds 0:500`` checks many seeds against the per-sample autograd
loop and prints the failures; ``tests/test_random_models.py`` runs a fixed sample of seeds.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from model_zoo import Routed, with_running_stats

D = torch.float64

ACTIVATIONS = [nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.Mish, nn.Hardtanh]


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class ImageToSequence(nn.Module):
    """(n, C, H, W) -> (n, H·W, C)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class OverTime(nn.Module):
    """A Conv1d over the time axis of (n, T, d)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class SelfAttention(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention, causal: bool):
        super().__init__()
        self.attn, self.causal = attn, causal

    def forward(self, x):
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1) if self.causal else None
        return x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


class Pool(nn.Module):
    """(n, T, d) -> (n, d): mean, max or last step."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "mean":
            return x.mean(1)
        if self.how == "max":
            return x.amax(1)
        return x[:, -1]


class SelfDecoder(nn.Module):
    """A Transformer decoder layer attending to its own input as memory, with a causal target mask."""

    def __init__(self, layer: nn.TransformerDecoderLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype), 1)
        return self.layer(x, torch.tanh(x), tgt_mask=mask)


class SelfBilinear(nn.Module):
    def __init__(self, bilinear: nn.Bilinear):
        super().__init__()
        self.bilinear = bilinear

    def forward(self, x):
        return self.bilinear(x, torch.tanh(x))


class TwoInputs(nn.Module):
    """A second, vector input (n, d2) joined to the flattened features of the first: concatenated
    after its own Linear, or through a Bilinear layer (two-tower and conditioning models)."""

    def __init__(self, body: nn.Module, features: int, d2: int, q: int, bilinear: bool, tail: nn.Module):
        super().__init__()
        self.body, self.bilinear, self.tail = body, bilinear, tail
        if bilinear:
            self.join = nn.Bilinear(features, d2, q)
        else:
            self.side, self.join = nn.Linear(d2, 3), nn.Linear(features + 3, q)

    def forward(self, x, z):
        h = self.body(x).flatten(1)
        out = self.join(h, z) if self.bilinear else self.join(torch.cat([h, torch.tanh(self.side(z))], 1))
        return self.tail(out)


class Builder:
    """Draws blocks that fit the current per-sample shape, tracking it as it changes."""

    def __init__(self, seed: int, batchnorm: bool = False):
        self.batchnorm = batchnorm  # draw BatchNorm often (the seeds checked in train mode with batch statistics)
        self.rng = random.Random(seed)
        self.blocks: list[nn.Module] = []
        self.shareable: dict[tuple, nn.Module] = {}  # (kind, in, out) -> a module that may be reused
        self.description: list[str] = []

    def pick(self, *options):
        return self.rng.choice(options)

    def add(self, module: nn.Module, name: str) -> None:
        self.blocks.append(module)
        self.description.append(name)

    def shared(self, key: tuple, make) -> tuple[nn.Module, bool]:
        if key in self.shareable and self.rng.random() < 0.3:
            return self.shareable[key], True
        module = make()
        self.shareable[key] = module
        return module, False

    def activation(self) -> None:
        act = self.pick(*ACTIVATIONS)
        self.add(act(), act.__name__)

    # ---------------------------------------------------------------------------- images
    def image_block(self, shape):
        C, H, W = shape
        kinds = ["conv", "conv", "act", "norm", "residual"] + ["norm"] * (2 * self.batchnorm)
        if min(H, W) >= 2:
            kinds += ["pool", "convtranspose"]
        if H * W <= 16:
            kinds.append("upsample")
        if C % 4 == 0:
            kinds.append("pixel_shuffle")
        if H * W <= 30:
            kinds.append("pad")
        kinds += ["prelu"] + (["channel_shuffle"] if C % 2 == 0 else [])
        kind = self.pick(*kinds)
        if kind == "conv":
            return self.conv(shape)
        if kind == "pad":
            pad = self.pick(nn.ZeroPad2d, nn.ReplicationPad2d, *([nn.ReflectionPad2d] if min(H, W) >= 2 else []))
            self.add(pad(1), pad.__name__)
            return (C, H + 2, W + 2)
        if kind == "prelu":
            channels = self.pick(1, C)
            self.add(nn.PReLU(channels), f"PReLU({channels})")
            return shape
        if kind == "channel_shuffle":
            self.add(nn.ChannelShuffle(2), "ChannelShuffle(2)")
            return shape
        if kind == "convtranspose":
            out = self.pick(1, 2, 3, 4)
            groups = self.pick(*[g for g in (1, 2) if C % g == 0 and out % g == 0])
            k, stride = self.pick(2, 3), self.pick(1, 2)
            padding = self.pick(*[p for p in (0, 1) if (H - 1) * stride - 2 * p + k >= 1 and (W - 1) * stride - 2 * p + k >= 1])
            out_pad = self.pick(*range(stride))
            self.add(nn.ConvTranspose2d(C, out, k, stride=stride, padding=padding, output_padding=out_pad, groups=groups),
                     f"ConvTranspose2d({C},{out},k{k},s{stride},p{padding},op{out_pad},g{groups})")
            size = lambda L: (L - 1) * stride - 2 * padding + k + out_pad  # noqa: E731
            return (out, size(H), size(W))
        if kind == "act":
            self.activation()
            return shape
        if kind == "norm":
            which = self.pick("batch", "group", "instance", "layer") if C * H * W > 1 and not self.batchnorm else "batch"
            if which == "batch":
                bn = with_running_stats(nn.BatchNorm2d(C))
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
                self.add(bn, "BatchNorm2d(eval)")
            elif which == "group":  # PyTorch refuses a group of one value at batch size one (degenerate anyway)
                groups = self.pick(*[g for g in (1, 2, C) if C % g == 0 and (C // g) * H * W > 1])
                self.add(nn.GroupNorm(groups, C), f"GroupNorm({groups},{C})")
            elif which == "instance" and H * W > 1:
                self.add(nn.InstanceNorm2d(C, affine=True), "InstanceNorm2d(affine)")
            else:
                self.add(nn.LayerNorm([C, H, W], elementwise_affine=self.pick(True, False)), "LayerNorm(C,H,W)")
            return shape
        if kind == "residual":
            k = self.pick(1, 3)
            conv, reused = self.shared(("conv_same", C, k), lambda: nn.Conv2d(C, C, k, padding=k // 2, padding_mode=self.pick("zeros", "circular")))
            self.add(Residual(nn.Sequential(conv, self.pick(*ACTIVATIONS)())), f"Residual(Conv2d {C}→{C} k{k}{' shared' if reused else ''})")
            return shape
        if kind == "pool":
            which = self.pick("max", "avg", "adaptive")
            if which == "max":
                self.add(nn.MaxPool2d(2, ceil_mode=self.pick(True, False)), "MaxPool2d(2)")
            elif which == "avg":
                self.add(nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False), "AvgPool2d(2, ceil)")
            else:
                out = (self.pick(1, 2), self.pick(1, 2))
                self.add(nn.AdaptiveAvgPool2d(out), f"AdaptiveAvgPool2d{out}")
                return (C, *out)
            ceil = lambda L: -(-L // 2)  # noqa: E731
            pool = self.blocks[-1]
            if isinstance(pool, nn.MaxPool2d) and not pool.ceil_mode:
                return (C, H // 2, W // 2)
            return (C, ceil(H), ceil(W))
        if kind == "upsample":
            mode = self.pick("nearest", "bilinear")
            self.add(nn.Upsample(scale_factor=2, mode=mode, **({"align_corners": self.pick(True, False)} if mode == "bilinear" else {})),
                     f"Upsample({mode})")
            return (C, 2 * H, 2 * W)
        self.add(nn.PixelShuffle(2), "PixelShuffle(2)")
        return (C // 4, 2 * H, 2 * W)

    def conv(self, shape):
        C, H, W = shape
        out = self.pick(1, 2, 3, 4, 6)
        groups = self.pick(*[g for g in (1, 2, 3, C) if C % g == 0 and out % g == 0])
        k, stride, dilation = self.pick(1, 2, 3), self.pick(1, 1, 2), self.pick(1, 1, 2)
        span = dilation * (k - 1) + 1
        pads = [0, 1] if stride > 1 else [0, 1, "same"]
        padding = self.pick(*[p for p in pads if p == "same" or (H + 2 * p >= span and W + 2 * p >= span)] or ["same"]) if stride == 1 else \
            self.pick(*[p for p in pads if H + 2 * p >= span and W + 2 * p >= span] or [None])
        if padding is None:  # too small for a strided kernel: a 1×1 one
            k, span, padding = 1, 1, 0
        mode = self.pick("zeros", "reflect", "replicate", "circular") if padding not in (0, "same") and padding < min(H, W) else "zeros"
        conv = nn.Conv2d(C, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=self.pick(True, False), padding_mode=mode)
        self.add(conv, f"Conv2d({C},{out},k{k},s{stride},p{padding},d{dilation},g{groups},{mode})")
        if padding == "same":
            return (out, H, W)
        size = lambda L: (L + 2 * padding - span) // stride + 1  # noqa: E731
        return (out, size(H), size(W))

    # ---------------------------------------------------------------------------- volumes
    def volume_block(self, shape):
        C, Dp, H, W = shape
        kind = self.pick("conv", "conv", "act", "norm", "pool", "convtranspose")
        if kind == "conv":
            out, k = self.pick(1, 2, 3), self.pick(1, 2)
            groups = self.pick(*[g for g in (1, C) if out % g == 0])
            pad = self.pick(0, 1)
            if min(Dp, H, W) + 2 * pad < k:
                k = 1
            self.add(nn.Conv3d(C, out, k, padding=pad, groups=groups, padding_mode=self.pick("zeros", "replicate") if pad else "zeros"),
                     f"Conv3d({C},{out},k{k},p{pad},g{groups})")
            size = lambda L: L + 2 * pad - k + 1  # noqa: E731
            return (out, size(Dp), size(H), size(W))
        if kind == "convtranspose":
            out = self.pick(1, 2)
            self.add(nn.ConvTranspose3d(C, out, 2), f"ConvTranspose3d({C},{out},k2)")
            return (out, Dp + 1, H + 1, W + 1)
        if kind == "act":
            self.activation()
            return shape
        if kind == "norm":
            if self.batchnorm or self.pick(True, False):
                self.add(with_running_stats(nn.BatchNorm3d(C)), "BatchNorm3d(eval)")
            else:
                self.add(nn.GroupNorm(1, C), f"GroupNorm(1,{C})")
            return shape
        if min(Dp, H, W) >= 2:
            self.add(nn.MaxPool3d(2), "MaxPool3d(2)")
            return (C, Dp // 2, H // 2, W // 2)
        self.add(nn.AdaptiveAvgPool3d(1), "AdaptiveAvgPool3d(1)")
        return (C, 1, 1, 1)

    # ------------------------------------------------------------------------- sequences
    def sequence_block(self, shape):
        T, d = shape
        kind = self.pick("linear", "linear", "act", "norm", "rnn", "attention", "encoder", "conv1d", "pool1d", "lstm_proj", "sequence_norm",
                         "convtranspose1d", "decoder")
        if kind == "convtranspose1d":
            out, k, stride = self.pick(2, 3), self.pick(2, 3), self.pick(1, 2)
            self.add(OverTime(nn.ConvTranspose1d(d, out, k, stride=stride)), f"ConvTranspose1d over time({d},{out},k{k},s{stride})")
            return ((T - 1) * stride + k, out)
        if kind == "decoder" and d % 2 == 0:
            self.add(SelfDecoder(nn.TransformerDecoderLayer(d, self.pick(1, 2), 2 * d, dropout=0.0, batch_first=True,
                                                            norm_first=self.pick(True, False))), f"TransformerDecoderLayer({d}, memory = input)")
            return shape
        if kind == "pool1d" and T >= 2:
            pool = self.pick(nn.MaxPool1d, nn.AvgPool1d)
            self.add(OverTime(pool(2)), f"{pool.__name__}(2) over time")
            return (T // 2, d)
        if kind == "lstm_proj":
            hidden = self.pick(3, 4)
            proj = self.pick(1, 2)
            self.add(Recurrent(nn.LSTM(d, hidden, proj_size=proj, batch_first=True, bidirectional=self.pick(True, False))),
                     f"LSTM({d},{hidden},proj={proj})")
            return (T, proj * (2 if self.blocks[-1].rnn.bidirectional else 1))
        if kind == "sequence_norm":
            self.add(nn.LayerNorm([T, d]), f"LayerNorm({T},{d})")
            return shape
        if kind == "linear":
            out = self.pick(2, 3, 4, 6)
            lin, reused = self.shared(("linear", d, out), lambda: nn.Linear(d, out, bias=self.pick(True, False)))
            self.add(lin, f"Linear({d},{out}){' shared' if reused else ''}")
            return (T, out)
        if kind == "act":
            self.activation()
            return shape
        if kind == "norm":
            if self.pick(True, False):
                self.add(nn.LayerNorm(d), f"LayerNorm({d})")
            else:
                self.add(nn.RMSNorm(d), f"RMSNorm({d})")
            return shape
        if kind == "rnn":
            cell = self.pick(nn.RNN, nn.LSTM, nn.GRU)
            hidden, layers, bidir = self.pick(2, 3), self.pick(1, 2), self.pick(True, False)
            self.add(Recurrent(cell(d, hidden, num_layers=layers, bidirectional=bidir, batch_first=True)),
                     f"{cell.__name__}({d},{hidden},layers={layers},bidir={bidir})")
            return (T, hidden * (2 if bidir else 1))
        if kind == "attention" and d % 2 == 0:
            heads = self.pick(1, 2)
            self.add(SelfAttention(nn.MultiheadAttention(d, heads, batch_first=True, bias=self.pick(True, False)), self.pick(True, False)),
                     f"SelfAttention({d},heads={heads})")
            return shape
        if kind == "encoder" and d % 2 == 0:
            layer = nn.TransformerEncoderLayer(d, self.pick(1, 2), 2 * d, dropout=0.0, batch_first=True, norm_first=self.pick(True, False),
                                               activation=self.pick("relu", "gelu"))
            self.add(layer, f"TransformerEncoderLayer({d})")
            return shape
        out, k = self.pick(2, 3, 4), self.pick(1, 2, 3)
        if T >= k:
            self.add(OverTime(nn.Conv1d(d, out, k, padding=self.pick(0, k // 2))), f"Conv1d over time({d},{out},k{k})")
            pad = self.blocks[-1].conv.padding[0]
            return (T + 2 * pad - k + 1, out)
        self.activation()
        return shape

    # --------------------------------------------------------------------------- vectors
    def vector_block(self, shape):
        (d,) = shape
        kind = self.pick("linear", "linear", "act", "norm", "residual", "glu", "bilinear", "to_image", *["norm"] * (2 * self.batchnorm))
        if kind == "to_image":  # a generator/decoder: Linear to a small map, then image blocks
            image = (self.pick(1, 2), self.pick(2, 3), self.pick(2, 3))
            self.add(nn.Linear(d, image[0] * image[1] * image[2]), f"Linear({d},{image[0] * image[1] * image[2]})")
            self.add(nn.Unflatten(1, image), f"Unflatten{image}")
            return image
        if kind == "linear":
            out = self.pick(2, 3, 4, 6, 8)
            lin, reused = self.shared(("linear", d, out), lambda: nn.Linear(d, out, bias=self.pick(True, False)))
            self.add(lin, f"Linear({d},{out}){' shared' if reused else ''}")
            return (out,)
        if kind == "act":
            self.activation()
            return shape
        if kind == "norm":
            if self.batchnorm or self.pick(True, False):
                self.add(with_running_stats(nn.BatchNorm1d(d)), "BatchNorm1d(eval)")
            else:
                self.add(nn.LayerNorm(d, bias=self.pick(True, False)), f"LayerNorm({d})")
            return shape
        if kind == "residual":
            lin, reused = self.shared(("linear", d, d), lambda: nn.Linear(d, d))
            self.add(Residual(nn.Sequential(lin, self.pick(*ACTIVATIONS)())), f"Residual(Linear {d}){' shared' if reused else ''}")
            return shape
        if kind == "glu" and d % 2 == 0:
            self.add(nn.GLU(), "GLU")
            return (d // 2,)
        out = self.pick(2, 3)
        self.add(SelfBilinear(nn.Bilinear(d, d, out)), f"Bilinear({d},{d},{out})")
        return (out,)


def random_model(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """A random float64 network in eval mode, its inputs (n of 1, 2, 3 or 5) and a one-line description.

    Its outputs per sample: q of 1 to 4, as (n, q), or (n,) for q = 1 and (n, 2, 2) for q = 4 half the time.
    One model in five takes a second, vector input (:class:`TwoInputs`).

    Every fourth seed draws BatchNorm often; :func:`check` runs those in train mode with batch statistics."""
    torch.manual_seed(seed)
    b = Builder(seed, batchnorm=seed % 4 == 3)
    sizes = random.Random(seed + 10**6)  # batch size and outputs from their own stream: the architecture stays put
    n = sizes.choice((2, 3, 5) if b.batchnorm else (1, 2, 3, 3, 5))
    q = sizes.choice((1, 2, 2, 3, 4))
    shaped = sizes.random() < 0.5  # (n,) for q = 1, (n, 2, 2) for q = 4
    two_inputs = sizes.random() < 0.2
    layout = b.pick("image", "image", "sequence", "tokens", "vector")
    if sizes.random() < 0.1:  # drawn apart so that the other seeds' architectures stay as they were
        layout = "volume"
    if layout == "volume":
        shape = (b.pick(1, 2), b.pick(2, 3), b.pick(3, 4), b.pick(3, 4))
    elif layout == "image":
        shape = (b.pick(1, 2, 3, 4), b.pick(4, 5, 6), b.pick(4, 5, 7))
    elif layout in ("sequence", "tokens"):
        shape = (b.pick(2, 3, 4), b.pick(2, 4))
    else:
        shape = (b.pick(3, 4, 5),)
    if layout == "tokens":  # integer inputs through an embedding (padding index as drawn), or a bag of them
        vocab = b.pick(5, 7)
        x = torch.randint(0, vocab, (n, shape[0]))
        if sizes.random() < 0.25:
            mode = sizes.choice(("sum", "mean", "max"))
            b.add(nn.EmbeddingBag(vocab, shape[1], mode=mode), f"EmbeddingBag({vocab},{shape[1]},{mode})")
            shape = (shape[1],)
        else:
            b.add(nn.Embedding(vocab, shape[1], padding_idx=b.pick(None, 0)), f"Embedding({vocab},{shape[1]})")
    else:
        x = torch.randn(n, *shape, dtype=D)
    for _ in range(b.pick(2, 3, 4, 5)):
        if len(shape) == 4:
            shape = b.volume_block(shape)
        elif len(shape) == 3:
            if shape[1] * shape[2] <= 36 and b.rng.random() < 0.15:
                b.add(ImageToSequence(), "image→sequence")
                shape = (shape[1] * shape[2], shape[0])
            else:
                shape = b.image_block(shape)
        elif len(shape) == 2:
            if b.rng.random() < 0.15:
                how = b.pick("mean", "max", "last")
                b.add(Pool(how), f"pool over time ({how})")
                shape = (shape[1],)
            else:
                shape = b.sequence_block(shape)
        else:
            shape = b.vector_block(shape)
    if len(shape) == 1 and random.Random(seed + 2 * 10**6).random() < 0.15:  # its own stream: other seeds stay put
        experts = b.pick(2, 3)
        b.add(Routed(shape[0], experts), f"Routed({shape[0]}, {experts} experts, top-1)")
    features = 1
    for s in shape:
        features *= s
    tail = nn.Flatten(0) if shaped and q == 1 else nn.Unflatten(1, (2, 2)) if shaped and q == 4 else nn.Identity()
    tail_text = {nn.Flatten: " → outputs (n,)", nn.Unflatten: " → outputs (n, 2, 2)"}.get(type(tail), "")
    if two_inputs:
        d2, bilinear = sizes.choice((2, 3)), sizes.random() < 0.5
        model = TwoInputs(nn.Sequential(*b.blocks), features, d2, q, bilinear, tail).to(D).eval()
        z = torch.randn(n, d2, dtype=D)
        text = " → ".join(b.description) + f" ⊕ second input ({d2},) via {'Bilinear' if bilinear else 'Linear+concat'} → {q}{tail_text}"
        return model, (x, z), f"n={n} {layout} {tuple(x.shape[1:])}: {text}"
    b.add(nn.Flatten(), "Flatten")
    b.add(nn.Linear(features, q), f"Linear({features},{q})")
    if not isinstance(tail, nn.Identity):
        b.add(tail, tail_text[3:])
    model = nn.Sequential(*b.blocks).to(D).eval()
    return model, (x,), f"n={n} {layout} {tuple(x.shape[1:])}: " + " → ".join(b.description)


def check(seed: int, strategies=("structured", "jacobian", "auto"), tol: float = 1e-9) -> list[str]:
    """Problems found for ``random_model(seed)`` (empty: K, tr K and both penalty gradients match the loop)."""
    from reference import jacobian_loop, kernel_loop, penalty_grad_loop, relative_error, trainable

    from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace
    from mgs_torch._guards import preserved_state
    from mgs_torch._problem import build_problem
    from mgs_torch.engines import engine_for

    model, x, text = random_model(seed)
    # every fourth seed (drawn with many BatchNorms): train mode, batch statistics, the whole-batch Jacobian
    wb = seed % 4 == 3 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    kw = {"batch_norm": "batch"} if wb else {}
    if wb:
        model.train()
        text = "train mode, batch_norm='batch': " + text
    K_ref = kernel_loop(model, x, whole_batch=wb).detach()
    eig = torch.linalg.eigvalsh(K_ref)
    kinds = ["trace"] + (["logdet"] if eig.min() > 1e-6 * eig.max() else [])
    def reference_gradient(kind: str) -> torch.Tensor:
        try:
            grads = penalty_grad_loop(model, x, kind, whole_batch=wb)
        except RuntimeError as error:  # g(K) does not depend on θ (only biases and fixed features): zero
            if "does not require grad" not in str(error):
                raise
            grads = [None] * len(trainable(model))
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, trainable(model))])

    refs = {kind: reference_gradient(kind) for kind in kinds}
    # one option per seed on top: output-summed K, chunking, or J restricted to some parameters
    option = seed % 3
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    chosen = names[: max(1, len(names) // 2)]
    if option == 0:
        extra_ref = kernel_loop(model, x, outputs="sum", whole_batch=wb).detach()
    elif option == 2:
        named = dict(model.named_parameters())
        extra_ref = kernel_loop(model, x, params=[named[k] for k in chosen], whole_batch=wb).detach()
    # Hutchinson's path: row norms for random ±1 cotangents, per probe and sample, against J of the loop
    J_ref = jacobian_loop(model, x, whole_batch=wb).detach()
    n = x[0].shape[0]
    q = J_ref.shape[0] // n
    signs = torch.randint(0, 2, (3, n, q), generator=torch.Generator().manual_seed(seed)).to(D) * 2 - 1
    probe_ref = (torch.einsum("kia,iap->kip", signs, J_ref.reshape(n, q, -1)) ** 2).sum(-1)
    problems = []
    before = _state(model)
    for strategy in strategies:
        try:
            errors = {"K": relative_error(mgs_kernel(model, x, strategy=strategy, **kw), K_ref),
                      "tr K": relative_error(mgs_trace(model, x, strategy=strategy, **kw), K_ref.trace())}
            if option == 0:
                errors["K (outputs='sum')"] = relative_error(mgs_kernel(model, x, strategy=strategy, outputs="sum", **kw), extra_ref)
            elif option == 1:
                errors["K (chunk_size=1)"] = relative_error(mgs_kernel(model, x, strategy=strategy, chunk_size=1, **kw), K_ref)
                value = mgs_penalty(model, x, strategy=strategy, reduction="sum", chunk_size=1, **kw)
                grads = torch.autograd.grad(value, trainable(model), allow_unused=True)
                errors["∂trace (chunk_size=1)"] = relative_error(
                    torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, trainable(model))]), refs["trace"])
            else:  # relative to the whole K: a block of J can be ~0 (a norm of two features makes earlier layers flat)
                ours = mgs_kernel(model, x, strategy=strategy, params=chosen, **kw)
                errors[f"K (params={len(chosen)} of {len(names)})"] = float((ours - extra_ref).norm()) / max(float(extra_ref.norm()), 1e-12 * float(K_ref.norm()), 1e-300)
            with preserved_state(model, kw.get("batch_norm", "eval")):
                problem = build_problem(model, x, batch_norm=kw.get("batch_norm", "eval"))
                norms = engine_for(strategy, problem).row_sq_norms(problem, signs)
            errors["probe row norms"] = float((norms - probe_ref).norm()) / max(float(probe_ref.norm()), 1e-12 * float(K_ref.norm()), 1e-300)
            for kind in kinds:
                value = mgs_penalty(model, x, kind=kind, strategy=strategy, reduction="sum", **kw)
                grads = torch.autograd.grad(value, trainable(model), allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, trainable(model))])
                errors[f"∂{kind}"] = relative_error(flat, refs[kind])
        except Exception as error:  # noqa: BLE001 - a refusal is a finding too
            problems.append(f"seed {seed} {strategy}: {type(error).__name__}: {str(error).splitlines()[0][:200]}  [{text}]")
            continue
        bad = {k: f"{v:.1e}" for k, v in errors.items() if not v <= tol}
        if bad:
            problems.append(f"seed {seed} {strategy}: WRONG {bad}  [{text}]")
        changed = _changes(before, _state(model))
        if changed:
            problems.append(f"seed {seed} {strategy}: SIDE EFFECT {changed}  [{text}]")
    return problems


def _state(model: nn.Module) -> dict:
    return {
        "identities": [(k, id(t)) for k, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]],
        "values": [t.detach().clone() for t in [*model.parameters(), *model.buffers()]],
        "grads": [p.grad is None for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _changes(before: dict, after: dict) -> list[str]:
    """What an MGS call changed in the model or the global RNG (it must change nothing)."""
    out = []
    if before["identities"] != after["identities"]:
        out.append("a parameter or buffer object was replaced")
    if any(not torch.equal(a, b) for a, b in zip(before["values"], after["values"])):
        out.append("a parameter or buffer value moved")
    for key in ("grads", "modes"):
        if before[key] != after[key]:
            out.append(f"{key} changed")
    if not torch.equal(before["rng"], after["rng"]):
        out.append("the global RNG was consumed")
    return out


if __name__ == "__main__":
    import argparse
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:100", help="start:stop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start, stop = map(int, args.seeds.split(":"))
    t0, failures = time.time(), 0
    for seed in range(start, stop):
        try:
            lines = check(seed)
        except Exception as error:  # noqa: BLE001 - the reference itself failed: report, go on
            lines = [f"seed {seed}: reference failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}  [{random_model(seed)[2]}]"]
        for line in lines:
            failures += 1
            print(line, flush=True)
    print(f"{stop - start} random models, {failures} problems, {time.time() - t0:.0f} s")
