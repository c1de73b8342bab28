"""The adaptive drill-down rule (kfx.DrillDown(rule="adaptive"), the default): levels of cells on a
hierarchy of grids, each level the cells where the interpolation is expected to be most wrong.

kfx/drilldown.py holds :class:`kfx.DrillDown`, the dispatch and the two-stage rules; this module
imports nothing from it (a drill-down is passed in and only its attributes are read).
"""

from __future__ import annotations

import bisect
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from kfx.errors import InputError
from kfx.results import Heatmap, Progress

# The adaptive rule's knobs, set by hand on EfficientNet-Lite0 maps of DRILL_TUNING_PHOTOS in
# benchmarks/approx_quality.py, photos disjoint from the ones it reports on.
COARSE_SHARE = 0.7  # share of the query budget spent on the first, uniform level
COARSE_SPACING = 4.0  # spacing of that level (cells) when no budget bounds it (target_ssim alone)
DISAGREEMENT_WEIGHT = 0.25  # expected error per unit of spread between the cells interpolated from
SURPLUS_WEIGHT = 0.5  # expected error per unit of the error one level up
LOW_VALUE_WEIGHT = 1.0  # the lowest cell counts (1 + this) times as much as the highest
NEGLIGIBLE_ERROR = 1e-3  # of the map's range: refining further cannot change the picture
ROUND_SHARE = 0.5  # each level spends at most this share of what is left of the budget
TARGET_ROUND_SHARE = 1 / 24  # target_ssim: cells per level, so that it stops close to the target
MIN_ROUND = 32  # queries per level at least (while the budget lasts): batches stay efficient
# target_ssim: refine until the estimate's shortfall from 1 is this many times smaller than the
# target's (the estimate is optimistic: it assumes independent errors of the calibrated size).
SSIM_SAFETY = 2.0


def _with_measured(heatmap: Heatmap) -> Heatmap:
    """The map with every evaluated cell marked as queried (no interpolation yet)."""
    return replace(heatmap, measured=heatmap.evaluated)


def _all_measured(steps: Iterator[Progress]) -> Iterator[Progress]:
    for step in steps:
        yield replace(step, heatmap=_with_measured(step.heatmap))


# -- cells along one axis (the two-stage rules' stage 1 and fill use them too) ----------------------


def stage1_cells(cells: int, spacing: float) -> list[int]:
    """Cell indices along one axis, evenly spread about ``spacing`` cells apart, first and last
    cell included (so the fill never has to extrapolate).

    The samples are cells of the target grid, not a separate S1 grid: every query is then also an
    exact cell of the final map, and the samples span the whole map.

    >>> stage1_cells(53, 13.86 / 4)
    [0, 3, 7, 10, 14, 17, 21, 24, 28, 31, 35, 38, 42, 45, 49, 52]
    """
    if cells == 1:
        return [0]
    count = min(cells, max(2, math.floor((cells - 1) / spacing + 0.5) + 1))
    return sorted({math.floor(i * (cells - 1) / (count - 1) + 0.5) for i in range(count)})


def _linear_interpolation(samples: list[int], cells: int) -> torch.Tensor:
    """Matrix [cells, len(samples)] that interpolates values at ``samples`` linearly to every cell."""
    weights = torch.zeros(cells, len(samples), dtype=torch.float64)
    if len(samples) == 1:
        weights[:, 0] = 1.0
        return weights
    for i in range(cells):
        j = min(bisect.bisect_right(samples, i) - 1, len(samples) - 2)
        lo, hi = samples[j], samples[j + 1]
        t = (i - lo) / (hi - lo)
        weights[i, j], weights[i, j + 1] = 1.0 - t, t
    return weights


def root(value: float, axes: int) -> float:
    """The ``axes``-th root of ``value``: the spacing along each axis of a grid that is ``value``
    times sparser than the full one. Taken as the square root to the power 2 / axes, so that two
    axes get exactly math.sqrt (x ** 1.0 is x)."""
    return math.sqrt(value) ** (2 / axes)


def along_axes(matrices, values):
    """``values`` (numpy or torch, one axis per matrix) with matrix k applied along axis k: the
    separable (tensor-product) map, ``m0 @ values @ m1.T`` for two axes.

    Axis 0 is a plain product and the others multiply from the right, so two axes run the very
    products ``m0 @ values @ m1.T`` (the maps of images stay bit for bit what they were)."""
    first = matrices[0] @ values.reshape(values.shape[0], -1)
    out = first.reshape(first.shape[0], *values.shape[1:])
    for axis, matrix in enumerate(matrices[1:], 1):
        out = (out.swapaxes(axis, -1) @ matrix.T).swapaxes(axis, -1)
    return out


