"""Heat maps as pictures and as per-pixel maps (matplotlib only when drawing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["to_pixels", "plot", "save", "plot_mask", "save_mask", "gallery", "picture"]


def to_pixels(heatmap) -> torch.Tensor:
    """Captum-style per-pixel map (the image's spatial shape, e.g. [H, W]): the mean, over the
    windows covering each pixel, of (base probability - occluded probability). Pixels no evaluated
    window covers (a remainder at the bottom/right when (H - patch) is not a multiple of the stride,
    or outside a selection) get 0. Signals and volumes work the same way along every axis."""
    size = tuple(heatmap.image_size)
    evaluated = heatmap.evaluated.double()[None, None]
    drops = (heatmap.base - heatmap.values.double()).nan_to_num(0.0)[None, None]
    ones = torch.ones(1, 1, *heatmap.patch.size, dtype=torch.float64)
    spread = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(size) - 1]
    sums = spread(drops, ones, stride=heatmap.patch.stride)
    counts = spread(evaluated, ones, stride=heatmap.patch.stride)
    # F.pad starts at the last axis: (after-padding of the last axis first, then the one before).
    pad = [v for axis in reversed(range(len(size))) for v in (0, size[axis] - sums.shape[2 + axis])]
    sums, counts = F.pad(sums, pad), F.pad(counts, pad)
    return (sums / counts.clamp_min(1))[0, 0].to(heatmap.values.dtype)


def _nan_or(value: torch.Tensor, default: float) -> float:
    """A reduction's value, or ``default`` when every cell was NaN (nothing evaluated yet)."""
    value = float(value)
    return default if value != value else value


def _displayable(image: torch.Tensor, *, gray: bool = False):
    """An image tensor [C, H, W] (any range) as a NumPy picture scaled to [0, 1]; ``gray`` gives
    its luminance, so that an overlay's colours come from the map alone."""
    image = image.detach().cpu().double()
    if image.dim() == 4:
        image = image[0]
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    if image.shape[0] != 3:
        return image[0].numpy()
    if gray:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
        return (image * weights).sum(0).numpy()
    return image.permute(1, 2, 0).numpy()


def _short(label: str, limit: int = 28) -> str:
    """A class name short enough for a colour-bar label: its first synonym, clipped."""
    first = label.split(",")[0].strip() or label
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _opaque_colorbar(ax, shown, label: str):
    """A colour bar whose colours are not washed out by the overlay's alpha."""
    bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=label)
    bar.solids.set_alpha(1.0)
    return bar


