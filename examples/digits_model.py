"""A small CNN for 8×8 grayscale digits, written the way a user would write one: a plain
``nn.Module`` with functional ReLUs, no names or aliases declared for the pipeline.

Used through ``arch: examples.digits_model:DigitsCNN`` (configs/digits.yaml). The pipeline infers
its layer aliases: ``last_conv`` = output of ``conv2``, ``penultimate`` = input of ``fc2`` (the
hidden features after the ReLU), ``logits`` = output of ``fc2``.
"""
import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """conv 1→w 3×3 pad 1, ReLU; conv w→2w 3×3 pad 1, ReLU, max-pool 2 (8×8 → 4×4);
    fc 2w·16→hidden, ReLU; fc hidden→classes."""

    def __init__(self, n_classes: int = 10, width: int = 16, hidden: int = 64, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
