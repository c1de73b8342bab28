"""Pictures of signal and volume heat maps (matplotlib only when drawing).

A volume's picture is three orthogonal slices through the most important voxel (the largest drop
in :meth:`Heatmap.to_pixels`), the map laid over the volume's first channel; a signal's is a line
plot of its first channels with the map under them. Both draw the per-sample (per-voxel) drop in
the target's probability on a diverging scale: red marks what the prediction relies on (as in
:mod:`kfx.plot`), blue what lowers it, white what does not matter.
"""

from __future__ import annotations

import torch

from kfx.plot import _figure, _short

__all__ = [
    "most_important",
    "plot_volume",
    "save_volume",
    "plot_signal",
    "save_signal",
    "VOLUME_FIGSIZE",
    "SIGNAL_FIGSIZE",
    "SIGNAL_CHANNELS",
]

VOLUME_FIGSIZE = (12.0, 4.6)  # inches: three slices and a colour bar in a row
SIGNAL_FIGSIZE = (10.0, 7.0)  # inches: up to SIGNAL_CHANNELS channel rows and the map
SIGNAL_CHANNELS = 4  # channels drawn (e.g. the first 4 of 12 leads); the map covers all of them


def most_important(pixels: torch.Tensor) -> tuple[int, ...]:
    """The index of the largest drop in a per-pixel map (the first one in C order on a tie)."""
    flat = int(torch.argmax(pixels.detach().cpu().double().nan_to_num(float("-inf"))))
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), pixels.shape))


DROP_COLOURS = "RdBu_r"  # red: occluding lowers the probability; blue: it raises it; white: no change


def _drop_range(pixels: torch.Tensor) -> tuple[float, float]:
    """Colour limits of a drop map, symmetric about 0 so that white is "no change"."""
    largest = max(float(pixels.abs().max()), 1e-12)
    return -largest, largest


