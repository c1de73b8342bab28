"""What a user gives the explorer, checked: photos (read, sized, cropped), brush strokes turned
into a selection of grid cells, and the page's settings (:class:`MapSettings`, colours, numbers).

Part of the explorer's logic (:mod:`kfx._serve_core` re-exports it); free of any web framework.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import kfx
from kfx.common import DEFAULT_BATCH_SIZE
from kfx.errors import InputError, KfxError
from kfx.models import SAMPLE_PHOTOS, read_pixels, resize_crop, to_rgb_uint8
from kfx.patch import Patch

NAIVE, EXACT, APPROXIMATE, NEUROMASK = "Naive", "Exact", "Approximate", "NeuroMask"
MODES = (NAIVE, EXACT, APPROXIMATE, NEUROMASK)
BRUSH, RECTANGLE = "Brush strokes", "Rectangle around the strokes"
SELECTION_SHAPES = (BRUSH, RECTANGLE)

DISPLAY_SIDE = 384  # the editor shows the model's square crop at this side, whatever the input size
# Each action on a photo resizes it from its full resolution (about 3 s for 4096 x 4096 on 2 CPU
# cores, ten times that for 8000 x 8000), and every session keeps its photo in memory: larger
# uploads are refused from the file's header, before their pixels are decoded.
MAX_PHOTO_PIXELS = 4096 * 4096
# The model input sides the page offers (a model's own size may exceed MAX_INPUT_SIZE).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 512
MAX_BATCH_SIZE = 256
MAX_NEUROMASK_STEPS = 500


@dataclass(frozen=True)
class Photo:
    """An image the user loaded: its name, its pixels [H, W, 3] uint8, and a fingerprint that tells
    runs on the same image apart from runs on another one."""

    name: str
    pixels: np.ndarray = field(repr=False)
    fingerprint: str


@dataclass(frozen=True)
class MapSettings:
    """Everything on the page that shapes one run."""

    mode: str = EXACT
    size: int = 224  # side of the square model input
    patch: int = 16
    stride: int = 4
    fill: str = "#808080"  # patch colour as the user sees it (before the model's normalisation)
    batch_size: int = DEFAULT_BATCH_SIZE
    tau: float = 1.0
    drill_down: bool = False
    drill_rule: str = "adaptive"  # kfx.DrillDown's rule; fraction applies to "lowest" and "paper" only
    fraction: float = 0.25
    target_speedup: float = 3.0
    neuromask_steps: int = 150
    selection_shape: str = BRUSH
    target: int | None = None  # class to explain; None: the predicted one


# -- photos -------------------------------------------------------------------------------------


def make_photo(name: str, pixels: np.ndarray) -> Photo:
    """A :class:`Photo` from pixels, checked to be an RGB(A) or gray image."""
    rgb = to_rgb_uint8(pixels)
    fingerprint = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()[:10]
    return Photo(name, rgb, fingerprint)


def read_photo(path: str, name: str | None = None) -> Photo:
    """A photo from an uploaded file; :class:`kfx.InputError` when it is missing or not an image."""
    path = str(path)
    if not os.path.isfile(path):  # also keeps a bare name from being taken for a scikit-image sample
        raise InputError(f"{os.path.basename(path) or path}: no such image file")
    name = name or os.path.basename(path)
    header = _header_size(path, name)
    if header is not None:
        check_photo_size(name, *header)
    try:
        pixels = read_pixels(path)
    except InputError:
        # read_pixels names the server's temporary copy; the user knows the file by its name
        raise InputError(
            f"{name} is not an image this page can read; upload a PNG, JPEG, GIF, BMP, TIFF or WebP file"
        ) from None
    height, width = np.shape(pixels)[:2]
    check_photo_size(name, width, height)  # a format only read_pixels knows: checked once decoded
    return make_photo(name, pixels)


def check_photo_size(name: str, width: int, height: int) -> None:
    """Refuse a photo of more than :data:`MAX_PHOTO_PIXELS` pixels."""
    if width * height > MAX_PHOTO_PIXELS:
        raise InputError(
            f"{name} is {width}x{height} pixels, more than this page takes ({MAX_PHOTO_PIXELS:,} pixels, "
            f"e.g. {math.isqrt(MAX_PHOTO_PIXELS)}x{math.isqrt(MAX_PHOTO_PIXELS)}); the model sees at most "
            f"{MAX_INPUT_SIZE}x{MAX_INPUT_SIZE} of it, so scale it down and upload it again"
        )


def _header_size(path: str, name: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding its pixels (Pillow opens lazily);
    None when Pillow does not know the format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError:  # a header claiming far more pixels than Pillow will decode
        raise InputError(
            f"{name} is far larger than this page takes ({MAX_PHOTO_PIXELS:,} pixels at most); "
            "scale it down and upload it again"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def sample_photo(name: str) -> Photo:
    """One of the bundled scikit-image photos (``kfx.models.SAMPLE_PHOTOS``)."""
    if name not in SAMPLE_PHOTOS:
        raise InputError(f"unknown sample {name!r}; the samples are {', '.join(SAMPLE_PHOTOS)}")
    return make_photo(name, read_pixels(name))


def display_crop(photo: Photo, side: int = DISPLAY_SIDE) -> np.ndarray:
    """The square centre crop the model sees, as RGB uint8 [side, side, 3] for the editor."""
    unit = resize_crop(photo.pixels, side)
    return (unit.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


# -- selections ---------------------------------------------------------------------------------


def strokes_mask(layers) -> np.ndarray | None:
    """Union of the editor's drawing layers as a bool mask [H, W] (None when nothing is drawn).

    A layer is RGBA (alpha marks paint) or RGB/gray (non-zero marks paint).
    """
    mask = None
    for layer in layers or []:
        if layer is None:
            continue
        array = np.asarray(layer)
        painted = (
            array[..., 3] > 0
            if array.ndim == 3 and array.shape[-1] == 4
            else array.reshape(array.shape[:2] + (-1,)).any(axis=-1)
        )
        mask = painted if mask is None else mask | _resized_mask(painted, mask.shape)
    return mask if mask is not None and mask.any() else None


def _resized_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized so that any painted source pixel marks the target pixels it overlaps."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    source = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    if shape[0] >= mask.shape[0] and shape[1] >= mask.shape[1]:
        resized = F.interpolate(source, size=shape, mode="nearest")
    else:
        # Shrinking: max over each target pixel's source window, so thin strokes survive.
        resized = F.adaptive_max_pool2d(source, shape)
    return resized[0, 0].numpy() > 0


def bounding_rectangle(mask: np.ndarray) -> np.ndarray:
    """The filled axis-aligned rectangle around every True pixel of ``mask``."""
    rows, cols = np.nonzero(mask)
    rectangle = np.zeros_like(mask, dtype=bool)
    rectangle[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return rectangle


def selection_pixels(layers, size: int, shape: str = BRUSH) -> torch.Tensor | None:
    """The user's selection as a bool pixel mask [size, size] of the model input, or None (no strokes).

    The editor shows the same square crop as the model input at another resolution, so the strokes
    only need resizing.
    """
    return _selected_pixels(strokes_mask(layers), size, shape)


def _selected_pixels(strokes: np.ndarray | None, size: int, shape: str) -> torch.Tensor | None:
    """:func:`selection_pixels` from the strokes' mask."""
    if strokes is None:
        return None
    if shape == RECTANGLE:
        strokes = bounding_rectangle(strokes)
    return torch.from_numpy(_resized_mask(strokes, (size, size)))


