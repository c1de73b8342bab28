"""Tiny models for the explorer's tests: fast enough that a browser test runs real maps in seconds.

``load_model("tests.serve_models:tiny")`` works too (ImageNet normalisation, no label names).
"""

import torch
from torch import nn

from kfx.models import LoadedModel, _imagenet_normalize

TINY_LABELS = tuple(f"tiny class {i}" for i in range(6))


class Tiny(nn.Module):
    """conv-relu-pool-conv-GAP-linear on RGB, six classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(12, len(TINY_LABELS))

    def forward(self, x):
        return self.classifier(self.features(x))


def tiny() -> nn.Module:
    """A seeded :class:`Tiny` in eval mode."""
    torch.manual_seed(0)
    return Tiny().eval()


def tiny_loaded(size: int = 64) -> LoadedModel:
    """:func:`tiny` ready for the explorer: ``size`` x ``size`` inputs, six named classes."""
    return LoadedModel(tiny(), "tiny", _imagenet_normalize, size, TINY_LABELS)


class FixedSize(nn.Module):
    """A classifier that only takes 64 x 64 inputs (its linear layer reads every pixel of a 4 x 4 map)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 16, stride=16), nn.Flatten())
        self.classifier = nn.Linear(2 * 4 * 4, len(TINY_LABELS))

    def forward(self, x):
        return self.classifier(self.features(x))


def fixed_size_loaded() -> LoadedModel:
    """:class:`FixedSize` for the explorer, at its one input size, 64."""
    torch.manual_seed(0)
    return LoadedModel(FixedSize().eval(), "fixed-size", _imagenet_normalize, 64, TINY_LABELS)
