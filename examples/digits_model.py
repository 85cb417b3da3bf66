"""A small CNN for 8×8 grayscale digits, written the way a user would write one: a plain
``nn.Module`` that declares no layer names or aliases for the pipeline.

Used through ``arch: examples.digits_model:DigitsCNN`` (configs/digits.yaml). The pipeline infers
its layer aliases: ``last_conv`` = output of ``conv2``, ``penultimate`` = input of ``fc2`` (the
hidden features after ``relu3``), ``logits`` = output of ``fc2``. The ReLUs are modules (one per use)
rather than ``F.relu`` calls so that explanation.py's softplus copy can replace them.
"""
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv 1→w 3×3 pad 1, ReLU; conv w→2w 3×3 pad 1, ReLU, max-pool 2 (8×8 → 4×4);
    fc 2w·16→hidden, ReLU; fc hidden→classes."""

    def __init__(self, n_classes: int = 10, width: int = 16, hidden: int = 64, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
