"""What an engine returns: heat maps, stream steps, and where incremental execution stops.

A leaf module (no engine, no passes), so the engine, the approximate modes and the front ends can
all import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kfx.patch import Patch

__all__ = ["Heatmap", "Progress", "DenseNode", "Tuning"]


@dataclass
class Heatmap:
    """An occlusion heat map.

    ``values[i, j]`` is the softmax probability of class ``target`` when the patch's top-left corner
    sits at ``(i * stride_h, j * stride_w)``; ``base`` is that class's probability on the
    unoccluded image. Low values mark regions the prediction relies on. Cells that were not
    evaluated (a selection in interactive mode, or a map still filling in) hold NaN.

    ``measured`` (adaptive drill-down only, else None) is a bool mask [H_M, W_M]: True where the
    value came from a query at that very position, False where it was interpolated from stage 1.
    ``tau`` is the engine's projective-field threshold: below 1 every value is approximate.
    ``global_context`` is the engine's mode for squeeze-excitation gates: "local" is approximate.
    """

    values: torch.Tensor
    target: int
    base: float
    patch: Patch
    image_size: tuple[int, int] = field(default=(0, 0))
    measured: torch.Tensor | None = None
    tau: float = 1.0
    global_context: str = "exact"

    @property
    def approximate(self) -> bool:
        """True if any value may differ from full inference: tau < 1, local gates or drill-down."""
        return self.tau < 1 or self.global_context != "exact" or self.measured is not None

    @property
    def stride(self) -> tuple[int, int]:
        return self.patch.stride

    @property
    def evaluated(self) -> torch.Tensor:
        """Bool mask [H_M, W_M] of the cells that hold a computed value."""
        return ~torch.isnan(self.values)

    def to_pixels(self) -> torch.Tensor:
        """Per-pixel map [H, W]: mean over covering windows of (base - occluded probability)."""
        from kfx.plot import to_pixels

        return to_pixels(self)

    def plot(self, image: torch.Tensor | None = None, **kwargs):
        """Draw the map (over ``image`` if given) with a colour bar; returns the matplotlib Axes."""
        from kfx.plot import plot

        return plot(self, image, **kwargs)

    def save(self, path, image: torch.Tensor | None = None, **kwargs) -> None:
        """Write the picture of :meth:`plot` to ``path``."""
        from kfx.plot import save

        save(self, path, image, **kwargs)


@dataclass(frozen=True)
class Progress:
    """One step of :meth:`Engine.stream`: the map so far and how much of it is done."""

    heatmap: Heatmap
    done: int  # positions evaluated so far
    total: int  # positions this run evaluates
    elapsed: float  # seconds since the run started (base inference included)

    @property
    def positions_per_second(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True)
class DenseNode:
    """A node where incremental execution stops and the rest of the graph runs densely."""

    node: str
    reason: str


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune` measured and chose (``engine.tuning``).

    ``ssim[i][j]``: SSIM of sample i's map at ``taus[j]`` against its exact map. ``lower[j]``: the
    ``quantile`` of column j (an observed value, numpy's "lower" method); ``tau`` is the lowest
    grid tau at which this and every larger grid tau meet ``target_ssim``. ``fit`` holds the
    paper's second-degree polynomial through the mean SSIM (highest power first); ``paper_tau``
    is what the paper's rule, the lowest tau (0.01 steps) whose fitted mean meets the target,
    would have picked: usually lower, and wrong for more images (docs/design.md §4.3).
    """

    taus: tuple[float, ...]
    ssim: tuple[tuple[float, ...], ...]
    mean: tuple[float, ...]
    lower: tuple[float, ...]
    fit: tuple[float, float, float]
    target_ssim: float
    quantile: float
    tau: float
    paper_tau: float
    global_context: str = "exact"  # the mode these measurements are for, and the engine's
    candidates: tuple[tuple[str, float, float], ...] = ()  # (mode, its chosen tau, ceiling) per eligible mode

    def predicted_ssim(self, tau: float) -> float:
        """The fitted mean SSIM at ``tau`` (the paper's curve)."""
        return float(np.polyval(self.fit, tau))
