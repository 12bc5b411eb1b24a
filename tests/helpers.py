"""Small float64 models and the comparisons shared by the tests (imported as ``from helpers import ...``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

def reference_jacobian(model: nn.Module, inputs, params=None) -> torch.Tensor:
    """J by brute force: one autograd.grad per (sample, output), each sample run on its own.

    Independent of torch.func and of the engines: rows ordered (sample, output), columns the
    concatenated parameters in ``params`` (default: all with requires_grad).
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for i in range(inputs[0].shape[0]):
        out = model(*(x[i : i + 1] for x in inputs)).reshape(-1)
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def reference_kernel(model, inputs, params=None, outputs="full") -> torch.Tensor:
    J = reference_jacobian(model, inputs, params)
    K = J @ J.T
    if outputs == "sum":
        n = (inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape[0]
        q = K.shape[0] // n
        K = K.reshape(n, q, n, q).diagonal(dim1=1, dim2=3).sum(-1)
    return K


def mlp(q: int = 3, d: int = 4, hidden: int = 6) -> nn.Module:
    layers = [nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, q)]
    if q == 0:
        layers[-1] = nn.Linear(hidden, 1)
    return nn.Sequential(*layers).double()


class SmallCNN(nn.Module):
    """Conv (padding, stride, groups), BatchNorm, pooling, LayerNorm and a linear head."""

    def __init__(self, q: int = 3, channels: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.norm = nn.LayerNorm(4 * 2 * 2)
        self.head = nn.Linear(16, q)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        return self.head(self.norm(x.flatten(1)))


def small_cnn(q: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN(q).double()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def assert_close(actual, expected, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def eigensolver_threads(monkeypatch) -> list[int]:
    """A list that records the torch thread count of every ``torch.linalg.eigvalsh`` call from now on."""
    seen: list[int] = []
    eigvalsh = torch.linalg.eigvalsh

    def spy(K, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return eigvalsh(K, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", spy)
    return seen
