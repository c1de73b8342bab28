"""Approximate occlusion maps: adaptive drill-down, SSIM against the exact map, and tuning tau.

Projective-field thresholding itself is a compile option (``kfx.compile(..., tau=0.5)``, docs/design.md §4.1):
it changes the boxes that patch propagation computes, and nothing else. This module holds what
sits on top of an engine:

- :class:`DrillDown` and :func:`drill_down_stream`: the two-stage map of docs/design.md §4.2, with the
  cells outside the drilled regions interpolated from stage 1 instead of painted as coarse blocks;
- :func:`heatmap_ssim`: the quality measure (scikit-image SSIM on the probability maps);

Tuning tau for a target SSIM (docs/design.md §4.3) lives in :mod:`kfx.tuning`.

>>> engine = kfx.compile(model, (3, 224, 224), kfx.Patch(16, stride=4), tau=0.5)  # doctest: +SKIP
>>> heatmap = engine(image, drill_down=kfx.DrillDown(fraction=0.25, target_speedup=3))  # doctest: +SKIP
>>> heatmap.measured.float().mean()  # share of cells that were queried, not interpolated  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from kfx.errors import InputError
from kfx.geometry import drill_down_speedup, drill_down_stage1_stride
from kfx.results import Heatmap, Progress

__all__ = [
    "DrillDown",
    "drill_down_stream",
    "heatmap_ssim",
]


def _positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, init=False)
class DrillDown:
    """Adaptive drill-down settings (docs/design.md §4.2, [TR] §4.2).

    Stage 1 queries a coarse sub-grid of the heat map (spacing ``stage1_stride`` pixels); stage 2
    queries, at the engine's own stride, the ``fraction`` r of the map's cells whose interpolated
    probability dropped most. Give the stage-1 stride, or a ``target_speedup`` t in query count
    from which it is solved, S1 = S2 * sqrt(t / (1 - r t)) ([TR] Eq. 29; needs r * t < 1). With
    neither, t = 3 (the paper's default). ``fraction=1.0`` drills everywhere: the exact map.

    Args:
        fraction: r in (0, 1], the share of cells computed at the target stride.
        stage1_stride: S1 in pixels, a number or (h, w); must be at least the engine's stride.
        target_speedup: t > 1, the query-count speedup over the full grid ([TR] Eq. 28).

    >>> DrillDown(0.25, target_speedup=3).stage1_strides((4, 4))
    (13.856406460551018, 13.856406460551018)
    """

    fraction: float
    stage1_stride: tuple[float, float] | None
    target_speedup: float | None

    def __init__(self, fraction: float = 0.25, stage1_stride=None, target_speedup: float | None = None):
        fraction = _positive_number(fraction, "DrillDown fraction")
        if not 0 < fraction <= 1:
            raise InputError(f"DrillDown fraction must be in (0, 1] (share of cells drilled), got {fraction}")
        if stage1_stride is not None and target_speedup is not None:
            raise InputError("give DrillDown either stage1_stride or target_speedup, not both")
        if stage1_stride is None and target_speedup is None:
            target_speedup = 3.0
        if target_speedup is not None:
            target_speedup = _positive_number(target_speedup, "DrillDown target_speedup")
            if target_speedup <= 1:
                raise InputError(f"DrillDown target_speedup must be above 1, got {target_speedup}")
            if fraction * target_speedup >= 1:
                raise InputError(
                    f"DrillDown cannot reach speedup {target_speedup:g} at fraction {fraction:g}: stage 2 "
                    f"alone asks {fraction:g} of the queries, so the speedup stays below 1/fraction = "
                    f"{1 / fraction:.3g} ([TR] Eq. 30). Lower the target or the fraction"
                )
        else:
            pair = (
                stage1_stride if isinstance(stage1_stride, (tuple, list)) else (stage1_stride, stage1_stride)
            )
            if len(pair) != 2:
                raise InputError(f"stage1_stride must be a number or a pair (h, w), got {stage1_stride!r}")
            stage1_stride = tuple(_positive_number(s, "DrillDown stage1_stride") for s in pair)
            if min(stage1_stride) <= 0:
                raise InputError(f"stage1_stride must be positive, got {stage1_stride}")
        object.__setattr__(self, "fraction", fraction)
        object.__setattr__(self, "stage1_stride", stage1_stride)
        object.__setattr__(self, "target_speedup", target_speedup)

    def stage1_strides(self, stage2_stride: tuple[int, int]) -> tuple[float, float]:
        """S1 per axis (h, w) for an engine whose heat-map stride is ``stage2_stride``."""
        if self.stage1_stride is not None:
            strides = self.stage1_stride
        else:
            strides = tuple(
                drill_down_stage1_stride(s, self.fraction, self.target_speedup) for s in stage2_stride
            )
        if any(s1 < s2 for s1, s2 in zip(strides, stage2_stride)):
            raise InputError(
                f"stage1_stride {strides} is finer than the engine's stride {stage2_stride}: stage 1 must be coarser"
            )
        return strides

    def query_speedup(self, stage2_stride: tuple[int, int]) -> float:
        """Theoretical query-count speedup over the full grid ([TR] Eq. 28), both axes together."""
        s1 = self.stage1_strides(stage2_stride)
        # Eq. 28 squares one stride; with two axes the squares become products (geometric means).
        s1_mean, s2_mean = math.sqrt(s1[0] * s1[1]), math.sqrt(stage2_stride[0] * stage2_stride[1])
        return drill_down_speedup(s1_mean, s2_mean, self.fraction)

    def stream(self, engine, image: torch.Tensor, target=None, batch_size=None) -> Iterator[Progress]:
        """The two-stage map through ``engine`` (:func:`drill_down_stream`); the engine's ``stream``
        calls this, so drill-down is a strategy the engine runs without knowing its rule."""
        return drill_down_stream(engine, image, target, self, batch_size)


def stage1_cells(cells: int, spacing: float) -> list[int]:
    """Cell indices along one axis for stage 1: evenly spread about ``spacing`` cells apart, first
    and last cell included (so stage 2 never has to extrapolate).

    Stage-1 positions are cells of the target grid, not a separate S1 grid: every stage-1 query is
    then also an exact cell of the final map, and the samples span the whole map.

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


def drill_down_stream(
    engine,
    image: torch.Tensor,
    target: int | None,
    drill_down: DrillDown,
    batch_size: int | None = None,
) -> Iterator[Progress]:
    """The two-stage heat map of docs/design.md §4.2, one :class:`Progress` per batch of queries;
    ``engine.stream(image, drill_down=...)`` and ``engine(image, drill_down=...)`` call this.

    1. Stage 1 queries a sub-grid of the heat-map cells about S1 pixels apart (both ends included).
    2. A bilinear surface through the stage-1 values, at the cells' true patch positions, estimates
       every cell. Heat maps are smooth at the scale of the patch (neighbouring windows overlap), so
       this beats the paper's coarse blocks; it is exact at the samples, cannot overshoot (values
       stay between the probabilities measured), and needs no tuning.
    3. Regions: the round(r * N) cells with the lowest estimated probability (the largest drops),
       ties broken in row-major order. The estimate is a bilinear surface, so these form blobs
       around the stage-1 dips; they are not dilated, so stage 2 costs exactly the fraction r
       ([TR] Eq. 28 holds). Stage 2 queries those cells (less the ones stage 1 already did).
    4. The map holds the queried values where ``heatmap.measured`` is True, the estimate elsewhere.

    While stage 1 runs, the map holds its samples and NaN elsewhere; from stage 2 on, the estimate,
    overwritten by each batch of stage-2 queries. ``done`` counts queries (both stages); ``total``
    is an upper bound during stage 1 (it assumes no stage-2 cell was a stage-1 sample) and exact
    after. Both stages run through the engine (its tau and batching), on cells of its grid; input
    is checked before the first query.
    """
    if not isinstance(drill_down, DrillDown):
        raise InputError(f"drill_down must be a kfx.DrillDown, got {type(drill_down).__name__}")
    if drill_down.fraction >= 1:  # everything is drilled: stage 1 would be pure waste
        return _all_measured(engine.stream(image, target, batch_size=batch_size))
    grid = engine.patch.grid_shape(tuple(engine.image_shape[1:]))
    strides = drill_down.stage1_strides(engine.patch.stride)
    rows, cols = (stage1_cells(grid[a], strides[a] / engine.patch.stride[a]) for a in (0, 1))
    stage1 = torch.zeros(grid, dtype=torch.bool)
    stage1[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
    coarse_steps = engine.stream(image, target, cells=stage1, batch_size=batch_size)
    return _drill(engine, image, drill_down, batch_size, stage1, rows, cols, coarse_steps)


def _with_measured(heatmap: Heatmap) -> Heatmap:
    """The map with every evaluated cell marked as queried (no interpolation yet)."""
    return replace(heatmap, measured=heatmap.evaluated)


def _all_measured(steps: Iterator[Progress]) -> Iterator[Progress]:
    for step in steps:
        yield replace(step, heatmap=_with_measured(step.heatmap))


def _drill(engine, image, drill_down, batch_size, stage1, rows, cols, coarse_steps) -> Iterator[Progress]:
    """Stage 1's steps, the estimate and regions, then stage 2's steps (see drill_down_stream)."""
    grid = tuple(stage1.shape)
    count = max(1, round(drill_down.fraction * grid[0] * grid[1]))
    sampled = len(rows) * len(cols)
    for step in coarse_steps:
        coarse = _with_measured(step.heatmap)
        yield Progress(coarse, step.done, sampled + count, step.elapsed)
    samples = coarse.values[stage1].view(len(rows), len(cols)).to(torch.float64)
    estimate = _linear_interpolation(rows, grid[0]) @ samples @ _linear_interpolation(cols, grid[1]).T

    order = torch.sort(estimate.flatten(), stable=True).indices[:count]
    selected = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
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
        heatmap = Heatmap(
            values.clone(), coarse.target, coarse.base, engine.patch, coarse.image_size,
            measured=measured.clone(), tau=engine.tau,
        )  # fmt: skip
        yield Progress(heatmap, sampled + fine.done, sampled + fine.total, elapsed + fine.elapsed)


def _map_values(heatmap) -> np.ndarray:
    values = heatmap.values if isinstance(heatmap, Heatmap) else heatmap
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"heat maps must be 2-D [H_M, W_M], got shape {list(values.shape)}")
    if not np.isfinite(values).all():
        raise InputError("heat map holds NaN (unevaluated cells): SSIM needs complete maps")
    return values


def heatmap_ssim(exact, approximate) -> float:
    """SSIM of an approximate heat map against the exact one (scikit-image, on the probabilities).

    ``data_range`` is the exact map's own range, exact.max() - exact.min(), not the probability
    range 1: stricter (a map whose probabilities barely move is judged on that small range) and
    independent of how confident the model is. A flat exact map falls back to data_range 1. The
    window is scikit-image's default 7 x 7, smaller (odd) for maps under 7 cells on a side.

    Accepts :class:`Heatmap` objects or 2-D tensors/arrays of equal shape.
    """
    from skimage.metrics import structural_similarity

    reference, other = _map_values(exact), _map_values(approximate)
    if reference.shape != other.shape:
        raise InputError(f"heat maps differ in shape: {list(reference.shape)} vs {list(other.shape)}")
    side = min(reference.shape)
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        raise InputError(f"SSIM needs maps of at least 3 x 3 cells, got {list(reference.shape)}")
    data_range = float(reference.max() - reference.min()) or 1.0
    return float(structural_similarity(reference, other, data_range=data_range, win_size=window))
