"""``kfx report``: one self-contained HTML page about a results folder of :func:`kfx.explain_dataset`.

>>> kfx.report.write_report("maps/")        # writes maps/report.html  # doctest: +SKIP

The page holds counts and the configuration, the error rows, the mean map per explained class, the
images whose maps put the largest share of their drop outside the central region (a spurious-cue
finder), and a table of every input that sorts by any column. Every picture is an inline PNG and
the table sorts with a few lines of inline script, so the page opens offline; its
Content-Security-Policy forbids loading anything else.

**Drop maps.** A row's map holds the target's probability with the patch at each grid position;
the report works on the per-pixel drop, :meth:`kfx.Heatmap.to_pixels` (the mean over the windows
covering a pixel of base probability minus occluded probability), so every map is in the model
input's pixels. One configuration has one input shape, patch and stride, so all its maps have the
same shape and are averaged pixel by pixel, without resizing.

**Outside share (the spurious-cue proxy).** The results hold no object masks, so "outside the
object" is approximated by "outside the central region": the central box leaves a band of
``border`` x the side (rounded to pixels) on each edge. The score is the share of the map's
positive drop (pixels where occlusion lowered the probability; increases are not evidence) lying
in that band: 1 means all of it is at the border, 0 none. A map whose drop is spread evenly scores
the band's share of the area (0.64 for the default 0.2). A map without any positive drop has no
score. This finds images to look at, not verdicts: an off-centre or frame-filling object scores
high with no spurious cue at all.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kfx import _dataset_io as dataset_io
from kfx.errors import InputError

__all__ = ["write_report", "drop_pixels", "outside_mask", "outside_share", "DEFAULT_BORDER"]

DEFAULT_BORDER = 0.2  # the band's width on each edge, as a fraction of the side
DEFAULT_TOP = 12  # images shown by the spurious-cue finder
DEFAULT_CLASSES = 24  # mean maps shown (the most frequent classes)
REPORT_FILE = "report.html"


# -- the numbers ---------------------------------------------------------------------------------


def drop_pixels(row) -> np.ndarray:
    """A result row's per-pixel drop [H, W] (float64): base probability minus occluded probability,
    averaged over the evaluated windows covering each pixel, 0 where none does: the values of
    :meth:`kfx.Heatmap.to_pixels`. With every window a box, the sums are two small matrix products
    (coverage of rows x map x coverage of columns), about a hundred times faster at 224 pixels than
    to_pixels' transposed convolution, which matters over thousands of rows."""
    values = np.asarray(row["map"], dtype=np.float64).reshape(tuple(int(v) for v in row["map_shape"]))
    evaluated = ~np.isnan(values)
    drops = np.where(evaluated, float(row["base_probability"]) - values, 0.0)
    (height, width), (patch_h, patch_w), (stride_h, stride_w) = (
        (int(a), int(b)) for a, b in (row["image_size"], row["patch"], row["stride"])
    )
    rows = _coverage(height, values.shape[0], patch_h, stride_h)
    cols = _coverage(width, values.shape[1], patch_w, stride_w)
    sums = rows @ drops @ cols.T
    counts = rows @ evaluated.astype(np.float64) @ cols.T
    return sums / np.maximum(counts, 1.0)


def _coverage(side: int, positions: int, patch: int, stride: int) -> np.ndarray:
    """[side, positions]: 1 where pixel y lies in window i (i * stride <= y < i * stride + patch)."""
    pixel = np.arange(side)[:, None]
    start = np.arange(positions)[None, :] * stride
    return ((pixel >= start) & (pixel < start + patch)).astype(np.float64)


def outside_mask(shape: tuple[int, int], border: float = DEFAULT_BORDER) -> np.ndarray:
    """Bool [H, W]: True in the band of ``round(border * side)`` pixels along each edge."""
    _check_border(border)
    height, width = shape
    band_h, band_w = round(border * height), round(border * width)
    mask = np.ones((height, width), dtype=bool)
    mask[band_h : height - band_h, band_w : width - band_w] = False
    return mask