def plot(
    heatmap,
    image: torch.Tensor | None = None,
    *,
    ax=None,
    label: str | None = None,
    alpha: float = 0.5,
    title: str | None = None,
):
    """Draw the heat map (over ``image`` if given) with a colour bar of the target's probability.

    Each value is drawn over its patch's centre, so the map lines up with the image. The image is
    shown in gray so the colours are the map's own. Low probability (red under ``jet_r``) marks what
    the prediction relies on; a black line on the colour bar marks the unoccluded probability.
    ``title`` replaces the default title (label, probability, patch and stride). Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    height, width = heatmap.image_size
    (ph, pw), (sh, sw) = heatmap.patch.size, heatmap.patch.stride
    h_m, w_m = heatmap.values.shape
    extent = (pw / 2 - sw / 2, pw / 2 + (w_m - 0.5) * sw, ph / 2 + (h_m - 0.5) * sh, ph / 2 - sh / 2)
    if image is not None:
        ax.imshow(_displayable(image, gray=True), extent=(0, width, height, 0), cmap="gray")
    values = heatmap.values.detach().cpu().float()  # float16/bfloat16 maps: no quantile, no NumPy
    shown = ax.imshow(
        values.numpy(),
        cmap="jet_r",
        alpha=alpha if image is not None else 1.0,
        extent=extent,
        interpolation="bilinear",
        vmin=_nan_or(values.nanquantile(0.0), 0.0),
        vmax=max(heatmap.base, _nan_or(values.nanquantile(1.0), heatmap.base)),
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    name = label if label is not None else f"class {heatmap.target}"
    if title is None:
        title = f"{name}: p = {heatmap.base:.3f} unoccluded\npatch {ph}x{pw}, stride {sh}x{sw}"
    ax.set_title(title)
    bar = _opaque_colorbar(ax, shown, f"P({_short(name)}) with the patch here (line: unoccluded)")
    bar.ax.axhline(heatmap.base, color="black", linewidth=2)
    return ax


def plot_mask(
    mask: torch.Tensor,
    image: torch.Tensor | None = None,
    *,
    ax=None,
    label: str | None = None,
    base: float | None = None,
    steps: int | None = None,
    alpha: float = 0.5,
    title: str | None = None,
):
    """Draw a NeuroMask mask [H, W] (over ``image`` if given) with a colour bar, in the look of
    :func:`plot`: gray image, ``jet`` colours, red where the mask is 1 (what the prediction relies
    on, as red marks it in the occlusion map). ``base`` is the class's probability, shown in the
    title with ``label`` and ``steps``. Returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    values = mask.detach().cpu().float()
    height, width = values.shape
    if image is not None:
        ax.imshow(_displayable(image, gray=True), extent=(0, width, height, 0), cmap="gray")
    shown = ax.imshow(
        values.numpy(),
        cmap="jet",
        alpha=alpha if image is not None else 1.0,
        extent=(0, width, height, 0),
        interpolation="nearest",
        vmin=0.0,
        vmax=1.0,
    )
    ax.axis("off")
    if title is None:
        name = label if label is not None else "the predicted class"
        probability = f": p = {base:.3f} unoccluded" if base is not None else ""
        method = f"NeuroMask, {steps} steps" if steps is not None else "NeuroMask"
        title = f"{name}{probability}\n{method}"
    ax.set_title(title)
    _opaque_colorbar(ax, shown, "mask weight (1 = the prediction relies on it)")
    return ax


def _figure(figsize: tuple[float, float], dpi: float | None = None):
    """A matplotlib Figure outside pyplot: no global state, no window, safe in worker threads."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def picture(draw, *, figsize: tuple[float, float] = (6, 5), dpi: int = 100):
    """What ``draw(ax)`` draws on a fresh Axes, as an RGB array [H, W, 3] of uint8 (e.g. for a web
    page): ``picture(lambda ax: plot_mask(mask, image, ax=ax))``. Rendered off-screen, outside pyplot.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure(figsize, dpi)
    canvas = FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save(
    heatmap, path, image: torch.Tensor | None = None, *, label: str | None = None, dpi: int = 120, **kwargs
) -> None:
    """Write :func:`plot`'s picture to ``path`` (PNG, PDF, ... by extension)."""
    fig = _figure((6, 5))
    plot(heatmap, image, ax=fig.add_subplot(), label=label, **kwargs)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def save_mask(
    mask: torch.Tensor, path, image: torch.Tensor | None = None, *, dpi: int = 120, **kwargs
) -> None:
    """Write :func:`plot_mask`'s picture to ``path`` (PNG, PDF, ... by extension)."""
    fig = _figure((6, 5))
    plot_mask(mask, image, ax=fig.add_subplot(), **kwargs)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def gallery(panels, path, *, title: str | None = None, columns: int | None = None, dpi: int = 110) -> None:
    """Write several heat maps side by side to ``path``, one panel per ``(heatmap, image, label, name)``.

    Each panel is :func:`plot`'s picture titled with the photo's ``name``, the class ``label`` and its
    unoccluded probability; ``title`` goes above them all (e.g. patch, stride and timings).
    ``columns`` defaults to all panels in one row, at most four.
    """
    import math

    panels = list(panels)
    if not panels:
        raise ValueError("a gallery needs at least one panel")
    columns = columns or min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig = _figure((4.8 * columns, 4.3 * rows + (0.6 if title else 0.0)))
    for index, (heatmap, image, label, name) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        plot(heatmap, image, ax=ax, label=label, title=f"{name}: {label}\np = {heatmap.base:.3f} unoccluded")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
