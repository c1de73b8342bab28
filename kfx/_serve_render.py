"""What the explorer's page shows: heat maps and NeuroMask masks as pictures, the status line,
and the table of finished runs (:class:`RunRecord`) with each run's speedup over the naive mode.

Part of the explorer (:mod:`kfx._serve_core` re-exports it); free of any web framework.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import torch

from kfx import plot
from kfx._serve_inputs import APPROXIMATE, NAIVE, MapSettings
from kfx.engine import Heatmap, Progress

RUN_COLUMNS = [
    "#",
    "mode",
    "image",
    "patch / stride",
    "positions",
    "seconds",
    "positions/s",
    "speedup vs naive",
]


@dataclass(frozen=True)
class RunRecord:
    """One finished run, a row of the runs table."""

    mode: str  # what the table shows, e.g. "Exact" or "Approximate (tau 0.6)"
    kind: str  # one of MODES
    image: str
    comparison_key: tuple  # runs with equal keys are compared (same image, input size, patch, stride, fill)
    patch_stride: str  # e.g. "16 / 4"
    positions: int | None  # positions queried; None for NeuroMask (no patch positions)
    seconds: float
    cells: int | None = None  # map cells holding a value (drill-down fills more cells than it queries)

    @property
    def positions_per_second(self) -> float | None:
        if self.positions is None or self.seconds <= 0:
            return None
        return self.positions / self.seconds

    @property
    def cells_per_second(self) -> float | None:
        """Map cells delivered per second: what a speedup over the naive mode compares."""
        cells = self.positions if self.cells is None else self.cells
        if cells is None or self.seconds <= 0:
            return None
        return cells / self.seconds


def render_heatmap(heatmap: Heatmap, display: torch.Tensor, label: str) -> np.ndarray:
    """The heat map over the image with its colour bar, as an RGB picture (matplotlib, no pyplot state)."""
    return plot.picture(lambda ax: heatmap.plot(display, ax=ax, label=label))


def render_mask(mask: torch.Tensor, display: torch.Tensor, label: str, steps: int) -> np.ndarray:
    """A NeuroMask mask over the image with its colour bar, as an RGB picture: the CLI's drawing
    (:func:`kfx.plot.plot_mask`), so both show masks alike."""
    return plot.picture(lambda ax: plot.plot_mask(mask, display, ax=ax, label=label, steps=steps))


def status_html(title: str, done: int | None = None, total: int | None = None, detail: str = "") -> str:
    """The progress indicator: a bar (when there is a count) and one line of numbers."""
    bar = ""
    if done is not None and total:
        bar = f'<progress class="kfx-progress" value="{done}" max="{total}"></progress> '
    text = f"<b>{title}</b>" + (f" &middot; {detail}" if detail else "")
    return f'<div class="kfx-status">{bar}{text}</div>'


def _step_detail(step: Progress, seconds: float) -> str:
    rate = step.done / seconds if seconds > 0 else 0.0
    return (
        f"{step.done:,} / {step.total:,} positions &middot; {seconds:.2f} s &middot; {rate:,.0f} positions/s"
    )


def _side(pair: tuple[int, int]) -> str:
    """A (h, w) pair as the page shows it: one number when square."""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _approximate_label(settings: MapSettings) -> str:
    parts = [f"tau {float(settings.tau):g}"]
    if settings.drill_down:
        if settings.drill_rule == "adaptive":
            parts.append(f"drill-down t {float(settings.target_speedup):g}")
        else:
            parts.append(
                f"drill-down {settings.drill_rule} r {float(settings.fraction):g}, t {float(settings.target_speedup):g}"
            )
    return f"{APPROXIMATE} ({'; '.join(parts)})"


def runs_table(records: list[RunRecord]) -> list[list]:
    """Rows of the runs table.

    Speedup vs naive compares map cells delivered per second with the latest naive run on the same
    image, input size, patch, stride and fill: for exact runs that is throughput on the same
    positions; a drill-down run fills every cell from fewer queries, and gets credit for that.
    """
    rows = []
    for number, record in enumerate(records, start=1):
        naive = next(
            (
                r
                for r in reversed(records)
                if r.kind == NAIVE and r.comparison_key == record.comparison_key and r.positions_per_second
            ),
            None,
        )
        rate = record.positions_per_second
        speedup = "-"
        if naive and record.cells_per_second:
            speedup = f"{record.cells_per_second / naive.cells_per_second:.2f}x"
        rows.append(
            [
                number,
                record.mode,
                record.image,
                record.patch_stride,
                "-" if record.positions is None else f"{record.positions:,}",
                f"{record.seconds:.2f}",
                "-" if rate is None else f"{rate:,.0f}",
                speedup,
            ]
        )
    return rows


def runs_table_html(records: list[RunRecord]) -> str:
    """The runs table as HTML (one header row, one row per finished run)."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in RUN_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in runs_table(records)
    )
    caption = "<caption>Runs</caption>" if records else "<caption>Runs: none yet</caption>"
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