def outside_share(drops: np.ndarray, mask: np.ndarray) -> float:
    """The share of the positive drop in ``drops`` lying where ``mask`` is True; NaN without any."""
    positive = np.clip(drops, 0.0, None)
    total = float(positive.sum())
    return float(positive[mask].sum()) / total if total > 0 else float("nan")


def _check_border(border: float) -> None:
    if isinstance(border, bool) or not isinstance(border, (int, float)) or not 0 < border < 0.5:
        raise InputError(f"border must be a fraction in (0, 0.5) of the side, got {border!r}")


@dataclass
class ClassMean:
    """The running sum of one explained class's drop maps."""

    target: int
    label: str
    count: int = 0
    requested: int = 0  # rows whose source named this class (the others predicted it)
    total: np.ndarray | None = None

    def add(self, drops: np.ndarray, requested: bool) -> None:
        self.total = drops.copy() if self.total is None else self.total + drops
        self.count += 1
        self.requested += int(requested)


def _scores(frame, border: float):
    """Per-row numbers (max/mean drop on the grid, outside share) and the class means."""
    max_drop, mean_drop, outside, classes, mask = [], [], [], {}, None
    for _, row in frame.iterrows():
        if row["status"] != "ok":
            for column in (max_drop, mean_drop, outside):
                column.append(np.nan)
            continue
        values = np.asarray(row["map"], dtype=np.float64)
        base = float(row["base_probability"])
        max_drop.append(base - np.nanmin(values))
        mean_drop.append(base - np.nanmean(values))
        drops = drop_pixels(row)
        if mask is None:
            mask = outside_mask(drops.shape, border)
        outside.append(outside_share(drops, mask))
        target = int(row["target"])
        entry = classes.setdefault(target, ClassMean(target, str(row["label"])))
        entry.add(drops, isinstance(row["requested_target"], str))
    scores = frame.copy()
    scores["max_drop"], scores["mean_drop"], scores["outside"] = max_drop, mean_drop, outside
    return scores, sorted(classes.values(), key=lambda c: (-c.count, c.target))


def suspects(scores, top: int):
    """The ``top`` ok rows with the largest outside share (ties: by path); rows without one last."""
    ranked = scores[scores["outside"].notna()].sort_values(["outside", "path"], ascending=[False, True])
    return ranked.head(top)


# -- reading the folder ---------------------------------------------------------------------------


def _results(folder: Path, fingerprint: str | None):
    """The latest rows of the one configuration under ``folder``, with its config.json."""
    from kfx.dataset import read_results

    if not folder.exists():
        raise InputError(f"{folder}: no such folder; give the --out folder of a kfx batch run")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give the --out folder of a kfx batch run")
    found = dataset_io.configurations(folder)
    if fingerprint is not None:
        found = [(f, c) for f, c in found if c.get("fingerprint", "").startswith(fingerprint)]
    if len(found) > 1:
        listed = ", ".join(c.get("fingerprint", "?")[:16] for _, c in found)
        raise InputError(
            f"{folder} holds results of {len(found)} configurations ({listed}); "
            "pick one with --fingerprint PREFIX (fingerprint= in Python)"
        )
    frame = read_results(folder, fingerprint)
    if frame.empty:
        raise InputError(f"{folder}: no result rows yet (the run wrote none); run kfx batch first")
    return frame, found[0][1]


# -- pictures --------------------------------------------------------------------------------------


