"""The explorer's Results page (``kfx serve --results DIR``): browse a ``kfx batch`` results folder.

One page beside the explorer (Gradio's multipage ``Blocks.route``, at ``/results``): the counts, a
menu of every input, the chosen input's stored map over its image with its numbers, and the table
of every input (sortable in the page). The numbers are those of ``kfx report`` (kfx/report.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kfx import report
from kfx.report import DEFAULT_BORDER

RESULTS_PATH = "results"  # the page's address, after the explorer's own
_text = report._text  # user text (paths, labels, errors) goes into the page as text, not markup


class ResultsBrowser:
    """One results folder, read once: its rows with their report numbers, and each row's picture."""

    def __init__(self, folder, fingerprint: str | None = None, border: float = DEFAULT_BORDER):
        self.folder = Path(folder)
        frame, self.config = report._results(self.folder, fingerprint)
        self.scores, _ = report._scores(frame, border)
        self.border = border
        self.short = report._short_paths(self.scores["path"])

    def choices(self) -> list[tuple[str, int]]:
        """(menu text, row number) for every input, in path order."""
        return [
            (f"{self.short[path]}{'' if status == 'ok' else ' (error)'}", i)
            for i, (path, status) in enumerate(zip(self.scores["path"], self.scores["status"]))
        ]

    def first(self) -> int | None:
        """The row shown first: the spurious-cue finder's top image, else the first row."""
        ranked = report.suspects(self.scores, 1)
        if not ranked.empty:
            return int(ranked.index[0])
        return 0 if len(self.scores) else None

    def counts(self) -> str:
        ok = int((self.scores["status"] == "ok").sum())
        config = self.config
        return (
            f"<h2>Results in {_text(self.folder)}</h2><p>{len(self.scores)} images: {ok} explained, "
            f"{len(self.scores) - ok} errors. Model {_text(config.get('model'))}, patch "
            f"{config.get('patch')}, stride {config.get('stride')}, tau {config.get('tau')}. Outside "
            f"share: the share of the map's positive drop in the band of {self.border:g} x the side "
            "along the edges (outside the dashed box).</p>"
        )

    def table(self):
        """The table of every input, numbers rounded for the page."""
        columns = {
            "image": [self.short[p] for p in self.scores["path"]],
            "status": self.scores["status"],
            "class": [
                report._class_text(r) if r["status"] == "ok" else "" for _, r in self.scores.iterrows()
            ],
            "probability": self.scores["base_probability"],
            "max drop": self.scores["max_drop"],
            "mean drop": self.scores["mean_drop"],
            "outside share": self.scores["outside"],
            "error": self.scores["error"].fillna(""),
        }
        import pandas as pd

        return pd.DataFrame(columns).round(4)

    def show(self, index) -> tuple[np.ndarray | None, str]:
        """Row ``index``'s picture (its map over its image; None for an error row) and its numbers."""
        from kfx.plot import picture

        if index is None:
            return None, "<p>Choose an image.</p>"
        row = self.scores.iloc[int(index)]
        name = f"<b>{_text(self.short[row['path']])}</b>"
        if row["status"] != "ok":
            return None, f"<p>{name}: error: {_text(row['error'])}</p>"
        drops = report.drop_pixels(row)
        image, note = report._gray_image(row)
        mask = report.outside_mask(drops.shape, self.border)
        shown = picture(report._drop_picture(drops, image, mask), figsize=(5, 4))
        share = "none (no positive drop)" if np.isnan(row["outside"]) else f"{row['outside']:.3f}"
        text = (
            f"{name}: class {_text(report._class_text(row))}, probability {row['base_probability']:.4f}, "
            f"max drop {row['max_drop']:.4f}, mean drop {row['mean_drop']:.4f}, outside share {share}"
        )
        return shown, f"<p>{text}{f' ({_text(note)})' if note else ''}</p>"


def add_results_page(app, gr, browser: ResultsBrowser) -> None:
    """Add the Results page to the explorer's ``app`` (call after its ``with gr.Blocks()``)."""
    first = browser.first()
    picture, details = browser.show(first)
    with app.route("Results", f"/{RESULTS_PATH}"):
        gr.HTML(browser.counts(), elem_id="kfx-results-counts")
        with gr.Row():
            with gr.Column(scale=1):
                chosen = gr.Dropdown(
                    browser.choices(), value=first, label="Image", elem_id="kfx-results-image"
                )
                text = gr.HTML(details, elem_id="kfx-results-details")
            with gr.Column(scale=1):
                shown = gr.Image(
                    picture, type="numpy", label="Drop map", interactive=False, elem_id="kfx-results-map"
                )
        gr.Dataframe(browser.table(), interactive=False, label="Every input", elem_id="kfx-results-table")
        chosen.change(browser.show, [chosen], [shown, text], queue=False)
