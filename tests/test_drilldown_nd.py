"""Drill-down on 1-D signals and 3-D volumes (docs/design.md §4.2): every rule, every budget.

Oracles: the exact engine's map (no drill-down) for every queried cell, queries counted at the
engine (tests/test_drilldown.py's wrapper around ``stream``), scipy's RegularGridInterpolator for the
multilinear fill, a hand-written nearest-sample loop for the paper's blocks, and scikit-image's N-d
SSIM of drawn maps for the SSIM estimate. target_ssim itself is refused on these maps (its estimate's
calibration is the images'), and the tests hold it to that.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from skimage.metrics import structural_similarity
from torch import nn

import kfx
from kfx._drilldown_adaptive import estimated_ssim
from kfx.drilldown import _Hierarchy
from tests.test_drilldown import cells_queried, counting
from tests.test_nd import CONV, GLOBAL_POOL, seeded

# 1-D: 64 samples, a 61-cell map; 3-D: a 12^3 volume, a 10^3-cell map.
SHAPES = {1: (2, 64), 3: (2, 12, 12, 12)}
PATCHES = {1: kfx.Patch(4, stride=1), 3: kfx.Patch(3, stride=1)}

DRILLS = [
    kfx.DrillDown(target_speedup=3),
    kfx.DrillDown(queries=20),
    kfx.DrillDown(rule="lowest", fraction=0.25, target_speedup=3),
    kfx.DrillDown(rule="paper", fraction=0.2, target_speedup=3),
    kfx.DrillDown(rule="paper", fraction=0.2, stage1_stride=3),
]


def drill_id(drill: kfx.DrillDown) -> str:
    budget = drill.queries or drill.target_ssim or drill.target_speedup or drill.stage1_stride[0]
    return f"{drill.rule}-{budget}"


def small_cnn(axes: int) -> nn.Module:
    conv = CONV[axes]
    return seeded(
        nn.Sequential(
            conv(2, 4, 3, padding=1),
            nn.ReLU(),
            conv(4, 4, 3, stride=2),
            nn.ReLU(),
            GLOBAL_POOL[axes](1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        11,
    )


class Setup:
    """An engine, an input and its exact map (no drill-down) for one rank."""

    def __init__(self, axes: int):
        self.model = small_cnn(axes)
        self.engine = kfx.compile(self.model, SHAPES[axes], PATCHES[axes])
        generator = torch.Generator().manual_seed(12)
        self.image = torch.randn(SHAPES[axes], generator=generator, dtype=torch.float64)
        self.exact = kfx.compile(self.model, SHAPES[axes], PATCHES[axes])(self.image)


@pytest.fixture(scope="module", params=[1, 3], ids=["1d", "3d"])
def setup(request):
    return Setup(request.param)


@pytest.fixture
def counted(setup):
    runs = counting(setup.engine)
    yield runs
    del setup.engine.stream  # back to the class's method


def test_the_exact_map_is_brute_force(setup):
    """The oracle itself: the engine's exact map is the model on the occluded inputs."""
    size = setup.engine.patch.size
    corners = kfx.patch.grid_positions(tuple(setup.image.shape[1:]), setup.engine.patch)
    occluded = setup.image.expand(len(corners), *setup.image.shape).clone()
    for i, corner in enumerate(corners.tolist()):
        occluded[(i, slice(None), *(slice(c, c + s) for c, s in zip(corner, size)))] = 0.0
    brute = torch.softmax(setup.model(occluded), 1)[:, setup.exact.target]
    assert torch.allclose(setup.exact.values.reshape(-1), brute, rtol=0, atol=1e-12)


@pytest.mark.parametrize("drill", DRILLS, ids=drill_id)
def test_queried_cells_are_exact_and_the_rest_is_filled(setup, counted, drill):
    approx = setup.engine(setup.image, drill_down=drill)
    grid = setup.exact.values.shape
    assert approx.values.shape == approx.measured.shape == grid  # one axis per spatial axis
    counts = cells_queried(counted, grid)
    assert counts.max() == 1  # no cell is asked twice
    assert torch.equal(counts.bool(), approx.measured)  # measured marks exactly the queried cells
    assert 0 < int(counts.sum()) < counts.numel()
    measured = approx.measured
    assert torch.allclose(approx.values[measured], setup.exact.values[measured], rtol=0, atol=1e-12)
    assert not torch.isnan(approx.values).any()
    if drill.rule == "adaptive" and counts.sum() >= counts.numel() / 6:
        assert kfx.heatmap_ssim(setup.exact, approx) > 0.5


