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


def _tiny_cnn(axes: int, channels: int, width: int, classes: int) -> nn.Module:
    """conv-relu-pool-conv-relu-global pool-linear over ``axes`` spatial axes (fixed random weights)."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[axes - 1]
    torch.manual_seed(0)
    return nn.Sequential(
        conv(channels, 4, 5 if axes == 1 else 3, padding=2 if axes == 1 else 1),
        nn.ReLU(),
        (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[axes - 1](2),
        conv(4, width, 3, padding=1),
        nn.ReLU(),
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[axes - 1](1),
        nn.Flatten(),
        nn.Linear(width, classes),
    ).eval()


def tiny_signal() -> nn.Module:
    """A 1-D CNN on 2-channel signals [2, L] with 3 classes (fixed random weights)."""
    return _tiny_cnn(1, channels=2, width=8, classes=3)


def tiny_volume() -> nn.Module:
    """A 3-D CNN on one-channel volumes [1, D, H, W] with 2 classes (fixed random weights)."""
    return _tiny_cnn(3, channels=1, width=4, classes=2)
