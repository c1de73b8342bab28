"""The interactive explorer's logic (DESIGN section 6), free of any web framework.

:class:`Explorer` turns what a user chose on the page (a photo, brush strokes, patch settings, a
mode) into heat maps: it reads and crops photos, predicts, caches compiled engines, turns strokes
into a selection of grid cells, runs one of the four modes as a stream of :class:`Frame` updates,
and keeps the table of runs. ``kfx.serve`` wires these functions to Gradio components; the tests
call them directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kfx
from kfx import plot
from kfx.common import DEFAULT_BATCH_SIZE, model_dtype_device
from kfx.engine import Engine, Heatmap, Progress
from kfx.errors import InputError, KfxError, ModelError
from kfx.models import SAMPLE_PHOTOS, LoadedModel, read_pixels, resize_crop, to_rgb_uint8
from kfx.patch import Patch

NAIVE, EXACT, APPROXIMATE, NEUROMASK = "Naive", "Exact", "Approximate", "NeuroMask"
MODES = (NAIVE, EXACT, APPROXIMATE, NEUROMASK)
BRUSH, RECTANGLE = "Brush strokes", "Rectangle around the strokes"
SELECTION_SHAPES = (BRUSH, RECTANGLE)

DISPLAY_SIDE = 384  # the editor shows the model's square crop at this side, whatever the input size
RENDER_INTERVAL_S = 0.4  # a matplotlib picture costs ~0.1 s: redraw at most this often while a map fills
TOP_CLASSES = 5
# Each action on a photo resizes it from its full resolution (about 3 s for 4096 x 4096 on 2 CPU
# cores, ten times that for 8000 x 8000), and every session keeps its photo in memory: larger
# uploads are refused from the file's header, before their pixels are decoded.
MAX_PHOTO_PIXELS = 4096 * 4096
# The model input sides the page offers (a model's own size may exceed MAX_INPUT_SIZE).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 512
MAX_BATCH_SIZE = 256
MAX_NEUROMASK_STEPS = 500
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
    fraction: float = 0.25
    target_speedup: float = 3.0
    neuromask_steps: int = 150
    selection_shape: str = BRUSH
    target: int | None = None  # class to explain; None: the predicted one


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


@dataclass(frozen=True)
class Frame:
    """One update of a running map for the page."""

    picture: np.ndarray | None  # RGB uint8, or None to keep the previous picture
    status: str  # HTML: progress bar and numbers
    record: RunRecord | None = None  # set on the last frame of a run that finished
    heatmap: Heatmap | None = None  # the map so far (patch modes); NaN where not evaluated


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


# -- running ------------------------------------------------------------------------------------


def naive_stream(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch: Patch,
    *,
    cells: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    target: int | None = None,
) -> Iterator[Progress]:
    """The brute-force baseline as a stream: :class:`kfx.NaiveEngine`, whose loop is the engine's.

    Yields the same :class:`kfx.Progress` steps as :meth:`kfx.Engine.stream` (NaN where not yet
    evaluated), so the page shows both modes the same way. It starts on the first ``next()``, so the
    unoccluded inference counts in the run's time; closing the generator stops it.
    """
    naive = kfx.NaiveEngine(model, tuple(image.shape), patch, batch_size=batch_size)
    return _deferred(lambda: naive.stream(image, target, cells=cells))


def _deferred(start_stream) -> Iterator[Progress]:
    """A stream that starts on the first ``next()``: ``Engine.stream`` runs the unoccluded image
    eagerly, and that inference belongs to the run's measured time."""
    yield from start_stream()


def _never() -> bool:
    return False


class RunCancelled(Exception):
    """Raised inside a model call when the run's page asked it to stop (Stop, or the page went away)."""


class _StoppableModel(nn.Module):
    """The model, asking ``should_stop`` before each forward pass: NeuroMask is one call of many
    forward and backward passes, and a forward pass is where it can be interrupted."""

    def __init__(self, model: nn.Module, should_stop: Callable[[], bool]):
        super().__init__()
        self.model = model
        self.should_stop = should_stop
        self.training = model.training  # its own flag only: eval() would write to the shared model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.should_stop():
            raise RunCancelled()
        return self.model(x)


def _timed_without_grad(
    steps: Iterator[Progress], should_stop: Callable[[], bool] = _never
) -> Iterator[tuple[Progress, float]]:
    """Advance ``steps`` with autograd off, yielding each step with the seconds spent computing so far;
    ``should_stop`` is asked before each step and ends the stream when it says True.

    Only the time inside ``next()`` counts: drawing the picture and sending it to the page happen
    between steps and would otherwise inflate the run time (more for the slower modes, which
    redraw more often). Autograd is switched off around every step because a web server resumes a
    run on whichever worker thread is free, and the switch is per thread: a ``torch.no_grad()``
    entered inside a generator on one thread does not hold when it resumes on another, and the map
    would then record a graph.
    """
    busy = 0.0
    while not should_stop():
        started = time.perf_counter()
        with torch.no_grad():
            step = next(steps, None)
        busy += time.perf_counter() - started
        if step is None:
            return
        yield step, busy


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


