"""kfx.NaiveEngine / kfx.naive_heatmap: full inference through the engine's own run-time loop.

The oracle is the model itself on images painted by the tests (tests.strategies.painted), one
position at a time; the exact engine must agree with the naive one cell for cell.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfx
from tests.strategies import painted

SHAPE = (2, 10, 10)
PATCH = kfx.Patch(4, stride=3, fill=(0.5, -0.5))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
        )
        .double()
        .eval()
    )


@pytest.fixture(scope="module")
def image():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def brute_force(model, image, patch, target):
    positions = kfx.grid_positions(SHAPE[1:], patch)
    with torch.no_grad():
        probs = torch.softmax(model(painted(image, positions, patch)), dim=1)[:, target]
    return probs.view(patch.grid_shape(SHAPE[1:]))


def test_the_naive_map_is_full_inference_position_by_position(model, image):
    naive = kfx.NaiveEngine(model, SHAPE, PATCH, batch_size=4)
    heatmap = naive(image, target=1)
    torch.testing.assert_close(heatmap.values, brute_force(model, image, PATCH, 1), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        base = torch.softmax(model(image[None]), dim=1)[0, 1]
    assert heatmap.base == pytest.approx(float(base), rel=1e-12)
    torch.testing.assert_close(
        kfx.naive_heatmap(model, image, PATCH, 1).values, heatmap.values, rtol=0, atol=0
    )


def test_naive_and_exact_engines_agree_on_maps_streams_and_selections(model, image):
    naive = kfx.NaiveEngine(model, SHAPE, PATCH, batch_size=5)
    exact = kfx.compile(model, SHAPE, PATCH, batch_size=5)
    torch.testing.assert_close(exact(image).values, naive(image).values, rtol=1e-12, atol=1e-12)
    cells = torch.zeros(3, 3, dtype=torch.bool)
    cells[1:, :2] = True
    steps = list(naive.stream(image, cells=cells))
    assert [s.done for s in steps] == [4] and steps[-1].total == 4
    assert torch.equal(steps[-1].heatmap.evaluated, cells)
    torch.testing.assert_close(
        steps[-1].heatmap.values[cells], exact(image).values[cells], rtol=1e-12, atol=1e-12
    )
    positions = torch.tensor([[0, 0], [6, 1], [2, 5]])
    torch.testing.assert_close(
        naive.outputs(image, positions), exact.outputs(image, positions), rtol=1e-12, atol=1e-12
    )


def test_naive_drill_down_runs_the_same_strategy(model, image):
    drill = kfx.DrillDown(fraction=0.3, stage1_stride=6)
    naive = kfx.NaiveEngine(model, SHAPE, kfx.Patch(4, stride=1))
    exact = kfx.compile(model, SHAPE, kfx.Patch(4, stride=1))
    a, b = naive(image, drill_down=drill), exact(image, drill_down=drill)
    assert torch.equal(a.measured, b.measured)
    torch.testing.assert_close(a.values, b.values, rtol=1e-9, atol=1e-12)


def test_naive_engine_checks_its_input(model, image):
    naive = kfx.NaiveEngine(model, SHAPE, PATCH)
    with pytest.raises(kfx.InputError, match="compiled for"):
        naive(torch.zeros(2, 9, 9, dtype=torch.float64))
    with pytest.raises(kfx.InputError, match="batch_size"):
        naive(image, batch_size=0)
    with pytest.raises(kfx.ModelError, match="eval"):
        kfx.NaiveEngine(nn.Linear(2, 2), SHAPE, PATCH)
    with pytest.raises(kfx.PatchError, match="larger than the image"):
        kfx.NaiveEngine(model, SHAPE, kfx.Patch(11))


def test_a_suspended_naive_stream_leaves_grad_mode_alone(model, image):
    """A stream stopped midway (the explorer's Stop) must not leave the thread in no_grad."""
    naive = kfx.NaiveEngine(model, SHAPE, PATCH, batch_size=2)
    stream = naive.stream(image)
    next(stream)
    assert torch.is_grad_enabled()
    stream.close()
    assert torch.is_grad_enabled()
