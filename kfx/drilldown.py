"""Adaptive drill-down: an approximate heat map from fewer queries (docs/design.md §4.2).

Three rules, all on cells of the engine's own grid (every query is an exact cell of the map):

- ``"adaptive"`` (the default): coarse to fine over several levels. A coarse grid first, then each
  level queries the cells where the interpolation is expected to be most wrong (disagreement
  between the neighbours it interpolates from, and how wrong it already was one level up), with
  more weight on low values (large drops). It stops when the budget is spent, the expected error is
  negligible, or (``target_ssim``) the estimated SSIM meets the target. The map holds the queried
  values and a hierarchical piecewise-linear interpolation through them elsewhere
  (kfx/_drilldown_adaptive.py).
- ``"lowest"`` (kfx's earlier rule): a coarse stage 1, the fraction r of cells with the lowest
  interpolated values at the target stride, a multilinear (for images bilinear) fill from stage 1
  elsewhere.
- ``"paper"`` (KRYPTON's block rule, [TR] §4.2): stage 1 as above, its values painted as blocks,
  the fraction r of cells with the lowest block values queried.

Every rule works on maps of any rank (signals, images, volumes): grids, hierarchies and
interpolations are built per axis and combined as products over the axes.

>>> heatmap = engine(image, drill_down=kfx.DrillDown(target_speedup=3))  # doctest: +SKIP
>>> heatmap.measured.float().mean()  # share of cells that were queried, not interpolated  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from kfx._drilldown_adaptive import (
    _adaptive_stream,
    _all_measured,
    _linear_interpolation,
    _with_measured,
    along_axes,
)
from kfx._drilldown_adaptive import _Hierarchy as _Hierarchy  # tests' own
from kfx._drilldown_adaptive import stage1_cells as stage1_cells
from kfx.errors import InputError
from kfx.geometry import drill_down_speedup, drill_down_stage1_stride
from kfx.results import Progress

__all__ = ["DrillDown", "drill_down_stream", "stage1_cells", "RULES"]

RULES = ("adaptive", "lowest", "paper")
DEFAULT_SPEEDUP = 3.0


def _positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, init=False)
class DrillDown:
    """Drill-down settings: which rule picks the queried cells, and the budget (docs/design.md §4.2).

    The adaptive rule (default) takes one budget: ``queries`` (a number of queries),
    ``target_speedup`` t (queries = ceil(cells / t); default 3), or ``target_ssim`` (refine until the
    estimated whole-map SSIM against the exact map reaches it; with ``queries`` or
    ``target_speedup`` too, whichever comes first).

    The ``"lowest"`` and ``"paper"`` rules (chosen by default when ``fraction`` or
    ``stage1_stride`` is given) take the two-stage parameters: stage 1 a sub-grid about
    ``stage1_stride`` S1 pixels apart (one number for every axis, or a pair (h, w) for images),
    stage 2 the ``fraction`` r of the cells with the lowest estimate. S1 is given or solved from
    ``target_speedup`` t, S1 = S2 * sqrt(t / (1 - r t)) for images ([TR] Eq. 29; needs r * t < 1),
    the d-th root instead of the square root for a map of d axes. ``fraction=1.0`` drills
    everywhere: the exact map.

    >>> DrillDown(target_speedup=3).rule, DrillDown(0.25, target_speedup=3).rule
    ('adaptive', 'lowest')
    >>> DrillDown(0.25, target_speedup=3).stage1_strides((4, 4))
    (13.856406460551018, 13.856406460551018)
    """

    rule: str
    fraction: float | None
    stage1_stride: tuple[float, float] | None
    target_speedup: float | None
    queries: int | None
    target_ssim: float | None

    def __init__(
        self,
        fraction: float | None = None,
        stage1_stride=None,
        target_speedup: float | None = None,
        *,
        rule: str | None = None,
        queries: int | None = None,
        target_ssim: float | None = None,
    ):
        if rule is None:
            rule = "lowest" if fraction is not None or stage1_stride is not None else "adaptive"
        if rule not in RULES:
            raise InputError(f"DrillDown rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
        if rule == "adaptive":
            settings = _adaptive_settings(fraction, stage1_stride, target_speedup, queries, target_ssim)
        else:
            settings = _two_stage_settings(
                rule, fraction, stage1_stride, target_speedup, queries, target_ssim
            )
        object.__setattr__(self, "rule", rule)
        for name, value in zip(
            ("fraction", "stage1_stride", "target_speedup", "queries", "target_ssim"), settings
        ):
            object.__setattr__(self, name, value)

    def budget(self, cells: int) -> int:
        """Queries the adaptive rule may spend on a map of ``cells`` cells (all of them with
        ``target_ssim`` alone)."""
        if self.rule != "adaptive":
            raise InputError(f"budget() is the adaptive rule's; the {self.rule!r} rule has fraction and S1")
        if self.queries is not None:
            return min(cells, self.queries)
        if self.target_speedup is not None:
            return min(cells, math.ceil(cells / self.target_speedup))
        return cells

    def stage1_strides(self, stage2_stride: tuple[int, ...]) -> tuple[float, ...]:
        """S1 per axis ((h, w) for images) for an engine whose heat-map stride is ``stage2_stride``
        (two-stage rules)."""
        if self.rule == "adaptive":
            raise InputError("the adaptive rule has no single stage-1 stride: it refines over several levels")
        if self.stage1_stride is not None:
            strides = self._given_stage1_strides(len(stage2_stride))
        else:
            # [TR] Eq. 29 solves (S1 / S2)^2 = t / (1 - r t) for two axes; d axes take the d-th root.
            image_ratio = drill_down_stage1_stride(1.0, self.fraction, self.target_speedup)
            ratio = image_ratio ** (2 / len(stage2_stride))
            strides = tuple(s * ratio for s in stage2_stride)
        if any(s1 < s2 for s1, s2 in zip(strides, stage2_stride)):
            raise InputError(
                f"stage1_stride {strides} is finer than the engine's stride {stage2_stride}: stage 1 must be coarser"
            )
        return strides

    def _given_stage1_strides(self, axes: int) -> tuple[float, ...]:
        """The given S1 on a map of ``axes`` axes: a pair (h, w) is an image's; one number (stored
        as an equal pair) holds for every axis."""
        given = self.stage1_stride
        if len(given) == axes:
            return given
        if len(set(given)) == 1:
            return (given[0],) * axes
        raise InputError(
            f"stage1_stride {given} is a pair (h, w) for images, but this map has {axes} axes; "
            "give one number for every axis"
        )

    def query_speedup(self, stage2_stride: tuple[int, ...]) -> float:
        """Theoretical query-count speedup over the full grid ([TR] Eq. 28), all axes together
        (two-stage rules; the adaptive rule's is its ``target_speedup`` or cells / ``queries``)."""
        s1 = self.stage1_strides(stage2_stride)
        # Eq. 28 squares one stride; over several axes the squares become products over the axes,
        # passed as their square roots (an image's geometric means).
        s1_mean, s2_mean = math.sqrt(math.prod(s1)), math.sqrt(math.prod(stage2_stride))
        return drill_down_speedup(s1_mean, s2_mean, self.fraction)

    def stream(self, engine, image: torch.Tensor, target=None, batch_size=None) -> Iterator[Progress]:
        """The approximate map through ``engine`` (:func:`drill_down_stream`); the engine's ``stream``
        calls this, so drill-down is a strategy the engine runs without knowing its rule."""
        return drill_down_stream(engine, image, target, self, batch_size)


def _adaptive_settings(fraction, stage1_stride, target_speedup, queries, target_ssim):
    if fraction is not None or stage1_stride is not None:
        raise InputError(
            "fraction and stage1_stride belong to the two-stage rules (rule='lowest' or 'paper'); "
            "the adaptive rule takes queries=N, target_speedup=T or target_ssim=S"
        )
    if queries is not None and target_speedup is not None:
        raise InputError("give DrillDown either queries or target_speedup, not both")
    if queries is not None:
        if isinstance(queries, bool) or not isinstance(queries, (int, np.integer)) or queries < 1:
            raise InputError(f"DrillDown queries must be a positive whole number, got {queries!r}")
        queries = int(queries)
    if target_speedup is not None:
        target_speedup = _positive_number(target_speedup, "DrillDown target_speedup")
        if target_speedup < 1:
            raise InputError(
                f"DrillDown target_speedup must be at least 1 (1 = every cell, the exact map), got {target_speedup}"
            )
    if target_ssim is not None:
        target_ssim = _positive_number(target_ssim, "DrillDown target_ssim")
        if not 0 < target_ssim <= 1:
            raise InputError(
                f"DrillDown target_ssim must be in (0, 1] (1 = the exact map), got {target_ssim}"
            )
    if queries is None and target_speedup is None and target_ssim is None:
        target_speedup = DEFAULT_SPEEDUP
    return None, None, target_speedup, queries, target_ssim


def _two_stage_settings(rule, fraction, stage1_stride, target_speedup, queries, target_ssim):
    if queries is not None or target_ssim is not None:
        raise InputError(
            f"queries and target_ssim are budgets of the adaptive rule; the {rule!r} rule takes "
            "fraction with target_speedup or stage1_stride"
        )
    fraction = _positive_number(0.25 if fraction is None else fraction, "DrillDown fraction")
    if not 0 < fraction <= 1:
        raise InputError(f"DrillDown fraction must be in (0, 1] (share of cells drilled), got {fraction}")
    if stage1_stride is not None and target_speedup is not None:
        raise InputError("give DrillDown either stage1_stride or target_speedup, not both")
    if stage1_stride is None and target_speedup is None:
        target_speedup = DEFAULT_SPEEDUP
    if target_speedup is not None:
        target_speedup = _positive_number(target_speedup, "DrillDown target_speedup")
        if target_speedup <= 1:
            raise InputError(f"DrillDown target_speedup must be above 1, got {target_speedup}")
        if fraction * target_speedup >= 1:
            raise InputError(
                f"DrillDown cannot reach speedup {target_speedup:g} at fraction {fraction:g}: stage 2 "
                f"alone asks {fraction:g} of the queries, so the speedup stays below 1/fraction = "
                f"{1 / fraction:.3g} ([TR] Eq. 30). Lower the target or the fraction, or use rule='adaptive'"
            )
        return fraction, None, target_speedup, None, None
    pair = stage1_stride if isinstance(stage1_stride, (tuple, list)) else (stage1_stride, stage1_stride)
    if len(pair) != 2:
        raise InputError(f"stage1_stride must be a number or a pair (h, w), got {stage1_stride!r}")
    stage1_stride = tuple(_positive_number(s, "DrillDown stage1_stride") for s in pair)
    if min(stage1_stride) <= 0:
        raise InputError(f"stage1_stride must be positive, got {stage1_stride}")
    return fraction, stage1_stride, None, None, None


def drill_down_stream(
    engine,
    image: torch.Tensor,
    target: int | None,
    drill_down: DrillDown,
    batch_size: int | None = None,
) -> Iterator[Progress]:
    """The approximate heat map, one :class:`Progress` per batch of queries and one more per level
    with the refreshed interpolation; ``engine.stream(image, drill_down=...)`` and
    ``engine(image, drill_down=...)`` call this.

    While the first level runs, the map holds its samples and NaN elsewhere; after it, a whole map:
    queried values where ``heatmap.measured`` is True, the interpolation elsewhere. ``done`` counts
    queries; ``total`` is an upper bound until the last step, where it equals ``done``. Every query
    runs through the engine (its tau and batching) on cells of its grid; input is checked before
    the first query.
    """
    if not isinstance(drill_down, DrillDown):
        raise InputError(f"drill_down must be a kfx.DrillDown, got {type(drill_down).__name__}")
    grid = engine.patch.grid_shape(tuple(engine.image_shape[1:]))
    if drill_down.rule == "adaptive":
        return _adaptive_stream(engine, image, target, drill_down, batch_size, grid)
    if drill_down.fraction >= 1:  # everything is drilled: stage 1 would be pure waste
        return _all_measured(engine.stream(image, target, batch_size=batch_size))
    strides = drill_down.stage1_strides(engine.patch.stride)
    samples = [stage1_cells(n, s1 / s2) for n, s1, s2 in zip(grid, strides, engine.patch.stride)]
    stage1 = torch.zeros(grid, dtype=torch.bool)
    stage1[_tensor_grid(samples)] = True
    coarse_steps = engine.stream(image, target, cells=stage1, batch_size=batch_size)
    return _two_stage(engine, image, drill_down, batch_size, stage1, samples, coarse_steps)


def _tensor_grid(samples: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Index tensors that select every combination of the per-axis ``samples`` (an open mesh)."""
    axes = len(samples)
    return tuple(
        torch.tensor(cells).reshape([-1 if b == a else 1 for b in range(axes)])
        for a, cells in enumerate(samples)
    )


# -- the two-stage rules ("lowest", "paper") ----------------------------------------------------------


def _nearest_sample(samples: list[int], cells: int) -> torch.Tensor:
    """Matrix [cells, len(samples)] that paints each cell with its nearest sample (ties: the lower)."""
    weights = torch.zeros(cells, len(samples), dtype=torch.float64)
    for i in range(cells):
        weights[i, min(range(len(samples)), key=lambda k: (abs(samples[k] - i), k))] = 1.0
    return weights


def _two_stage(engine, image, drill_down, batch_size, stage1, samples, coarse_steps) -> Iterator[Progress]:
    """Stage 1's steps, the estimate and regions, then stage 2's steps.

    ``samples`` holds stage 1's cells along each axis (stage 1 is their tensor grid). The estimate
    is a multilinear (for images bilinear) surface through the stage-1 values ("lowest": exact at
    the samples, never outside their range) or the nearest stage-1 value ("paper": its coarse
    blocks). Regions: the round(r * N) cells with the lowest estimate, ties in row-major order; they
    are not dilated, so stage 2 costs exactly the fraction r ([TR] Eq. 28 holds).
    """
    grid = tuple(stage1.shape)
    count = max(1, round(math.prod(grid, start=drill_down.fraction)))
    sampled = math.prod(len(cells) for cells in samples)
    for step in coarse_steps:
        coarse = _with_measured(step.heatmap)
        yield Progress(coarse, step.done, sampled + count, step.elapsed)
    stage1_values = coarse.values[stage1].view(*(len(cells) for cells in samples)).to(torch.float64)
    fill = _nearest_sample if drill_down.rule == "paper" else _linear_interpolation
    estimate = along_axes([fill(cells, n) for cells, n in zip(samples, grid)], stage1_values)

    order = torch.sort(estimate.flatten(), stable=True).indices[:count]
    selected = torch.zeros(math.prod(grid), dtype=torch.bool)
    selected[order] = True
    drilled = selected.view(grid) & ~stage1

    values = estimate.to(coarse.values.dtype)
    values[stage1] = coarse.values[stage1]
    measured = stage1.clone()
    elapsed = step.elapsed
    for fine in engine.stream(image, coarse.target, cells=drilled, batch_size=batch_size):
        queried = fine.heatmap.evaluated
        values[queried] = fine.heatmap.values[queried]
        measured |= queried
        heatmap = replace(
            coarse, values=values.clone(), measured=measured.clone()
        )  # the engine's modes carried
        yield Progress(heatmap, sampled + fine.done, sampled + fine.total, elapsed + fine.elapsed)