class Explorer:
    """The explorer for one loaded model: predictions, a cache of compiled engines, and runs.

    Engines are cached per (input size, patch, stride, fill, tau), the least recently used dropped
    beyond ``max_engines``: compiling traces the model and is worth doing once per setting.
    ``active_runs`` counts the runs computing now (0 once every page's runs ended or were stopped).
    """

    def __init__(self, loaded: LoadedModel, *, batch_size: int = DEFAULT_BATCH_SIZE, max_engines: int = 6):
        self.loaded = loaded
        self.batch_size = whole_number("batch size", batch_size, 1, MAX_BATCH_SIZE)
        self.max_engines = max_engines
        self.max_size = max(MAX_INPUT_SIZE, loaded.size)
        self._engines: OrderedDict[tuple, Engine] = OrderedDict()
        self._engines_lock = threading.Lock()
        self._active_runs = 0
        self._active_lock = threading.Lock()
        self._num_classes = len(loaded.labels) if loaded.labels else None  # else known once it predicts

    @property
    def active_runs(self) -> int:
        return self._active_runs

    def _count_active(self, change: int) -> None:
        with self._active_lock:
            self._active_runs += change

    # -- photos and predictions --
    def model_input(self, photo: Photo, size: int) -> torch.Tensor:
        """The model's input [3, size, size] for ``photo`` (resize, centre crop, normalise)."""
        return self.loaded.prepare(photo.pixels, check_size(size, self.max_size))

    def top_classes(self, photo: Photo, size: int | None = None) -> list[tuple[int, float]]:
        """(class index, probability) of the most probable classes on the unoccluded photo."""
        image = self.model_input(photo, self.loaded.size if size is None else size)
        model = self.loaded.model
        _, device = model_dtype_device(model, default=(None, torch.device("cpu")))
        try:
            with torch.no_grad():
                scores = model(image[None].to(device))
        except Exception as exc:  # the user's model: say which input it failed on
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ModelError(
                f"the model failed on a {image.shape[-1]}x{image.shape[-1]} input ({type(exc).__name__}: "
                f"{first}); choose another input size"
            ) from None
        probs = torch.softmax(scores, dim=1)[0].cpu()
        self._num_classes = probs.numel()
        top = probs.topk(min(TOP_CLASSES, probs.numel()))
        return [(int(i), float(p)) for p, i in zip(top.values, top.indices)]

    def predict(self, photo: Photo, size: int | None = None) -> dict[str, float]:
        """The top classes and their probabilities, for a label widget."""
        return {self.loaded.label(i): p for i, p in self.top_classes(photo, size)}

    def class_choices(self, photo: Photo, size: int | None = None) -> list[tuple[str, int]]:
        """(label, class index) of the top classes, most probable first: the classes a user may ask
        the map to explain (the first is the prediction)."""
        return [(f"{self.loaded.label(i)} ({p:.1%})", i) for i, p in self.top_classes(photo, size)]

    # -- engines --
    def fill_values(self, colour: str) -> tuple[float, ...]:
        """The patch colour in the model's input space (the user picks it in pixel space)."""
        rgb = torch.tensor(parse_colour(colour), dtype=torch.float32).view(3, 1, 1)
        return tuple(round(float(v), 6) for v in self.loaded.normalize(rgb).view(-1))

    def patch(self, settings: MapSettings) -> Patch:
        return Patch(int(settings.patch), int(settings.stride), fill=self.fill_values(settings.fill))

    def engine(self, size: int, patch: Patch, tau: float | None = None) -> tuple[Engine, float]:
        """A compiled engine for these settings (cached) and the seconds compiling took (0 if cached)."""
        key = (int(size), patch.size, patch.stride, patch.fill, tau)
        with self._engines_lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key], 0.0
            started = time.perf_counter()
            options = {"batch_size": self.batch_size}
            if tau is not None:
                options["tau"] = float(tau)
            engine = kfx.compile(self.loaded.model, (3, int(size), int(size)), patch, **options)
            self._engines[key] = engine
            while len(self._engines) > self.max_engines:
                self._engines.popitem(last=False)
            return engine, time.perf_counter() - started

    # -- runs --
    def check_settings(self, settings: MapSettings, *, selection: bool = False) -> MapSettings:
        """``settings`` checked, as ints and floats (sliders deliver floats), before any image is
        resized or engine compiled; :class:`kfx.InputError` says what to change. Only what the mode
        uses is checked (NeuroMask has no patch)."""
        mode = settings.mode
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        checked = {
            "size": check_size(settings.size, self.max_size),
            "target": self.check_target(settings.target),
        }
        if mode == NEUROMASK:
            steps = whole_number("NeuroMask steps", settings.neuromask_steps, 1, MAX_NEUROMASK_STEPS)
            return dataclasses.replace(settings, **checked, neuromask_steps=steps)
        if settings.selection_shape not in SELECTION_SHAPES:
            raise InputError(
                f"unknown selection {settings.selection_shape!r}; choose one of {', '.join(SELECTION_SHAPES)}"
            )
        checked.update(
            patch=whole_number("patch size", settings.patch, 1),
            stride=whole_number("stride", settings.stride, 1),
            batch_size=whole_number("positions per batch", settings.batch_size, 1, MAX_BATCH_SIZE),
            drill_down=mode == APPROXIMATE and bool(settings.drill_down),
        )
        parse_colour(settings.fill)
        if mode == APPROXIMATE:
            checked["tau"] = _real("tau", settings.tau)
            if not 0.0 < checked["tau"] <= 1.0:
                raise InputError(f"tau must be in (0, 1] (1 = exact), got {settings.tau!r}")
        checked = dataclasses.replace(settings, **checked)
        if checked.drill_down:
            if selection:
                raise InputError(
                    "drill-down chooses its own positions: clear the selection, or turn drill-down off"
                )
            drill_down_of(checked)  # its fraction and speedup
        return checked

    def check_target(self, target) -> int | None:
        """The class to explain (None: the predicted one), checked against the model's classes when
        they are known (its labels, or its last prediction)."""
        if target is None:
            return None
        bound = None if self._num_classes is None else self._num_classes - 1
        return whole_number("class index", target, 0, bound)

    def check_run(
        self, photo: Photo | None, settings: MapSettings, *, selection: bool = False
    ) -> tuple[MapSettings, Patch | None]:
        """Refuse, with a message for the page, what cannot run; the checked settings and the patch
        (None for NeuroMask) when all is well."""
        if photo is None:
            raise InputError("load an image first: upload one or pick a sample")
        settings = self.check_settings(settings, selection=selection)
        if settings.mode == NEUROMASK:
            return settings, None
        patch = self.patch(settings)
        height, width = photo.pixels.shape[:2]
        if min(height, width) < max(patch.size):
            raise InputError(
                f"the image is {width}x{height} pixels, smaller than the {patch.size[0]}-pixel patch; "
                "upload a larger image or choose a smaller patch"
            )
        patch.check_fits((settings.size, settings.size))
        return settings, patch

    def run(
        self, photo: Photo | None, layers, settings: MapSettings, should_stop: Callable[[], bool] = _never
    ) -> Iterator[Frame]:
        """One run of ``settings.mode`` as a stream of frames; the last one carries the run's record.

        ``layers`` are the editor's drawing layers: brush strokes restrict the patch positions to
        the cells they touch (interactive mode). Raises :class:`kfx.KfxError` for bad input before
        the first frame computes anything. ``should_stop`` is asked between batches (NeuroMask:
        between optimisation steps); when it says True the run ends without a record. Closing the
        generator cancels the run after the batch in flight.
        """
        strokes = strokes_mask(layers)
        settings, patch = self.check_run(photo, settings, selection=strokes is not None)
        self._count_active(+1)
        try:
            size = settings.size
            image = self.model_input(photo, size)
            display = resize_crop(photo.pixels, size)
            if settings.mode == NEUROMASK:
                yield from self._run_neuromask(photo, image, display, settings, should_stop)
                return
            pixels = _selected_pixels(strokes, size, settings.selection_shape)
            steps, label_mode, notes = yield from self._map_steps(image, pixels, patch, settings)
            yield from self._show_steps(
                steps, photo, display, patch, settings, label_mode, notes, should_stop
            )
        finally:
            self._count_active(-1)

    def _map_steps(self, image, pixels, patch, settings):
        """The stream of :class:`Progress` for the chosen patch mode (compiling first if needed);
        a generator that yields status frames while compiling and returns (steps, mode label, notes)."""
        cells = None if pixels is None else cells_overlapping(pixels, patch)
        notes = []
        if cells is not None:
            notes.append(f"selection: {int(cells.sum()):,} of {cells.numel():,} positions")
        size = int(settings.size)
        if settings.mode == NAIVE:
            steps = naive_stream(
                self.loaded.model,
                image,
                patch,
                cells=cells,
                batch_size=int(settings.batch_size),
                target=settings.target,
            )
            return steps, self._labelled(NAIVE, settings), notes
        tau = float(settings.tau) if settings.mode == APPROXIMATE else None
        yield Frame(
            None,
            status_html(
                "Compiling",
                detail=f"{settings.mode} engine for {size}x{size}, patch {settings.patch}, stride {settings.stride}",
            ),
        )
        engine, compile_seconds = self.engine(size, patch, tau)
        if compile_seconds:
            notes.append(f"compiled in {compile_seconds:.1f} s (cached for the next runs)")
        options = {}  # tau, for the approximate mode, is compiled into the engine
        if settings.drill_down:  # checked with the settings: never with a selection
            options["drill_down"] = drill_down_of(settings)
            notes.append(
                "drill-down: a coarse stage 1, the rest interpolated, then the target stride where the "
                "drops are largest"
            )
        steps = _deferred(
            lambda: engine.stream(
                image, settings.target, cells=cells, batch_size=int(settings.batch_size), **options
            )
        )
        label = EXACT if settings.mode == EXACT else _approximate_label(settings)
        return steps, self._labelled(label, settings), notes

    def _labelled(self, label: str, settings: MapSettings) -> str:
        """The run's name, saying which class it explains when that is not the predicted one."""
        return label if settings.target is None else f"{label} for {self.loaded.label(settings.target)}"

    def _show_steps(
        self, steps, photo, display, patch, settings, label_mode, notes, should_stop=_never
    ) -> Iterator[Frame]:
        """Frames from a stream of progress steps: redrawn at most every RENDER_INTERVAL_S, and
        always at the end; the stream is closed however the run ends (a Stop closes this generator)."""
        last_render = 0.0
        try:
            for step, seconds in _timed_without_grad(steps, should_stop):
                finished = step.done >= step.total
                title = f"{label_mode}: {'done' if finished else 'running'}"
                detail = _step_detail(step, seconds)
                if finished:
                    detail = " &middot; ".join([detail, *notes])
                if finished or time.perf_counter() - last_render >= RENDER_INTERVAL_S:
                    picture = render_heatmap(step.heatmap, display, self.loaded.label(step.heatmap.target))
                    last_render = time.perf_counter()
                else:
                    picture = None
                record = self._record(photo, patch, settings, label_mode, step, seconds) if finished else None
                yield Frame(picture, status_html(title, step.done, step.total, detail), record, step.heatmap)
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()

    def _run_neuromask(self, photo, image, display, settings, should_stop=_never) -> Iterator[Frame]:
        """NeuroMask: one optimisation (no batches to show), then the mask over the image; it ends
        early, with no frame, at the first step after ``should_stop`` says True."""
        steps = int(settings.neuromask_steps)
        yield Frame(
            None,
            status_html(
                "NeuroMask: running", detail=f"{steps} optimisation steps, one forward and backward pass each"
            ),
        )
        started = time.perf_counter()
        try:
            mask = kfx.neuromask(
                _StoppableModel(self.loaded.model, should_stop), image, settings.target, steps=steps
            )
        except RunCancelled:
            return
        seconds = time.perf_counter() - started
        target = self.top_classes(photo, settings.size)[0][0] if settings.target is None else settings.target
        picture = render_mask(mask, display, self.loaded.label(target), steps)
        record = RunRecord(
            self._labelled(f"NeuroMask ({steps} steps)", settings),
            NEUROMASK,
            photo.name,
            self._comparison_key(photo, settings),
            "-",
            None,
            seconds,
        )
        yield Frame(picture, status_html("NeuroMask: done", detail=f"{seconds:.2f} s"), record)

    def _comparison_key(self, photo: Photo, settings: MapSettings) -> tuple:
        return (
            photo.fingerprint,
            int(settings.size),
            int(settings.patch),
            int(settings.stride),
            settings.fill,
            settings.target,
        )

    def _record(self, photo, patch, settings, label_mode, step: Progress, seconds: float) -> RunRecord:
        patch_stride = f"{_side(patch.size)} / {_side(patch.stride)}"
        kind = label_mode.split(" ")[0]
        return RunRecord(
            label_mode,
            kind,
            photo.name,
            self._comparison_key(photo, settings),
            patch_stride,
            step.done,
            seconds,
            int(step.heatmap.evaluated.sum()),
        )


def drill_down_of(settings: MapSettings) -> kfx.DrillDown:
    """The drill-down the settings ask for (kfx.DrillDown checks its fraction and speedup)."""
    return kfx.DrillDown(
        fraction=_real("drill-down fraction", settings.fraction),
        target_speedup=_real("drill-down target speedup", settings.target_speedup),
    )


def _side(pair: tuple[int, int]) -> str:
    """A (h, w) pair as the page shows it: one number when square."""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _approximate_label(settings: MapSettings) -> str:
    parts = [f"tau {float(settings.tau):g}"]
    if settings.drill_down:
        parts.append(f"drill-down r {float(settings.fraction):g}, t {float(settings.target_speedup):g}")
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