def cells_overlapping(pixels: torch.Tensor, patch: Patch) -> torch.Tensor:
    """Grid cells whose patch window touches a selected pixel: the same rule as
    :meth:`kfx.Engine.cells_overlapping`, here without compiling an engine (naive mode needs none)."""
    mask = pixels.detach().to("cpu", torch.float32)[None, None]
    return F.max_pool2d(mask, patch.size, patch.stride)[0, 0] > 0


# -- settings -----------------------------------------------------------------------------------


def parse_colour(colour: str) -> tuple[float, float, float]:
    """A CSS colour as a colour picker gives it ("#rrggbb", "#rgb" or "rgb(a)(r, g, b, ...)") -> RGB in [0, 1]."""
    text = (colour or "").strip().lower()
    if re.fullmatch(r"#[0-9a-f]{6}", text):
        return tuple(int(text[i : i + 2], 16) / 255.0 for i in (1, 3, 5))
    if re.fullmatch(r"#[0-9a-f]{3}", text):
        return tuple(int(c * 2, 16) / 255.0 for c in text[1:])
    match = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(,\s*[\d.]+\s*)?\)", text)
    if match:
        return tuple(min(255.0, float(v)) / 255.0 for v in match.groups()[:3])
    raise InputError(f"patch colour {colour!r} is not a colour; use #rrggbb")


def _real(name: str, value) -> float:
    """``value`` as a finite float; InputError naming the setting otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return number


def whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` (an int, or the float a slider gives) as an int in [low, high]; InputError otherwise."""
    number = _real(name, value)
    if not number.is_integer() or number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InputError(f"{name} must be a whole number {bounds}, got {value!r}")
    return int(number)


def check_size(size, max_size: int = MAX_INPUT_SIZE) -> int:
    """The model input side, checked before any image is resized to it."""
    return whole_number("input size", size, MIN_INPUT_SIZE, max_size)


def grid_summary(
    size: int, patch: int, stride: int, strokes=None, shape: str = BRUSH, max_size: int = MAX_INPUT_SIZE
) -> str:
    """How many positions a map at these settings has and how many a selection keeps, for the page
    (or what is wrong with the settings)."""
    try:
        size = check_size(size, max_size)
        patch_ = Patch(whole_number("patch size", patch, 1), whole_number("stride", stride, 1))
        h_m, w_m = patch_.grid_shape((size, size))
    except KfxError as exc:
        return f"{exc}"
    text = f"{h_m} x {w_m} = {h_m * w_m:,} patch positions on the {size}x{size} input"
    pixels = selection_pixels(None if strokes is None else [strokes], size, shape)
    if pixels is None:
        return text + "; no selection (draw on the image to choose positions)"
    selected = int(cells_overlapping(pixels, patch_).sum())
    return text + f"; the selection keeps {selected:,} of them"


def drill_down_of(settings: MapSettings) -> kfx.DrillDown:
    """The drill-down the settings ask for (kfx.DrillDown checks its rule, fraction and speedup):
    the adaptive rule at the target speedup, or a two-stage rule with the fraction too."""
    speedup = _real("drill-down target speedup", settings.target_speedup)
    if settings.drill_rule == "adaptive":
        return kfx.DrillDown(target_speedup=speedup)
    fraction = _real("drill-down fraction", settings.fraction)
    return kfx.DrillDown(fraction, target_speedup=speedup, rule=settings.drill_rule)
