"""The testbench's models: a configurable fully connected network and a LeNet-5-style CNN.

Both return raw outputs (logits for classification), as the MGS kernel needs. Dropout, when
requested, sits between all fully connected layers (after each hidden activation).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["MODELS", "FCN", "LeNet5", "build_model", "he_init_"]

MODELS = ("fcn", "lenet5")
PAPER_FCN_HIDDEN = (300,) * 6  # the paper's FCN: 6 hidden layers of 300 units, ReLU


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
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

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
        head: list[nn.Module] = [nn.Flatten()]
        width = flat
        for h in fc:
            head += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            width = h
        head.append(nn.Linear(width, num_outputs))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def he_init_(model: nn.Module) -> nn.Module:
    """He (Kaiming-normal, fan-in) weights and zero biases for every Linear/Conv layer.

    PyTorch's default init (uniform with a = √5) shrinks the signal through 6 ReLU layers so much
    that SGD at lr 0.1 sits at chance for tens of epochs; He init is the usual choice for ReLU nets.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def build_model(name: str, input_shape: Sequence[int], num_outputs: int, *, dropout: float = 0.0, hidden: Sequence[int] | None = None) -> nn.Module:
    """A fresh model by name (one of :data:`MODELS`), He-initialised; seed ``torch`` first for a reproducible init."""
    if name == "fcn":
        return he_init_(FCN(input_shape, num_outputs, PAPER_FCN_HIDDEN if hidden is None else tuple(hidden), dropout))
    if name == "lenet5":
        return he_init_(LeNet5(input_shape, num_outputs, dropout))
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