@pytest.mark.parametrize("drill", [kfx.DrillDown(target_speedup=3), kfx.DrillDown(queries=40)], ids=drill_id)
def test_the_adaptive_budget_holds(setup, counted, drill):
    approx = setup.engine(setup.image, drill_down=drill)
    cells = approx.values.numel()
    budget = drill.queries if drill.queries is not None else math.ceil(cells / drill.target_speedup)
    queries = int(cells_queried(counted, approx.values.shape).sum())
    assert 0.9 * budget <= queries <= budget  # a map with real structure spends its budget


@pytest.mark.parametrize("rule, fraction", [("lowest", 0.25), ("paper", 0.2)])
def test_the_two_stage_budget_holds(setup, counted, rule, fraction):
    """Stage 1 is a tensor grid S1 / S2 cells apart per axis, S1 = S2 (t / (1 - r t))^(1/d) ([TR]
    Eq. 29 with d axes instead of two), stage 2 the fraction r of the cells."""
    drill = kfx.DrillDown(rule=rule, fraction=fraction, target_speedup=3)
    approx = setup.engine(setup.image, drill_down=drill)
    grid = approx.values.shape
    axes = len(grid)
    ratio = (3 / (1 - fraction * 3)) ** (1 / axes)  # S1 / S2, by hand
    strides = drill.stage1_strides(setup.engine.patch.stride)
    assert strides == pytest.approx([s * ratio for s in setup.engine.patch.stride], rel=1e-12)
    stage1 = math.prod(len(kfx.approx.stage1_cells(n, ratio)) for n in grid)
    drilled = round(fraction * math.prod(grid))
    queries = int(cells_queried(counted, grid).sum())
    assert max(stage1, drilled) <= queries <= stage1 + drilled
    # [TR] Eq. 28 with products over the axes: cells / (cells / ratio^d + r * cells)
    assert drill.query_speedup(setup.engine.patch.stride) == pytest.approx(1 / (ratio**-axes + fraction))


def test_the_lowest_rule_fills_multilinearly_from_stage_one(setup):
    drill = kfx.DrillDown(rule="lowest", fraction=0.25, target_speedup=3)
    approx = setup.engine(setup.image, drill_down=drill)
    grid = approx.values.shape
    ratio = drill.stage1_strides(setup.engine.patch.stride)[0] / setup.engine.patch.stride[0]
    samples = [kfx.approx.stage1_cells(n, ratio) for n in grid]
    exact = setup.exact.values.numpy()
    multilinear = RegularGridInterpolator(samples, exact[np.ix_(*samples)])
    points = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, len(grid))
    expected = torch.from_numpy(multilinear(points).reshape(grid))
    unmeasured = ~approx.measured
    assert unmeasured.any()
    assert torch.allclose(approx.values[unmeasured], expected[unmeasured], rtol=0, atol=1e-12)


def test_the_paper_rule_paints_stage_one_blocks(setup):
    drill = kfx.DrillDown(rule="paper", fraction=0.2, stage1_stride=3)
    approx = setup.engine(setup.image, drill_down=drill)
    grid = approx.values.shape
    nearest = []
    for n in grid:
        samples = kfx.approx.stage1_cells(n, 3.0)
        nearest.append([min(samples, key=lambda s: (abs(s - i), s)) for i in range(n)])
    cells = (~approx.measured).nonzero().tolist()
    assert cells
    for cell in cells:
        source = tuple(nearest[a][i] for a, i in enumerate(cell))
        assert approx.values[tuple(cell)] == setup.exact.values[source]


