"""The static cost model (DESIGN 2.4) against the paper's numbers and a hand count."""

import pytest
import torch
import torchvision

import kfx
from kfx.geometry import conv_fmas


@pytest.mark.parametrize("name, expected", [("vgg16", 6.5), ("resnet18", 2.2)])
def test_paper_ceilings_at_patch_16(name, expected):
    model = torchvision.models.get_model(name, weights=None).eval()
    cost = kfx.compile(model, (3, 224, 224), kfx.Patch(16, stride=4)).cost()
    assert cost.theoretical_speedup == pytest.approx(expected, abs=0.05)


def test_vgg16_full_fmas_match_the_paper():
    model = torchvision.models.vgg16(weights=None).eval()
    cost = kfx.compile(model, (3, 224, 224), kfx.Patch(16)).cost()
    conv = sum(layer.full for layer in cost.layers if layer.op == "Conv2d")
    assert conv / 1e9 == pytest.approx(15.35, abs=0.01)  # [TR]: VGG16 conv FMAs 15.35 G
    first = cost.layers[0]
    assert (first.full, first.box) == (conv_fmas(3, 64, 1, 3, 3, 224, 224), (18, 18))
    assert first.incremental == conv_fmas(3, 64, 1, 3, 3, 18, 18)


def test_layers_after_the_projection_count_fully_in_both():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Unflatten(1, (4, 8, 8)),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 3),
    ).eval()
    cost = kfx.compile(model, (3, 8, 8), kfx.Patch(2)).cost()
    first, second, linear = cost.layers
    assert first.box == (4, 4) and first.incremental == conv_fmas(3, 4, 1, 3, 3, 4, 4)
    assert second.box is None and second.incremental == second.full == conv_fmas(4, 4, 1, 3, 3, 8, 8)
    assert linear.full == linear.incremental == 256 * 3
    expected = (first.full + second.full + linear.full) / (first.incremental + second.full + linear.full)
    assert cost.theoretical_speedup == pytest.approx(expected)
