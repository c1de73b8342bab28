"""Drill-down rules (docs/design.md §4.2) against the exact engine's map.

The oracle is the exact engine itself: every queried cell must equal the exact map's cell, a full
budget must give the exact map, and the queries are counted at the engine (a wrapper around its
``stream``), not read back from the rule's own bookkeeping.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import nn

import kfx
import kfx.approx
from kfx import cli
from kfx.drilldown import _Hierarchy
from kfx.models import load_model, read_pixels
from tests import cli_helpers
from tests.cli_helpers import SIZE, TINY, assert_one_line_error
from tests.cli_helpers import run as cli_run
from tests.test_approx import image_for, small_model

SHAPE = (3, 32, 32)
PATCH = kfx.Patch(4, stride=1)  # a 29 x 29 map: 841 cells


@pytest.fixture(scope="module")
def engine():
    return kfx.compile(small_model(), SHAPE, PATCH)


@pytest.fixture(scope="module")
def image():
    return image_for(6, SHAPE)


@pytest.fixture(scope="module")
def exact(engine, image):
    return engine(image)


def counting(engine):
    """The engine with its ``stream`` wrapped: records the cells of every run (None = all)."""
    runs = []
    original = engine.stream

    def stream(image, target=None, *, cells=None, batch_size=None, drill_down=None):
        if drill_down is None:
            runs.append(None if cells is None else cells.clone())
        return original(image, target, cells=cells, batch_size=batch_size, drill_down=drill_down)

    engine.stream = stream
    return runs


def cells_queried(runs, grid) -> torch.Tensor:
    """How often each cell was queried, over all recorded runs."""
    counts = torch.zeros(grid, dtype=torch.int64)
    for cells in runs:
        counts += torch.ones(grid, dtype=torch.int64) if cells is None else cells.long()
    return counts


@pytest.fixture
def counted(engine):
    runs = counting(engine)
    yield runs
    del engine.stream  # back to the class's method


def test_the_default_is_the_adaptive_rule_at_three_times_fewer_queries():
    drill = kfx.DrillDown()
    assert (drill.rule, drill.target_speedup, drill.queries, drill.target_ssim) == (
        "adaptive",
        3.0,
        None,
        None,
    )
    assert kfx.DrillDown(0.25, target_speedup=3).rule == "lowest"  # the earlier arguments keep their rule
    assert kfx.DrillDown(0.25, stage1_stride=8).rule == "lowest"
    assert kfx.approx.DrillDown is kfx.DrillDown


@pytest.mark.parametrize(
    "drill", [kfx.DrillDown(queries=841), kfx.DrillDown(queries=10_000), kfx.DrillDown(target_speedup=1)]
)
def test_a_full_budget_is_the_exact_map(engine, image, exact, counted, drill):
    full = engine(image, drill_down=drill)
    assert torch.equal(full.values, exact.values)
    assert full.measured.all()
    assert torch.equal(
        cells_queried(counted, exact.values.shape), torch.ones(exact.values.shape, dtype=torch.int64)
    )


@pytest.mark.parametrize(
    "drill",
    [
        kfx.DrillDown(target_speedup=3),
        kfx.DrillDown(target_speedup=6),
        kfx.DrillDown(queries=200),
        kfx.DrillDown(queries=30),
        kfx.DrillDown(rule="lowest", fraction=0.25, target_speedup=3),
        kfx.DrillDown(rule="paper", fraction=0.2, target_speedup=3),
    ],
    ids=lambda d: f"{d.rule}-{d.queries or d.target_speedup}",
)
def test_queried_cells_are_exact_and_the_budget_holds(engine, image, exact, counted, drill):
    approx = engine(image, drill_down=drill)
    assert approx.global_context == engine.global_context
    grid = exact.values.shape
    counts = cells_queried(counted, grid)
    assert counts.max() == 1  # no cell is asked twice
    assert torch.equal(counts.bool(), approx.measured)  # measured marks exactly the queried cells
    measured = approx.measured
    assert torch.allclose(approx.values[measured], exact.values[measured], rtol=0, atol=1e-12)
    assert not torch.isnan(approx.values).any()
    cells = grid[0] * grid[1]
    if drill.rule == "adaptive":
        budget = drill.queries if drill.queries is not None else math.ceil(cells / drill.target_speedup)
        assert int(counts.sum()) <= budget
        assert int(counts.sum()) >= 0.9 * budget  # a map with real structure spends its budget
    else:
        expected = drill.query_speedup(engine.patch.stride)
        assert cells / int(counts.sum()) == pytest.approx(expected, rel=0.1)
    if counts.sum() >= cells / 6:
        assert kfx.heatmap_ssim(exact, approx) > 0.5


def test_more_queries_give_a_closer_map(engine, image, exact):
    scores = [
        kfx.heatmap_ssim(exact, engine(image, drill_down=kfx.DrillDown(target_speedup=t)))
        for t in (8, 3, 1.5)
    ]
    assert scores[0] < scores[2] and scores[1] < scores[2] <= 1.0


def test_the_adaptive_rule_beats_the_paper_rule_on_the_same_budget(engine, image, exact):
    paper = engine(image, drill_down=kfx.DrillDown(rule="paper", fraction=0.25, target_speedup=3))
    adaptive = engine(image, drill_down=kfx.DrillDown(queries=int(paper.measured.sum())))
    assert adaptive.measured.sum() <= paper.measured.sum()
    assert kfx.heatmap_ssim(exact, adaptive) > kfx.heatmap_ssim(exact, paper)


def test_paper_rule_paints_stage_one_blocks(engine, image, exact):
    drill = kfx.DrillDown(rule="paper", fraction=0.2, stage1_stride=5)
    approx = engine(image, drill_down=drill)
    samples = kfx.approx.stage1_cells(29, 5.0)
    nearest = [min(samples, key=lambda s: (abs(s - i), s)) for i in range(29)]
    for i, j in (~approx.measured).nonzero().tolist():
        assert approx.values[i, j] == exact.values[nearest[i], nearest[j]]


def test_streaming_shows_each_level_and_ends_on_the_final_map(engine, image, counted):
    drill = kfx.DrillDown(target_speedup=2)
    steps = list(engine.stream(image, drill_down=drill, batch_size=16))
    levels = len(counted)
    final = engine(image, drill_down=drill, batch_size=16)
    assert levels >= 3  # coarse to fine over several levels
    assert torch.equal(steps[-1].heatmap.values, final.values)
    assert torch.equal(steps[-1].heatmap.measured, final.measured)
    done = [step.done for step in steps]
    assert done == sorted(done) and steps[-1].done == steps[-1].total == int(final.measured.sum())
    assert all(step.done <= step.total for step in steps)
    # The first level shows its samples and NaN elsewhere; from then on every step is a whole map
    # whose measured cells only grow.
    assert torch.isnan(steps[0].heatmap.values).any()
    whole = [step for step in steps if not torch.isnan(step.heatmap.values).any()]
    assert whole and whole[-1] is steps[-1]
    for before, after in zip(whole, whole[1:]):
        assert torch.equal(before.heatmap.measured & after.heatmap.measured, before.heatmap.measured)
    # Each level ends with a refreshed interpolation: a step with the same queries, new values.
    refreshed = [
        a
        for a, b in zip(steps, steps[1:])
        if b.done == a.done and not torch.equal(a.heatmap.values, b.heatmap.values)
    ]
    assert len(refreshed) >= levels - 1


def test_target_ssim_meets_its_target_on_a_small_model(engine, image, exact):
    for target in (0.8, 0.9, 0.95):
        approx = engine(image, drill_down=kfx.DrillDown(target_ssim=target))
        assert kfx.heatmap_ssim(exact, approx) >= target
        assert approx.measured.sum() < approx.measured.numel()  # without asking for every cell


def test_target_ssim_says_when_its_budget_runs_out_first(engine, image, exact):
    with pytest.warns(RuntimeWarning, match="target_ssim 0.99"):
        approx = engine(image, drill_down=kfx.DrillDown(target_ssim=0.99, queries=60))
    assert int(approx.measured.sum()) <= 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine(image, drill_down=kfx.DrillDown(target_ssim=0.5, queries=400))


def test_hierarchical_fill_through_a_full_grid_is_bilinear():
    """On a tensor grid of queried cells the fill must be plain bilinear interpolation (scipy)."""
    grid = (19, 23)
    hierarchy = _Hierarchy(grid, 4.0)
    rows = np.flatnonzero(hierarchy.rows.level <= 1)
    cols = np.flatnonzero(hierarchy.cols.level <= 1)
    queried = np.zeros(grid, dtype=bool)
    queried[np.ix_(rows, cols)] = True
    values = np.random.default_rng(0).random(grid)
    estimate, _ = hierarchy.interpolate(values, queried)
    bilinear = RegularGridInterpolator((rows, cols), values[np.ix_(rows, cols)])
    points = np.stack(np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij"), -1)
    assert np.allclose(estimate, bilinear(points.reshape(-1, 2)).reshape(grid), rtol=0, atol=1e-12)


def test_adaptive_rule_on_thin_maps_and_a_budget_below_the_corners():
    model = small_model()
    engine = kfx.compile(model, (3, 8, 32), kfx.Patch(4, stride=1))  # a 5 x 29 map
    image = image_for(3, (3, 8, 32))
    exact = engine(image)
    approx = engine(image, drill_down=kfx.DrillDown(target_speedup=2))
    measured = approx.measured
    assert not torch.isnan(approx.values).any()
    assert torch.allclose(approx.values[measured], exact.values[measured], rtol=0, atol=1e-12)
    assert int(measured.sum()) <= math.ceil(measured.numel() / 2)
    tiny = kfx.compile(model, (3, 8, 8), kfx.Patch(4, stride=4))  # 2 x 2: four corners, budget 2
    with pytest.raises(kfx.InputError, match="corners"):
        tiny(image_for(3, (3, 8, 8)), drill_down=kfx.DrillDown(target_speedup=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rule="blocks"), "rule must be one of"),
        (dict(queries=0), "positive whole number"),
        (dict(queries=-3), "positive whole number"),
        (dict(queries=2.5), "positive whole number"),
        (dict(queries=True), "positive whole number"),
        (dict(target_speedup=0.5), "at least 1"),
        (dict(target_speedup=float("nan")), "finite number"),
        (dict(target_speedup="3"), "finite number"),
        (dict(target_ssim=0), r"\(0, 1\]"),
        (dict(target_ssim=1.5), r"\(0, 1\]"),
        (dict(queries=100, target_speedup=3), "not both"),
        (dict(rule="adaptive", fraction=0.25), "two-stage rules"),
        (dict(rule="adaptive", stage1_stride=8), "two-stage rules"),
        (dict(rule="lowest", queries=100), "budgets of the adaptive rule"),
        (dict(rule="paper", target_ssim=0.9), "budgets of the adaptive rule"),
        (dict(rule="paper", fraction=0.5, target_speedup=3), "1/fraction"),
    ],
)
def test_bad_drill_down_arguments_are_input_errors(kwargs, message):
    with pytest.raises(kfx.InputError, match=message):
        kfx.DrillDown(**kwargs)


def test_adaptive_rule_has_no_stage_one_stride():
    with pytest.raises(kfx.InputError, match="no single stage-1 stride"):
        kfx.DrillDown().stage1_strides((4, 4))


# -- kfx explain --drill-down ------------------------------------------------------------------------

image_file, in_tmp_path = cli_helpers.image_file, cli_helpers.in_tmp_path  # fixtures (outputs in tmp)


@pytest.mark.parametrize(
    "spec, drill, details",
    [
        ("3", kfx.DrillDown(target_speedup=3), {"rule": "adaptive", "target_speedup": 3.0}),
        ("queries=100", kfx.DrillDown(queries=100), {"rule": "adaptive", "queries": 100}),
        (
            "rule=paper,fraction=0.2,speedup=3",
            kfx.DrillDown(rule="paper", fraction=0.2, target_speedup=3),
            {"rule": "paper", "fraction": 0.2, "target_speedup": 3.0},
        ),
    ],
)
def test_explain_drill_down_gives_the_engines_map(capsys, image_file, spec, drill, details):
    options = ["--patch", "4", "--stride", "1", "--drill-down", spec, "--json", "-"]
    code, out, err = cli_run(capsys, "explain", image_file, "--model", TINY, *SIZE, *options)
    assert code == cli.EXIT_OK, err
    document = json.loads(out)
    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(image_file)), 32)
    expected = kfx.compile(loaded.model, tuple(image.shape), kfx.Patch(4, stride=1))(image, drill_down=drill)
    assert torch.equal(torch.tensor(document["map"], dtype=torch.float32), expected.values)
    assert document["drill_down"] == details
    assert document["timings"]["positions"] == int(expected.measured.sum()) < expected.values.numel()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0.5", "FRACTION:SPEEDUP"),
        ("depth=3", "unknown drill-down setting 'depth'"),
        ("queries=-2", "argument --drill-down"),
        ("ssim=2", "target_ssim must be in (0, 1]"),
        ("fraction=0.25,queries=100", "budgets of the adaptive rule"),
    ],
)
def test_explain_bad_drill_down_is_a_one_line_usage_error(capsys, image_file, spec, message):
    code, out, err = cli_run(capsys, "explain", image_file, "--model", TINY, *SIZE, "--drill-down", spec)
    assert code == cli.EXIT_USAGE
    assert_one_line_error(err, message)


class SqrtNet(nn.Module):
    """NaN wherever the patch's negative fill reaches the square root: every position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x.sqrt()).mean((2, 3)))


def test_a_model_that_fails_on_occluded_inputs_gives_nan_not_numbers():
    torch.manual_seed(0)
    model = SqrtNet().double().eval()
    patch = kfx.Patch(4, stride=1, fill=-1.0)
    engine = kfx.compile(model, (3, 16, 16), patch)
    image = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    approx = engine(image, drill_down=kfx.DrillDown(target_speedup=2))
    assert torch.isnan(approx.values).all()  # the caller sees the failure (kfx explain raises on NaN)
