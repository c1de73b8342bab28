"""Small models for the command-line tests, named on the command line as ``cli_models:tiny``."""

import torch
from torch import nn

NUM_CLASSES = 10


def tiny() -> nn.Module:
    """A two-conv CNN with 10 classes and fixed random weights: compiles and runs in milliseconds."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    ).eval()


def tiny_gated() -> nn.Module:
    """``tiny`` with a squeeze-excitation gate after its first conv (for --global-context)."""
    layers = list(tiny())
    layers.insert(2, _Gate(4))  # its weights follow tiny's from the same seeded generator state
    return nn.Sequential(*layers).eval()


def not_a_model():
    """A factory that returns something else, for the error message."""
    return "not a module"


class _Gate(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc(mean(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def tiny_signal() -> nn.Module:
    """A 1-D CNN on 2-channel signals [2, L] with 3 classes (fixed random weights)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


def tiny_volume() -> nn.Module:
    """A 3-D CNN on one-channel volumes [1, D, H, W] with 2 classes (fixed random weights)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
