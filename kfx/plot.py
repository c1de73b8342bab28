"""Heat maps as pictures and as per-pixel maps (matplotlib only when drawing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["to_pixels", "plot", "save"]


def to_pixels(heatmap) -> torch.Tensor:
    """Captum-style per-pixel map [H, W]: the mean, over the windows covering each pixel, of
    (base probability - occluded probability). Pixels no evaluated window covers (a remainder at the
    bottom/right when (H - patch) is not a multiple of the stride, or outside a selection) get 0."""
    height, width = heatmap.image_size
    evaluated = heatmap.evaluated.double()[None, None]
    drops = (heatmap.base - heatmap.values.double()).nan_to_num(0.0)[None, None]
    ones = torch.ones(1, 1, *heatmap.patch.size, dtype=torch.float64)
    sums = F.conv_transpose2d(drops, ones, stride=heatmap.patch.stride)
    counts = F.conv_transpose2d(evaluated, ones, stride=heatmap.patch.stride)
    pad = (0, width - sums.shape[-1], 0, height - sums.shape[-2])
    sums, counts = F.pad(sums, pad), F.pad(counts, pad)
    return (sums / counts.clamp_min(1))[0, 0].to(heatmap.values.dtype)


def _nan_or(value: torch.Tensor, default: float) -> float:
    """A reduction's value, or ``default`` when every cell was NaN (nothing evaluated yet)."""
    value = float(value)
    return default if value != value else value


def _displayable(image: torch.Tensor):
    image = image.detach().cpu().double()
    if image.dim() == 4:
        image = image[0]
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()


def plot(
    heatmap, image: torch.Tensor | None = None, *, ax=None, label: str | None = None, alpha: float = 0.5
):
    """Draw the heat map (over ``image`` if given) with a colour bar of the target's probability.

    Each value is drawn over its patch's centre, so the map lines up with the image. Low
    probability (red under ``jet_r``) marks what the prediction relies on. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    height, width = heatmap.image_size
    (ph, pw), (sh, sw) = heatmap.patch.size, heatmap.patch.stride
    h_m, w_m = heatmap.values.shape
    extent = (pw / 2 - sw / 2, pw / 2 + (w_m - 0.5) * sw, ph / 2 + (h_m - 0.5) * sh, ph / 2 - sh / 2)
    if image is not None:
        ax.imshow(_displayable(image), extent=(0, width, height, 0), cmap="gray")
    shown = ax.imshow(
        heatmap.values.numpy(),
        cmap="jet_r",
        alpha=alpha if image is not None else 1.0,
        extent=extent,
        interpolation="bilinear",
        vmin=_nan_or(heatmap.values.nanquantile(0.0), 0.0),
        vmax=max(heatmap.base, _nan_or(heatmap.values.nanquantile(1.0), heatmap.base)),
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    name = label if label is not None else f"class {heatmap.target}"
    ax.set_title(f"{name}: p = {heatmap.base:.3f} unoccluded\npatch {ph}x{pw}, stride {sh}x{sw}")
    ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=f"P({name}) with the patch here")
    return ax


def save(
    heatmap, path, image: torch.Tensor | None = None, *, label: str | None = None, dpi: int = 120
) -> None:
    """Write :func:`plot`'s picture to ``path`` (PNG, PDF, ... by extension)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    plot(heatmap, image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
