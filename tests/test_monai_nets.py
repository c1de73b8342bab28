"""MONAI's classification networks in 3-D and 1-D: kfx compiles them and is exact against brute force.

Real architectures from ``monai.networks.nets`` (random weights, nothing downloads), float64, on
small inputs so the suite stays fast: the engine's outputs at corner, edge and inner positions
equal the model's own outputs on the tests' occluded inputs (slice assignment, not kfx.occlude),
and the engine is incremental (its first layers are local, not dense). MONAI is in the
``medical`` extra and in ``dev``.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

import kfx

# name -> (factory, input shape). Sizes are the smallest each network's downsampling allows.
NETWORKS = {
    "densenet121-3d": (
        lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
        (1, 32, 32, 32),
    ),
    "resnet10-3d": (
        lambda: nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=2),
        (1, 24, 24, 24),
    ),
    "resnet18-3d": (
        lambda: nets.resnet18(spatial_dims=3, n_input_channels=2, num_classes=3),
        (2, 20, 24, 16),
    ),
    "seresnet50-3d": (lambda: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2), (1, 32, 32, 32)),
    "efficientnet-b0-3d": (
        lambda: nets.EfficientNetBN(
            "efficientnet-b0", spatial_dims=3, in_channels=1, num_classes=2, pretrained=False
        ),
        (1, 32, 32, 32),
    ),
    "resnet18-1d": (lambda: nets.resnet18(spatial_dims=1, n_input_channels=12, num_classes=5), (12, 500)),
    "densenet121-1d": (lambda: nets.DenseNet121(spatial_dims=1, in_channels=2, out_channels=2), (2, 256)),
    "seresnet50-1d": (lambda: nets.SEResNet50(spatial_dims=1, in_channels=1, num_classes=2), (1, 256)),
}


def occluded(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    out = x.expand(len(corners), *x.shape).clone()
    for i, corner in enumerate(corners.tolist()):
        out[(i, slice(None), *(slice(c, c + size) for c in corner))] = 0.0
    return out


# The three largest 3-D networks take about a minute each on a loaded 2-core machine: marked slow
# (run them with `python -m pytest -m slow tests/test_monai_nets.py`); CI runs the rest.
SLOW = {"densenet121-3d", "seresnet50-3d", "efficientnet-b0-3d"}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in NETWORKS]
)
def test_monai_network_is_exact_and_incremental(name):
    factory, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    axes = len(shape) - 1
    size = 8 if axes == 3 else 32
    engine = kfx.compile(model, shape, kfx.Patch(size, stride=size))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spatial = torch.tensor(shape[1:])
    corners = torch.stack(
        [torch.zeros(axes, dtype=torch.long), spatial - size, (spatial - size) // 2, torch.tensor([3] * axes)]
    )
    with torch.no_grad():
        expected = model(occluded(x, corners, size))
    actual = engine.outputs(x, corners)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-9
    stem = next(n for n in engine.graph_module.graph.nodes if n.op == "call_module")
    assert engine.roles()[stem.name] == "local"
    if "seresnet" in name:  # squeeze-excitation: exact mode runs densely after the first gate, and says so
        assert "squeeze-excitation" in engine.dense_nodes[0].reason
    else:
        assert engine.cost().theoretical_speedup > 1.05