# -- the adaptive rule -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """The coarse-to-fine hierarchy of one axis of the grid.

    Level 0 holds evenly spread cells (both ends included); level k + 1 the midpoint of every pair
    of neighbours at levels <= k that still have a cell between them. ``hats[i]`` is cell i's
    piecewise-linear basis function over the axis: 1 at i, 0 at every other cell of level <= its
    own (for level k > 0: 0 at its ``parents``, the two neighbours it splits).
    """

    level: np.ndarray  # [n] int
    parents: np.ndarray  # [n, 2] int (the cell itself for level 0)
    hats: np.ndarray  # [n, n] float64

    @classmethod
    def build(cls, cells: int, spacing: float) -> _Axis:
        level = np.zeros(cells, dtype=np.int64)
        parents = np.repeat(np.arange(cells)[:, None], 2, axis=1)
        hats = np.zeros((cells, cells))
        base = stage1_cells(cells, spacing)
        hats[base] = _linear_interpolation(base, cells).T.numpy()
        nodes, depth = base, 0
        while len(nodes) < cells:
            depth += 1
            splits = [((a + b) // 2, a, b) for a, b in zip(nodes, nodes[1:]) if b - a > 1]
            for middle, a, b in splits:
                level[middle], parents[middle] = depth, (a, b)
                hats[middle, a : middle + 1] = np.linspace(0.0, 1.0, middle - a + 1)
                hats[middle, middle : b + 1] = np.linspace(1.0, 0.0, b - middle + 1)
            nodes = sorted(nodes + [m for m, _, _ in splits])
        return cls(level, parents, hats)


class _Hierarchy:
    """Every axis's hierarchy and the interpolation through any set of queried cells.

    The interpolation is the hierarchical one of sparse grids: F = sum over queried cells of
    surplus x the product of the cell's hats along every axis, where a cell's surplus is its value
    minus what the coarser cells already interpolate there. A cell's hats vanish on every cell of
    its levels or coarser, so F equals the queried values at every queried cell, whatever the set.
    """

    def __init__(self, grid: tuple[int, ...], spacing: float):
        self.axes = [_Axis.build(cells, spacing) for cells in grid]
        self.depth = sum(_along(axis.level, a, len(grid)) for a, axis in enumerate(self.axes))
        self.base = self.depth == 0

    @property
    def rows(self) -> _Axis:
        """Axis 0 (a 2-D map's rows)."""
        return self.axes[0]

    @property
    def cols(self) -> _Axis:
        """Axis 1 (a 2-D map's columns)."""
        return self.axes[1]

    def interpolate(self, values: np.ndarray, queried: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F, surpluses) for ``values`` known where ``queried``; surpluses are 0 elsewhere."""
        surplus = np.zeros(values.shape)
        for depth in np.unique(self.depth[queried]):
            here = queried & (self.depth == depth)
            surplus[here] = values[here] - self._evaluate(surplus)[here]
        return self._evaluate(surplus), surplus

    def _evaluate(self, surplus: np.ndarray) -> np.ndarray:
        return along_axes([axis.hats.T for axis in self.axes], surplus)

    def parent_cells(self) -> list[tuple[tuple[np.ndarray, ...], np.ndarray]]:
        """Per parent slot: (index arrays, applies), each of the map's shape: the cells whose
        values the interpolation at each cell splits between (two along each axis that is not at
        level 0)."""
        index = np.meshgrid(*(np.arange(n) for n in self.depth.shape), indexing="ij")
        out = []
        for k in (0, 1):
            for a, axis in enumerate(self.axes):
                parent = (*index[:a], axis.parents[index[a], k], *index[a + 1 :])
                out.append((parent, axis.level[index[a]] > 0))
        return out


def _along(vector: np.ndarray, axis: int, axes: int) -> np.ndarray:
    """``vector`` shaped to broadcast along ``axis`` of a map with ``axes`` axes."""
    return vector.reshape([-1 if a == axis else 1 for a in range(axes)])


def _expected_error(
    hierarchy: _Hierarchy, estimate: np.ndarray, surplus: np.ndarray, queried: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(expected |error| of the interpolation at every cell, cells whose parents are all queried).

    Two signs that the interpolation between a cell's parents is wrong: the parents disagree (a
    steep or curved map between them), and the parents' own surpluses (how wrong the coarser
    interpolation was right there). Queried cells have no error.
    """
    spread_lo = np.full(estimate.shape, np.inf)
    spread_hi = np.full(estimate.shape, -np.inf)
    parent_surplus = np.zeros(estimate.shape)
    ready = np.ones(estimate.shape, dtype=bool)
    for parent, applies in hierarchy.parent_cells():
        values = np.where(applies, estimate[parent], np.nan)
        spread_lo = np.fmin(spread_lo, values)
        spread_hi = np.fmax(spread_hi, values)
        refined = applies & (hierarchy.depth[parent] > 0)  # a first-level cell's surplus is its value
        parent_surplus = np.maximum(parent_surplus, np.where(refined, np.abs(surplus[parent]), 0.0))
        ready &= ~applies | queried[parent]
    spread = np.nan_to_num(spread_hi - spread_lo, nan=0.0, posinf=0.0, neginf=0.0)
    error = np.maximum(DISAGREEMENT_WEIGHT * spread, SURPLUS_WEIGHT * parent_surplus)
    error[queried] = 0.0
    return error, ready & ~queried


def estimated_ssim(estimate: np.ndarray, error: np.ndarray) -> float:
    """SSIM the map ``estimate`` would score against an exact map that differs from it by
    independent errors of standard deviation ``error`` (kfx.heatmap_ssim's window and constants,
    with the estimate's range as data_range)."""
    from scipy.ndimage import uniform_filter

    side = min(estimate.shape)
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        return 1.0 if not error.any() else 0.0
    data_range = float(estimate.max() - estimate.min()) or 1.0
    c2 = (0.03 * data_range) ** 2
    mean = uniform_filter(estimate, window)
    variance = np.maximum(uniform_filter(estimate**2, window) - mean**2, 0.0)
    noise = uniform_filter(error**2, window)
    term = (2 * variance + c2) / (2 * variance + noise + c2)
    pad = (window - 1) // 2  # scikit-image averages over windows that lie inside the map
    return float(term[tuple(slice(pad, n - pad) for n in term.shape)].mean())


def _adaptive_stream(engine, image, target, drill_down, batch_size, grid) -> Iterator[Progress]:
    if drill_down.target_ssim is not None and len(grid) != 2:
        # The error calibration behind the SSIM estimate was set on photos; on 1-d and 3-d test
        # maps it proved optimistic (SSIM 0.64 to 0.79 delivered for a target of 0.8 on 10^3 maps).
        raise InputError(
            f"target_ssim needs a 2-d map: its SSIM estimate is calibrated on images and may stop short "
            f"of the target on this {len(grid)}-d map; give queries=N or target_speedup=T instead, and "
            "compare a sample with the exact map (kfx.heatmap_ssim)"
        )
    cells = math.prod(grid)
    budget = drill_down.budget(cells)
    if budget >= cells and drill_down.target_ssim is None:  # every cell: the exact map, in one run
        return _all_measured(engine.stream(image, target, batch_size=batch_size))
    # The first level takes COARSE_SHARE of a budget, but is never denser than every other cell.
    spacing = (
        COARSE_SPACING if budget >= cells else max(2.0, root(cells / (COARSE_SHARE * budget), len(grid)))
    )
    hierarchy = _Hierarchy(grid, spacing)
    while hierarchy.base.sum() > budget and spacing < max(grid):
        spacing *= 1.25
        hierarchy = _Hierarchy(grid, spacing)
    if hierarchy.base.sum() > budget:
        raise InputError(
            f"a drill-down budget of {budget} queries cannot even cover the corners of this "
            f"{' x '.join(map(str, grid))} map ({int(hierarchy.base.sum())} cells); give at least that many "
            "queries, or compute the exact map"
        )
    first = torch.from_numpy(hierarchy.base)
    steps = engine.stream(image, target, cells=first, batch_size=batch_size)  # checks input now
    return _refine(engine, image, drill_down, batch_size, hierarchy, budget, steps)


def _refine(engine, image, drill_down, batch_size, hierarchy, budget, steps) -> Iterator[Progress]:
    """The first level's steps, then level after level of the cells expected to be most wrong."""
    for step in steps:
        yield replace(step, heatmap=_with_measured(step.heatmap), total=max(step.total, budget))
    first = step.heatmap
    started = time.perf_counter() - step.elapsed
    target, dtype = first.target, first.values.dtype
    values = first.values.to(torch.float64).numpy().copy()  # NaN where not queried: never read
    queried = hierarchy.base.copy()
    done = int(queried.sum())

    def level_map(total: int) -> tuple[Progress, np.ndarray, np.ndarray]:
        estimate, surplus = hierarchy.interpolate(values, queried)
        estimate[queried] = values[queried]
        heatmap = _heatmap(first, estimate, queried, dtype)
        return Progress(heatmap, done, total, time.perf_counter() - started), estimate, surplus

    scale = None  # observed / predicted error, from the last level's queries
    while True:
        progress, estimate, surplus = level_map(max(done, budget))
        if not np.isfinite(values[queried]).all():  # the model failed: show it, never fill it in
            yield replace(progress, total=done)
            return
        error, ready = _expected_error(hierarchy, estimate, surplus, queried)
        chosen = _next_level(drill_down, estimate, error, ready, queried, budget - done, scale)
        if chosen is None:
            yield replace(progress, total=done)
            return
        yield progress
        for fine in engine.stream(image, target, cells=torch.from_numpy(chosen), batch_size=batch_size):
            got = fine.heatmap.evaluated.numpy()
            values[got] = fine.heatmap.values.to(torch.float64).numpy()[got]
            now = queried | got
            shown = np.where(now, values, estimate)
            yield Progress(
                _heatmap(first, shown, now, dtype),
                done + fine.done,
                max(done + fine.total, budget),
                time.perf_counter() - started,
            )
        scale = _error_scale(error[chosen], values[chosen] - estimate[chosen])
        queried |= chosen
        done += int(chosen.sum())


def _error_scale(predicted: np.ndarray, observed: np.ndarray) -> tuple[float, float]:
    """(floor, slope) with observed^2 ~ floor + slope * predicted^2 (non-negative least squares)
    at the cells just queried, where the interpolation's error is now known: the predictions'
    scale differs between maps (smooth or rough), and even cells predicted right get some error."""
    from scipy.optimize import nnls

    design = np.stack([np.ones(predicted.size), predicted.ravel() ** 2], 1)
    (floor, slope), _ = nnls(design, observed.ravel() ** 2)
    return float(floor), float(slope)


def _next_level(
    drill_down, estimate, error, ready, queried, left: int, scale: tuple[float, float] | None
) -> np.ndarray | None:
    """The cells of the next level (bool, the map's shape), or None when refining should stop.

    Stopping early needs evidence: a level of queries whose observed errors scale the predicted
    ones (``scale``); before that, only the budget stops the refinement."""
    span = float(estimate.max() - estimate.min()) or 1.0
    if not ready.any():
        return None  # every cell queried
    if scale is not None:
        calibrated = np.where(queried, 0.0, np.sqrt(scale[0] + scale[1] * error**2))
        if calibrated[ready].max() <= NEGLIGIBLE_ERROR * span:
            return None  # nothing left that could change the picture
        if drill_down.target_ssim is not None:
            expected = estimated_ssim(estimate, calibrated)
            if 1.0 - expected <= (1.0 - drill_down.target_ssim) / SSIM_SAFETY:
                return None
            if left <= 0:
                warnings.warn(
                    f"drill-down stopped at its query budget with an estimated SSIM of {expected:.3f}, "
                    f"below target_ssim {drill_down.target_ssim:g}: raise queries or lower target_speedup "
                    "(or drop them: target_ssim alone refines until the estimate meets the target)",
                    RuntimeWarning,
                    stacklevel=2,
                )
    elif drill_down.target_ssim is not None and left <= 0:
        warnings.warn(
            f"drill-down stopped at its query budget before it could estimate its SSIM against "
            f"target_ssim {drill_down.target_ssim:g}: raise queries or lower target_speedup",
            RuntimeWarning,
            stacklevel=2,
        )
    if left <= 0:
        return None
    importance = 1.0 + LOW_VALUE_WEIGHT * (estimate.max() - estimate) / span
    priority = np.where(ready, error * importance, -np.inf).ravel()
    share = ROUND_SHARE * left if drill_down.target_ssim is None else TARGET_ROUND_SHARE * estimate.size
    quota = max(MIN_ROUND, math.ceil(share))
    if left - quota < MIN_ROUND:  # no small last level: each level costs a partly filled batch
        quota = left
    quota = min(quota, int(ready.sum()))
    order = np.argsort(-priority, kind="stable")[:quota]
    chosen = np.zeros(priority.shape, dtype=bool)
    chosen[order] = True
    return chosen.reshape(estimate.shape)


def _heatmap(first: Heatmap, values: np.ndarray, queried: np.ndarray, dtype) -> Heatmap:
    """The engine's first map with these values: its target, base, patch and modes carried over."""
    return replace(
        first, values=torch.from_numpy(values).to(dtype), measured=torch.from_numpy(queried.copy())
    )
