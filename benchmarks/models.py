"""The benchmark models: LeNet-5, a 6×300 fully connected net and a small residual CNN with BatchNorm on
1×28×28 inputs (issue #4), a CIFAR-sized convolutional net of about 1.1 M parameters on 3×32×32 (issue #12), and
(issue #22) a small ViT, ResNet-18 (torchvision's, or the same layout written out) and a tiny BERT on token ids."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def LeNet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 on 1×28×28 inputs: 61,706 parameters (the testbench's definition, mgs_bench.models)."""
    return _bench_models().LeNet5((1, 28, 28), num_classes)


def fcn(num_classes: int = 10) -> nn.Module:
    """The paper's fully connected net on 1×28×28 inputs: 6 hidden ReLU layers of 300 units (690,010 parameters),
    as the bare ``nn.Sequential`` inside the testbench's FCN (what this benchmark has always timed)."""
    return _bench_models().FCN((1, 28, 28), num_classes).net


def _bench_models():
    """The testbench's model module: installed (pip install -e ./bench) or from the repository's bench/."""
    try:
        from mgs_bench import models
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
        from mgs_bench import models
    return models


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Stem, two residual blocks (16 and 32 channels, one stride-2 stage), BatchNorm, global pooling."""

    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block1 = _Block(channels)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * channels)
        self.block2 = _Block(2 * channels)
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x):
        x = self.block1(F.relu(self.bn(self.stem(x))))
        x = self.block2(F.relu(self.bn_down(self.down(x))))
        return self.fc(x.mean((2, 3)))


class CifarCNN(nn.Module):
    """3→64→128→256 channels, two 3×3 conv + BatchNorm + ReLU per stage, max pooling, global average
    pooling and a linear head: 1,148,874 parameters on 3×32×32 inputs, q = 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for channels in (64, 128, 256):
            for _ in range(2):
                layers += [nn.Conv2d(width, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
                width = channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers[:-1])  # no pooling after the last stage
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class _ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7×7 stem, max pooling, four stages of two basic blocks, 64–512 channels),
    written out for machines without torchvision: 11.2 M parameters at 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_BasicBlock(inplanes, planes, stride), _BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ``resnet18`` where torchvision is installed, else the same architecture written out."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - absent or unusable beside this torch build
        return _ResNet18(num_classes)
    return torchvision.models.resnet18(num_classes=num_classes)


class _Logits(nn.Module):
    """A Hugging Face classifier called on token ids, returning its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def tiny_bert(num_classes: int = 2, hidden: int = 32, dropout: float | None = None) -> nn.Module:
    """A tiny BertForSequenceClassification built from a config (2 layers, hidden 32, 2 heads, vocabulary 100), on
    token ids of length 16: needs ``transformers`` (extra ``.[hf]``); nothing is downloaded. ``dropout`` replaces
    the config's hidden and attention dropout (0.1) where given."""
    from transformers import BertConfig, BertForSequenceClassification

    rates = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_classes, **rates)
    return _Logits(BertForSequenceClassification(config))


def bert(num_classes: int = 10) -> nn.Module:
    """The benchmark's tiny BERT: ``tiny_bert`` at hidden 64 (2 layers, 2 heads, vocabulary 100, 10 labels: 80,458
    parameters) without dropout, so that K is that of one deterministic function (as for the ViT)."""
    return tiny_bert(num_classes, hidden=64, dropout=0.0)


class ViT(nn.Module):
    """A small vision transformer (issue #22): 4×4 patches of a 3×32×32 image embedded by a strided convolution
    (64 tokens of width 128), a class token and learned position embeddings (bare Parameters), four
    ``nn.TransformerEncoderLayer(128, 4, 512, batch_first=True)`` blocks, LayerNorm and a linear head on the
    class token: 0.8 M parameters. ``dropout=0.0`` by default, so that K is that of one deterministic function
    and the naive ``vmap(jacrev)`` comparison can run (vmap refuses random ops in its default mode)."""

    def __init__(self, num_classes: int = 10, dim: int = 128, depth: int = 4, heads: int = 4, patch: int = 4,
                 image: int = 32, mlp: int = 512, dropout: float = 0.0):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, heads, mlp, dropout=dropout, batch_first=True) for _ in range(depth)
        ))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


MODELS = {"lenet5": LeNet5, "fcn": fcn, "resnet": SmallResNet, "cifar_cnn": CifarCNN, "vit": ViT,
          "resnet18": resnet18, "bert": bert}
INPUT_SHAPES = {"lenet5": (1, 28, 28), "fcn": (1, 28, 28), "resnet": (1, 28, 28), "cifar_cnn": (3, 32, 32), "vit": (3, 32, 32),
                "resnet18": (3, 32, 32), "bert": (16,)}
"""The shape of one input; a model named in TOKEN_INPUTS takes token ids of that shape, the others images."""
TOKEN_INPUTS = {"bert": 100}
"""Model -> vocabulary size: its inputs are integer token ids drawn below it, not Gaussian images."""
DEFAULT_MODELS = ["lenet5", "fcn", "resnet", "cifar_cnn", "vit"]
"""What a benchmark runs when no model is named (what the committed numbers cover); resnet18 (11.2 M parameters,
where the naive per-sample Jacobians hold q·n·11.2 M floats) and the tiny BERT (needs ``transformers``) on request."""


def make_input(name: str, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch of ``n`` inputs for model ``name`` from torch's global generator: token ids below the vocabulary
    for a language model, Gaussian images otherwise."""
    shape = (n, *INPUT_SHAPES[name])
    if name in TOKEN_INPUTS:
        return torch.randint(0, TOKEN_INPUTS[name], shape, device=device)
    return torch.randn(shape, device=device)
