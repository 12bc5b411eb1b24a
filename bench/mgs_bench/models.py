"""The testbench's models: a configurable fully connected network and a LeNet-5-style CNN.

Both return raw outputs (logits for classification), as the MGS kernel needs. Dropout, when
requested, sits between all fully connected layers (after each hidden activation).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["MODELS", "FCN", "LeNet5", "build_model", "init_", "INITS"]

MODELS = ("fcn", "lenet5")
PAPER_FCN_HIDDEN = (300,) * 6  # the paper's FCN: 6 hidden layers of 300 units, ReLU


def dense_stack(width: int, hidden: Sequence[int], num_outputs: int, dropout: float = 0.0) -> list[nn.Module]:
    """Linear → ReLU (→ Dropout) per hidden width, then a linear output layer."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return layers + [nn.Linear(width, num_outputs)]


class FCN(nn.Module):
    """Flatten → [Linear → ReLU → Dropout(p)] per hidden width → Linear(num_outputs).

    Args:
        input_shape: shape of one input (flattened to ∏ input_shape features).
        num_outputs: q, the number of raw outputs.
        hidden: hidden widths; default the paper's 6 × 300.
        dropout: dropout probability after every hidden activation (0: no Dropout modules).
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = PAPER_FCN_HIDDEN, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), *dense_stack(math.prod(input_shape), hidden, num_outputs, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 adapted to the input size, 2-D images (C, H, W) or 1-D sequences (C, L).

    conv(6, 5×5, same padding) → ReLU → max-pool 2 → conv(16, 5×5) → ReLU → max-pool 2 →
    Linear 120 → ReLU → Linear 84 → ReLU → Linear(num_outputs), with Dropout(p) after the two
    hidden fully connected activations. The second convolution is unpadded (as in LeNet-5) when
    the feature map is at least 10 wide (28×28 MNIST → 5×5×16 = 400 features) and padded to
    "same" for small inputs (8×8 digits → 2×2×16 = 64 features); a pooling layer is skipped when
    the map is narrower than 2.
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, dropout: float = 0.0, channels: tuple[int, int] = (6, 16), fc: tuple[int, int] = (120, 84)):
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) not in (2, 3):
            raise ValueError(
                f"LeNet-5 needs image (C, H, W) or sequence (C, L) inputs, got input shape {shape}; use model='fcn'"
            )
        conv, pool = (nn.Conv2d, nn.MaxPool2d) if len(shape) == 3 else (nn.Conv1d, nn.MaxPool1d)
        size = min(shape[1:])
        feats: list[nn.Module] = [conv(shape[0], channels[0], 5, padding=2), nn.ReLU()]
        if size >= 2:
            feats.append(pool(2))
            size //= 2
        pad2 = 0 if size >= 10 else 2
        feats += [conv(channels[0], channels[1], 5, padding=pad2), nn.ReLU()]
        size = size - 4 + 2 * pad2
        if size >= 2:
            feats.append(pool(2))
        self.features = nn.Sequential(*feats)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *shape)).numel()
        self.classifier = nn.Sequential(nn.Flatten(), *dense_stack(flat, fc, num_outputs, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


INITS = ("auto", "he", "xavier", "torch")
AUTO_INIT = {"fcn": "xavier", "lenet5": "he"}


def init_(model: nn.Module, scheme: str = "he") -> nn.Module:
    """Re-initialise every Linear/Conv layer in place: weights by ``scheme``, biases zero.

    ``"auto"``: the scheme of :data:`AUTO_INIT` for the model — the one under which unregularised
    SGD at lr 0.1 both learns and stays finite on digits (He made the 6×300 FCN diverge on some
    runs; Glorot made LeNet-5 learn so slowly that it did not fit the noisy labels in 100 epochs).
    ``"he"``: Kaiming-normal, fan-in, ReLU gain (variance 2/fan_in); ``"xavier"``: Glorot-uniform
    (variance 2/(fan_in + fan_out), Keras' default); ``"torch"``: PyTorch's own default, left as is.
    PyTorch's default (uniform, a = √5, variance 1/(3 fan_in)) shrinks the signal through the
    paper's 6 ReLU layers so much that SGD at lr 0.1 sits at chance for tens of epochs.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of {INITS}")
    if scheme == "auto":
        raise ValueError("init_ needs a concrete scheme; build_model resolves 'auto' per model")
    if scheme == "torch":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def build_model(name: str, input_shape: Sequence[int], num_outputs: int, *, dropout: float = 0.0, hidden: Sequence[int] | None = None, init: str = "auto") -> nn.Module:
    """A fresh model by name (one of :data:`MODELS`), initialised by :func:`init_`; seed ``torch`` first."""
    if name in AUTO_INIT and init == "auto":
        init = AUTO_INIT[name]
    if name == "fcn":
        return init_(FCN(input_shape, num_outputs, PAPER_FCN_HIDDEN if hidden is None else tuple(hidden), dropout), init)
    if name == "lenet5":
        return init_(LeNet5(input_shape, num_outputs, dropout), init)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
