"""Architectures DeepFool is benchmarked on besides the shipped MnistConvNet (bench_deepfool_archs.py),
all for 1×28×28 inputs and 10 classes, and a short seeded training on the embedded MNIST subset so
that the predictions, and so the DeepFool runs, are those of a working classifier.

* ``k3_pool_late``: 3×3 convolutions 16-32-64, the first pool after two convolutions;
* ``k7_pool_first``: a max-pool on the image, a 7×7 convolution, a strided 3×3 convolution and an
  overlapping 3×3/2 max-pool;
* ``mlp``: 784-512-256-10;
* ``resnet_small``: not sequential, a custom ``forward`` with two residual blocks (batch norm, a
  1×1 strided projection on the skip of the second), average pooling.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


def k3_pool_late() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def k7_pool_first() -> nn.Module:
    return nn.Sequential(
        nn.MaxPool2d(2),
        nn.Conv2d(1, 32, 7, padding=3), nn.ReLU(),
        nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(48 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out
                     else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNetSmall(nn.Module):
    """stem 3×3 conv 1→16; residual block 16→16 (28×28); residual block 16→32, stride 2 (14×14);
    2×2 average pool (7×7); linear 1568→10."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = _Block(16, 16, 1)
        self.block2 = _Block(16, 32, 2)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.avg_pool2d(x, 2), 1))


ARCHS = {
    "k3_pool_late": (k3_pool_late, "sequential: 3×3 convs 16-32-64, pool after conv 2 and 3, fc 128"),
    "k7_pool_first": (k7_pool_first, "sequential: max-pool first, 7×7 conv, strided 3×3 conv, overlapping 3/2 pool, fc 64"),
    "mlp": (mlp, "sequential: 784-512-256-10"),
    "resnet_small": (ResNetSmall, "custom forward: 2 residual blocks, batch norm, 1×1 projection, avg pool"),
}


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 1, seed: int = 0,
                  batch_size: int = 64, lr: float = 1e-3) -> tuple[nn.Module, float]:
    """``epochs`` of Adam on (x, y), seeded; returns the model in eval mode and the seconds taken."""
    torch.manual_seed(seed)
    for m in model.modules():  # re-initialise under the seed: the weights depend on it alone
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), time.perf_counter() - start


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())