def _png(draw, figsize: tuple[float, float]) -> str:
    """What ``draw(ax)`` draws, as a data: URL of a PNG (rendered off-screen, outside pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _drop_picture(drops: np.ndarray, image: np.ndarray | None, mask: np.ndarray | None):
    """A drawing function: the drop map (over the gray image if given), the central box dashed."""

    def draw(ax):
        height, width = drops.shape
        if image is not None:
            ax.imshow(image, cmap="gray", extent=(0, width, height, 0))
        shown = ax.imshow(
            drops, cmap="jet", alpha=0.55 if image is not None else 1.0, extent=(0, width, height, 0)
        )
        if mask is not None:
            rows, cols = np.nonzero(~mask)
            if rows.size:
                box = (cols.min(), rows.min()), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()
                ax.add_patch(_rectangle(*box))
        ax.set_axis_off()
        ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="drop")

    return draw


def _rectangle(corner, width, height):
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, height, fill=False, edgecolor="white", linestyle="--", linewidth=1.5)


def _gray_image(row) -> tuple[np.ndarray | None, str]:
    """The row's image as the model saw it (resized, centre-cropped), in gray; or None and why not."""
    from kfx.models import read_pixels, resize_crop

    path = row["path"]
    try:
        if dataset_io.content_hash(path) != row["content_hash"]:
            return None, "the file changed since the run: map alone"
        pixels = resize_crop(read_pixels(path), int(row["image_size"][0]))
    except Exception as exc:  # a moved or unreadable file: the map is still worth showing
        return None, f"image not readable now ({type(exc).__name__}): map alone"
    gray = (pixels * pixels.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    return gray.numpy(), ""


# -- the page ----------------------------------------------------------------------------------------


def _text(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value, digits: int = 4) -> tuple[str, str]:
    """(shown, sort key) for a number cell; a missing value shows a dash and sorts last."""
    if value is None or value != value:
        return "–", ""
    return f"{value:.{digits}f}", repr(float(value))


def _short_paths(paths) -> dict[str, str]:
    """Each path relative to the paths' common folder (the full path goes in a tooltip)."""
    paths = list(paths)
    try:
        common = os.path.commonpath(paths) if paths else ""
    except ValueError:  # mixed absolute and relative, or different drives
        common = ""
    if len(paths) == 1 or common in paths:
        common = os.path.dirname(common)
    return {p: os.path.relpath(p, common) if common else p for p in paths}


def _class_text(row) -> str:
    requested = " (requested)" if isinstance(row["requested_target"], str) else ""
    return f"{int(row['target'])} · {row['label']}{requested}"


def _counts_section(scores, config: dict, folder: Path) -> str:
    ok = int((scores["status"] == "ok").sum())
    errors = len(scores) - ok
    classes = scores.loc[scores["status"] == "ok", "target"].nunique()
    requested = int(scores["requested_target"].map(lambda t: isinstance(t, str)).sum())
    items = [
        ("inputs", len(scores)),
        ("explained (ok)", ok),
        ("errors", errors),
        ("classes explained", classes),
        ("rows with a requested target", requested),
    ]
    counts = "".join(
        f'<div class="count"><b id="count-{i}">{v}</b>{_text(k)}</div>' for i, (k, v) in enumerate(items)
    )
    setting = (
        f"model {config.get('model')}, input {config.get('input_shape')}, patch {config.get('patch')}, "
        f"stride {config.get('stride')}, fill {config.get('fill')}, tau {config.get('tau')}, "
        f"kfx {config.get('kfx_version')}, fingerprint {str(config.get('fingerprint', '?'))[:16]}"
    )
    return (
        f'<section id="counts"><h2>Counts</h2><div class="counts">{counts}</div>'
        f"<p>Results in <code>{_text(folder)}</code>; {_text(setting)}.</p>{_approximate_note(config)}</section>"
    )


def _approximate_note(config: dict) -> str:
    """Say so when this configuration's maps are approximate: drill-down (only some cells queried,
    the rest filled in) or projective-field thresholding (tau < 1)."""
    reasons = []
    if config.get("drill_down"):
        settings = ", ".join(f"{k}={v}" for k, v in config["drill_down"].items())
        reasons.append(f"drill-down ({settings}): only some cells were queried, the rest are filled in")
    if float(config.get("tau", 1.0) or 1.0) < 1.0:
        reasons.append(f"tau {config['tau']} < 1: changes outside each layer's capped box are dropped")
    if not reasons:
        return ""
    return f'<p id="approximate"><b>Approximate maps</b>: {_text("; ".join(reasons))}.</p>'


def _errors_section(scores, short: dict[str, str]) -> str:
    errors = scores[scores["status"] != "ok"]
    if errors.empty:
        return '<section id="errors"><h2>Errors</h2><p>None: every input was explained.</p></section>'
    rows = "".join(
        f'<tr><td title="{_text(p)}">{_text(short[p])}</td><td>{_text(e)}</td></tr>'
        for p, e in zip(errors["path"], errors["error"])
    )
    return (
        f'<section id="errors"><h2>Errors ({len(errors)})</h2>'
        f"<table><thead><tr><th>image</th><th>error</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _classes_section(classes: list[ClassMean], limit: int) -> str:
    if not classes:
        return '<section id="classes"><h2>Mean map per class</h2><p>No explained image.</p></section>'
    shown = classes[:limit]
    figures = []
    for entry in shown:
        mean = entry.total / entry.count
        picture = _png(_drop_picture(mean, None, None), (3.2, 2.6))
        requested = f", {entry.requested} requested" if entry.requested else ""
        caption = f"{entry.target} · {entry.label}: {entry.count} images{requested}"
        figures.append(
            f'<figure class="class-mean" data-target="{entry.target}" data-count="{entry.count}">'
            f'<img src="{picture}" alt="{_text(caption)}"><figcaption>{_text(caption)}</figcaption></figure>'
        )
    more = f" The {len(classes) - limit} rarer classes are not drawn." if len(classes) > limit else ""
    return (
        '<section id="classes"><h2>Mean map per class</h2><p>The mean per-pixel drop of the images '
        "explained for each class (the predicted class, unless the source named a target), most "
        f"frequent first; every map of one configuration has the same shape, so no resizing.{more}</p>"
        f'<div class="figures">{"".join(figures)}</div></section>'
    )


def _suspects_section(scores, top: int, border: float, short: dict[str, str]) -> str:
    ranked = suspects(scores, top)
    if ranked.empty:
        return '<section id="suspects"><h2>Drop outside the centre</h2><p>No map has a positive drop.</p></section>'
    mask = outside_mask(tuple(int(s) for s in ranked.iloc[0]["image_size"]), border)
    figures = []
    for rank, (_, row) in enumerate(ranked.iterrows(), start=1):
        image, note = _gray_image(row)
        picture = _png(_drop_picture(drop_pixels(row), image, mask), (3.2, 2.6))
        caption = f"{rank}. {short[row['path']]}: {row['outside']:.3f} outside; {_class_text(row)}"
        figures.append(
            f'<figure class="suspect" data-path="{_text(row["path"])}" data-outside="{row["outside"]!r}">'
            f'<img src="{picture}" alt="{_text(caption)}"><figcaption>{_text(caption)}'
            f"{'<br><i>' + _text(note) + '</i>' if note else ''}</figcaption></figure>"
        )
    evenly = float(mask.mean())
    return (
        f'<section id="suspects"><h2>Drop outside the centre (top {len(ranked)})</h2><p>The share of '
        f"each map's positive drop lying in the band of {border:g} x the side along the edges (outside "
        f"the dashed box). A map spread evenly scores {evenly:.2f}. Without object masks this is a "
        "proxy for drop outside the object: it finds images worth a look (a watermark, a border, "
        "background), and also flags objects that are off-centre or fill the frame.</p>"
        f'<div class="figures">{"".join(figures)}</div></section>'
    )


COLUMNS = (  # (heading, sort type)
    ("image", "text"),
    ("status", "text"),
    ("class", "text"),
    ("probability", "number"),
    ("max drop", "number"),
    ("mean drop", "number"),
    ("outside share", "number"),
    ("error", "text"),
)


def _table_section(scores, short: dict[str, str]) -> str:
    heads = "".join(
        f'<th data-type="{kind}"><button type="button">{_text(name)}</button></th>' for name, kind in COLUMNS
    )
    rows = []
    for _, row in scores.iterrows():
        ok = row["status"] == "ok"
        cells = [
            f'<td title="{_text(row["path"])}" data-sort="{_text(row["path"])}">{_text(short[row["path"]])}</td>',
            f"<td>{_text(row['status'])}</td>",
            f"<td>{_text(_class_text(row)) if ok else ''}</td>",
        ]
        for name in ("base_probability", "max_drop", "mean_drop", "outside"):
            shown, key = _number(row[name] if ok else None)
            cells.append(f'<td class="num" data-sort="{key}">{shown}</td>')
        cells.append(f"<td>{_text(row['error']) if not ok else ''}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<section id="all"><h2>Every input</h2><p>Click a heading to sort by it (again to reverse); '
        "max and mean drop are base probability minus the lowest and the mean occluded probability "
        "on the grid.</p>"
        f'<table id="results" class="sortable"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
.counts { display: flex; gap: 1.5em; } .count b { display: block; font-size: 1.6em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: 320px; } figure img { width: 320px; } figcaption { font-size: 12px; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: bold; border: 0; background: none; cursor: pointer; padding: 0; }
th[aria-sort=ascending] button::after { content: " ▲"; } th[aria-sort=descending] button::after { content: " ▼"; }
"""

# Sorts the table by the clicked column; cells sort by data-sort when they have one. Empty values
# go last in both directions; Array.prototype.sort is stable, so equal keys keep their order.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach((table) => {
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((head, column) => head.querySelector("button").addEventListener("click", () => {
    const ascending = head.getAttribute("aria-sort") !== "ascending";
    heads.forEach((h) => h.removeAttribute("aria-sort"));
    head.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const numeric = head.dataset.type === "number";
    const key = (row) => { const cell = row.cells[column]; return cell.dataset.sort ?? cell.textContent; };
    const order = (a, b) => {
      if (a === "" || b === "") return (a === "") - (b === "");
      const difference = numeric ? Number(a) - Number(b) : a.localeCompare(b);
      return ascending ? difference : -difference;
    };
    const body = table.tBodies[0];
    body.append(...Array.from(body.rows).sort((a, b) => order(key(a), key(b))));
  }));
});
"""

POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _page(title: str, sections: list[str]) -> str:
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{_text(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_text(title)}</h1><p>Written by kfx report on {made}.</p>"
        f"{''.join(sections)}<script>{SCRIPT}</script></body></html>\n"
    )


def write_report(
    results,
    path=None,
    *,
    fingerprint: str | None = None,
    border: float = DEFAULT_BORDER,
    top: int = DEFAULT_TOP,
    classes: int = DEFAULT_CLASSES,
) -> Path:
    """Write the HTML page about the results folder ``results`` to ``path`` (default
    ``results/report.html``) and return where it went. ``fingerprint`` picks a configuration in a
    folder holding several; ``border`` is the band of the outside share; ``top`` images are shown by
    the spurious-cue finder and ``classes`` mean maps are drawn (the most frequent classes)."""
    _check_border(border)
    for name, value in (("top", top), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    folder = Path(results)
    frame, config = _results(folder, fingerprint)
    scores, class_means = _scores(frame, border)
    short = _short_paths(scores["path"])
    sections = [
        _counts_section(scores, config, folder),
        _errors_section(scores, short),
        _classes_section(class_means, classes),
        _suspects_section(scores, top, border, short),
        _table_section(scores, short),
    ]
    text = _page(f"kfx report: {folder.resolve().name}", sections)
    target = Path(path) if path is not None else folder / REPORT_FILE
    dataset_io.write_atomic(target, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return target