@pytest.mark.parametrize("grid", [(61,), (13, 17, 21)])
@pytest.mark.parametrize("depth", [1, 2])
def test_hierarchical_fill_through_a_tensor_grid_is_multilinear(grid, depth):
    """Queried on a tensor sub-grid (levels <= depth on every axis), the fill is scipy's linear /
    trilinear interpolation; it equals the values wherever queried, and a multilinear map is
    reproduced everywhere."""
    hierarchy = _Hierarchy(grid, 8.0)
    nodes = [np.flatnonzero(axis.level <= depth) for axis in hierarchy.axes]
    assert all(len(n) < size for n, size in zip(nodes, grid))  # cells left to fill on every axis
    queried = np.zeros(grid, dtype=bool)
    queried[np.ix_(*nodes)] = True
    values = np.random.default_rng(0).random(grid)
    estimate, _ = hierarchy.interpolate(values, queried)
    linear = RegularGridInterpolator(nodes, values[np.ix_(*nodes)])
    points = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1)
    assert np.allclose(estimate, linear(points.reshape(-1, len(grid))).reshape(grid), rtol=0, atol=1e-12)
    assert np.allclose(estimate[queried], values[queried], rtol=0, atol=1e-12)

    multilinear = math.prod(1.0 + 0.3 * a * points[..., a] for a in range(len(grid)))
    estimate, surplus = hierarchy.interpolate(multilinear, queried)
    assert np.allclose(estimate, multilinear, rtol=0, atol=1e-9)
    assert np.allclose(surplus[~hierarchy.base], 0.0, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "drill", [kfx.DrillDown(target_speedup=2), kfx.DrillDown(rule="lowest", fraction=0.25)], ids=drill_id
)
def test_streaming_shows_more_measured_cells_and_ends_on_the_final_map(setup, counted, drill):
    steps = list(setup.engine.stream(setup.image, drill_down=drill, batch_size=8))
    runs = len(counted)
    final = setup.engine(setup.image, drill_down=drill, batch_size=8)
    assert runs >= 2  # coarse to fine: more than one run of queries
    assert torch.equal(steps[-1].heatmap.values, final.values)
    assert torch.equal(steps[-1].heatmap.measured, final.measured)
    done = [step.done for step in steps]
    assert done == sorted(done) and steps[-1].done == steps[-1].total == int(final.measured.sum())
    measured = [int(step.heatmap.measured.sum()) for step in steps]
    assert measured == sorted(measured) and measured[0] < measured[-1]
    for before, after in itertools.pairwise(steps):
        assert torch.equal(before.heatmap.measured & after.heatmap.measured, before.heatmap.measured)
    assert steps[-1].heatmap.values.shape == setup.exact.values.shape


def test_target_ssim_is_refused_before_any_query(setup, counted):
    """Its SSIM estimate is calibrated on images; on these maps it stopped short of its targets
    (kfx.heatmap_ssim 0.71 for a target of 0.8 on this 10^3 map), so signals and volumes get an error instead."""
    for drill in (kfx.DrillDown(target_ssim=0.9), kfx.DrillDown(target_ssim=0.8, queries=100)):
        with pytest.raises(
            kfx.InputError, match="target_ssim needs a 2-d map.*queries=N or target_speedup=T"
        ):
            setup.engine(setup.image, drill_down=drill)
    assert counted == []


@pytest.mark.parametrize(
    "grid, scale", [((400,), 0.005), ((400,), 0.01), ((16, 16, 16), 0.05), ((12, 9, 14), 0.05)]
)
def test_the_ssim_estimate_is_scikit_images_ssim_in_every_rank(grid, scale):
    """The estimate of the SSIM against an exact map that differs by independent errors of a known
    size, against scikit-image's N-d SSIM of such maps (mean of 40 draws): same window, same crop."""
    points = np.meshgrid(*(np.linspace(0, 6, n) for n in grid), indexing="ij")
    estimate = 0.5 + 0.2 * math.prod(np.sin(p + a) for a, p in enumerate(points))  # a probability map
    error = scale * (points[-1] / 6) ** 4  # noisiest at the far end of the last axis: the crop matters
    rng = np.random.default_rng(0)
    data_range = float(estimate.max() - estimate.min())
    draws = [
        structural_similarity(estimate + error * rng.standard_normal(grid), estimate, data_range=data_range)
        for _ in range(40)
    ]
    assert 1 - estimated_ssim(estimate, error) == pytest.approx(1 - np.mean(draws), rel=0.1)


def test_a_full_budget_is_the_exact_map(setup, counted):
    full = setup.engine(setup.image, drill_down=kfx.DrillDown(target_speedup=1))
    assert torch.equal(full.values, setup.exact.values)
    assert full.measured.all()
    assert int(cells_queried(counted, full.values.shape).sum()) == full.values.numel()


def test_volumes_need_their_corners_and_one_stage1_stride_per_axis():
    setup = Setup(3)
    with pytest.raises(kfx.InputError, match="corners of this 10 x 10 x 10 map"):
        setup.engine(setup.image, drill_down=kfx.DrillDown(queries=7))
    with pytest.raises(kfx.InputError, match="one number"):
        setup.engine(setup.image, drill_down=kfx.DrillDown(0.2, stage1_stride=(3, 4)))