def _unit(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().cpu().double()
    return (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)


def _title(heatmap, name: str) -> str:
    patch = "x".join(map(str, heatmap.patch.size))
    stride = "x".join(map(str, heatmap.patch.stride))
    return f"{name}: p = {heatmap.base:.3f} unoccluded; patch {patch}, stride {stride}"


def plot_volume(
    heatmap,
    volume: torch.Tensor,
    fig,
    *,
    label: str | None = None,
    axis_names: tuple[str, str, str] = ("D", "H", "W"),
    spacing: tuple[float, float, float] | None = None,
    alpha: float = 0.5,
) -> tuple[int, int, int]:
    """Draw three orthogonal slices of ``volume`` [C, D, H, W] (its first channel, in gray) through
    the voxel of largest drop, with the per-voxel map over them, on ``fig``. ``spacing`` (voxel
    sizes, e.g. a NIfTI header's) gives true proportions. Returns the voxel."""
    pixels = heatmap.to_pixels().detach().cpu().double()
    gray = _unit(volume[0])
    voxel = most_important(pixels)
    spacing = spacing or (1.0, 1.0, 1.0)
    low, high = _drop_range(pixels)
    name = label if label is not None else f"class {heatmap.target}"
    grid = fig.add_gridspec(1, 4, width_ratios=(1, 1, 1, 0.05))
    for axis in range(3):
        rows, columns = (a for a in range(3) if a != axis)
        ax = fig.add_subplot(grid[0, axis])
        aspect = spacing[rows] / spacing[columns]
        ax.imshow(gray.select(axis, voxel[axis]).numpy(), cmap="gray", aspect=aspect, interpolation="nearest")
        shown = ax.imshow(
            pixels.select(axis, voxel[axis]).numpy(),
            cmap=DROP_COLOURS,
            alpha=alpha,
            vmin=low,
            vmax=high,
            aspect=aspect,
            interpolation="nearest",
        )
        ax.axhline(voxel[rows], color="white", linewidth=0.8, linestyle="--")
        ax.axvline(voxel[columns], color="white", linewidth=0.8, linestyle="--")
        ax.set_title(f"{axis_names[axis]} = {voxel[axis]}")
        ax.set_ylabel(axis_names[rows])
        ax.set_xlabel(axis_names[columns])
        ax.tick_params(labelsize=7)
    bar = fig.colorbar(shown, cax=fig.add_subplot(grid[0, 3]))
    bar.solids.set_alpha(1.0)
    bar.set_label(f"drop in P({_short(name)}) when occluded")
    where = ", ".join(f"{n} = {v}" for n, v in zip(axis_names, voxel))
    fig.suptitle(f"{_title(heatmap, name)}\nslices through the largest drop ({where})")
    return voxel


def save_volume(heatmap, path, volume: torch.Tensor, *, dpi: int = 100, **kwargs) -> tuple[int, int, int]:
    """Write :func:`plot_volume`'s picture (VOLUME_FIGSIZE at ``dpi``) to ``path``; returns the voxel."""
    fig = _figure(VOLUME_FIGSIZE)
    voxel = plot_volume(heatmap, volume, fig, **kwargs)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return voxel


def plot_signal(heatmap, signal: torch.Tensor, fig, *, label: str | None = None, alpha: float = 0.35) -> None:
    """Draw the first SIGNAL_CHANNELS channels of ``signal`` [C, L], each over a colour band of the
    per-sample map, and the map itself (the drop in probability) under them, on ``fig``."""
    pixels = heatmap.to_pixels().detach().cpu().double()
    values = signal.detach().cpu().double()
    channels, length = values.shape
    shown_channels = min(channels, SIGNAL_CHANNELS)
    low, high = _drop_range(pixels)
    name = label if label is not None else f"class {heatmap.target}"
    grid = fig.add_gridspec(shown_channels + 1, 1, height_ratios=(1,) * shown_channels + (1.4,))
    axes = []
    for channel in range(shown_channels):
        ax = fig.add_subplot(grid[channel, 0], sharex=axes[0] if axes else None)
        lowest, highest = float(values[channel].min()), float(values[channel].max())
        margin = max(highest - lowest, 1e-12) * 0.05
        ax.imshow(
            pixels[None].numpy(),
            cmap=DROP_COLOURS,
            alpha=alpha,
            vmin=low,
            vmax=high,
            aspect="auto",
            extent=(-0.5, length - 0.5, lowest - margin, highest + margin),
            interpolation="nearest",
        )
        ax.plot(range(length), values[channel].numpy(), color="black", linewidth=0.7)
        ax.set_ylabel(f"channel {channel}", fontsize=8)
        ax.tick_params(labelbottom=False, labelsize=7)
        axes.append(ax)
    ax = fig.add_subplot(grid[shown_channels, 0], sharex=axes[0])
    ax.plot(range(length), pixels.numpy(), color="tab:red", linewidth=1.0)
    ax.fill_between(range(length), pixels.numpy(), 0.0, color="tab:red", alpha=0.3)
    ax.axhline(0.0, color="gray", linewidth=0.5)
    ax.set_xlim(-0.5, length - 0.5)
    ax.set_ylabel(f"drop in\nP({_short(name, 20)})", fontsize=8)
    ax.set_xlabel("sample")
    ax.tick_params(labelsize=7)
    which = f"channels 0-{shown_channels - 1} of {channels}" if shown_channels < channels else ""
    heading = f"{_title(heatmap, name)}\nmap: drop when occluded (red: what the prediction relies on, blue: what lowers it)"
    fig.suptitle(f"{heading}; {which}" if which else heading)


def save_signal(heatmap, path, signal: torch.Tensor, *, dpi: int = 100, **kwargs) -> None:
    """Write :func:`plot_signal`'s picture (SIGNAL_FIGSIZE at ``dpi``) to ``path``."""
    fig = _figure(SIGNAL_FIGSIZE)
    plot_signal(heatmap, signal, fig, **kwargs)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
