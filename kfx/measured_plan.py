"""Never slower than plain inference: a ``plan="auto"`` engine times its plan against full inference.

The plan is chosen at compile time from estimates (kfx.passes.plan), and an estimate can be off by
2x on a shared machine (docs/design.md §3.8). So an exact engine whose plan runs incrementally times
its first full-size batches both ways, alternating (the incremental program, then plain batched
inference on the occluded copies: the caller's own model, as ``kfx.NaiveEngine`` runs it), and
from then on runs the path with the lower best time per position; the program only if it wins by
:data:`MARGIN`. One sample of each decides when one path is :data:`DECISIVE` times faster, else
:data:`SAMPLES` of each. Both paths are exact, and every timed batch is a batch the call needed
anyway: the measurement costs the time the slower path took on its samples (the first map of an
engine whose program is 8x faster than full inference pays one full-inference batch extra).

Only batches of the engine's full step are timed: a map's last, partial batch (and every batch of
a call smaller than one step) runs the estimate's path until the choice is made. Samples add up
across calls, so a map of two or three batches still decides on the next call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

__all__ = ["SAMPLES", "MARGIN", "DECISIVE", "MIN_STEP", "Measured", "PathTimer"]

SAMPLES = 2  # full-size batches timed per path; the best of them counts (the first may be cold)
# The program is kept only if it measures at least this much faster: on a near-tie, samples on a
# shared machine cannot tell, and plain inference is the baseline kfx must never fall below.
MARGIN = 1.10
# One sample each decides when one path is at least this much faster: no noise flips such a gap,
# and every further sample of the slow path is paid in full (VGG16: one full-inference batch costs
# what eight batches of its program do).
DECISIVE = 2.0
MIN_STEP = 4  # smaller batches are not timed: fixed costs dominate them, not the per-position work
INCREMENTAL, FULL = "incremental", "full"


@dataclass(frozen=True)
class Measured:
    """What the first full-size batches measured: best seconds per position of each path."""

    incremental_seconds: float
    full_seconds: float
    batch_size: int

    @property
    def full_inference(self) -> bool:
        return self.incremental_seconds * MARGIN >= self.full_seconds

    def summary(self) -> str:
        times = (
            f"measured on batches of {self.batch_size}: incremental {self.incremental_seconds * 1e3:.3f} "
            f"ms/position, full inference {self.full_seconds * 1e3:.3f} ms/position"
        )
        ratio = self.full_seconds / self.incremental_seconds
        if not self.full_inference:
            return f"{times}; runs the incremental program ({ratio:.2f}x faster)"
        if ratio < 1:
            return f"{times}; runs plain batched inference ({1 / ratio:.2f}x faster)"
        return f"{times}; runs plain batched inference (the program won by less than {MARGIN:.2f}x)"


class PathTimer:
    """The alternating measurement of one engine, shared by every thread that runs it."""

    def __init__(self, device: torch.device):
        self._device = device
        self._lock = threading.Lock()
        self._samples: dict[str, list[float]] = {INCREMENTAL: [], FULL: []}
        self._step: int | None = None  # the batch size the samples were taken at
        self.result: Measured | None = None

    def path_to_time(self, positions: int, step: int) -> str | None:
        """The path to time this batch with, or None when the batch is not a sample (the choice
        is made, the batch is partial or small, or the samples were taken at another step)."""
        if self.result is not None or positions != step or step < MIN_STEP:
            return None
        with self._lock:
            if self._step not in (None, step):
                return None
            self._step = step
            counts = {path: len(times) for path, times in self._samples.items()}
            return INCREMENTAL if counts[INCREMENTAL] <= counts[FULL] else FULL

    def timed(self, path: str, run, positions: int):
        """Run ``run()`` (one batch on ``path``), record its time per position, return its output."""
        self._synchronize()
        started = time.perf_counter()
        out = run()
        self._synchronize()
        seconds = (time.perf_counter() - started) / positions
        with self._lock:
            self._samples[path].append(seconds)
            counts = min(map(len, self._samples.values()))
            if self.result is None and counts >= 1:
                best = min(self._samples[INCREMENTAL]), min(self._samples[FULL])
                if counts >= SAMPLES or max(best) >= DECISIVE * min(best):
                    self.result = Measured(*best, int(self._step))
        return out

    def _synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
