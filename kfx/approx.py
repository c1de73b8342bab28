"""Approximate occlusion maps: SSIM against the exact map, and the drill-down modes.

Projective-field thresholding itself is a compile option (``kfx.compile(..., tau=0.5)``, docs/design.md §4.1):
it changes the boxes that patch propagation computes, and nothing else. What sits on top of an engine:

- :class:`DrillDown` and :func:`drill_down_stream` (in :mod:`kfx.drilldown`, importable from here):
  an approximate map from fewer queries, docs/design.md §4.2;
- :func:`heatmap_ssim`: the quality measure (scikit-image SSIM on the probability maps).

Tuning tau for a target SSIM (docs/design.md §4.3) lives in :mod:`kfx.tuning`.

>>> engine = kfx.compile(model, (3, 224, 224), kfx.Patch(16, stride=4), tau=0.5)  # doctest: +SKIP
>>> heatmap = engine(image, drill_down=kfx.DrillDown(target_speedup=3))  # doctest: +SKIP
>>> heatmap.measured.float().mean()  # share of cells that were queried, not interpolated  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from kfx.drilldown import DrillDown, drill_down_stream, stage1_cells
from kfx.drilldown import _positive_number as _positive_number  # kfx.tuning's
from kfx.errors import InputError
from kfx.results import Heatmap

__all__ = [
    "DrillDown",
    "drill_down_stream",
    "heatmap_ssim",
    "stage1_cells",
]


def _map_values(heatmap) -> np.ndarray:
    values = heatmap.values if isinstance(heatmap, Heatmap) else heatmap
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2, 3):
        raise InputError(
            f"heat maps have one axis per spatial axis of the input (1 to 3), got shape {list(values.shape)}"
        )
    if not np.isfinite(values).all():
        raise InputError("heat map holds NaN (unevaluated cells): SSIM needs complete maps")
    return values


def heatmap_ssim(exact, approximate) -> float:
    """SSIM of an approximate heat map against the exact one (scikit-image, on the probabilities).

    ``data_range`` is the exact map's own range, exact.max() - exact.min(), not the probability
    range 1: stricter (a map whose probabilities barely move is judged on that small range) and
    independent of how confident the model is. A flat exact map falls back to data_range 1. The
    window is scikit-image's default 7 x 7, smaller (odd) for maps under 7 cells on a side.

    Accepts :class:`Heatmap` objects or tensors/arrays of equal shape with one to three axes
    (signals, images, volumes; scikit-image computes SSIM in N dimensions).
    """
    from skimage.metrics import structural_similarity

    reference, other = _map_values(exact), _map_values(approximate)
    if reference.shape != other.shape:
        raise InputError(f"heat maps differ in shape: {list(reference.shape)} vs {list(other.shape)}")
    side = min(reference.shape)
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        raise InputError(f"SSIM needs maps of at least 3 cells along every axis, got {list(reference.shape)}")
    data_range = float(reference.max() - reference.min()) or 1.0
    return float(structural_similarity(reference, other, data_range=data_range, win_size=window))
