"""The interactive explorer's logic (DESIGN section 6), free of any web framework.

:class:`Explorer` turns what a user chose on the page (a photo, brush strokes, patch settings, a
mode) into heat maps: it predicts, caches compiled engines, runs one of the four modes as a stream
of :class:`Frame` updates, and keeps the table of runs. Reading photos, turning strokes into a
selection and checking settings live in :mod:`kfx._serve_inputs`; pictures, the status line and the
runs table in :mod:`kfx._serve_render`. This module re-exports both, so ``kfx.serve`` and the tests
reach the whole explorer as ``kfx._serve_core``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import kfx
from kfx._serve_inputs import (
    APPROXIMATE,
    BRUSH,
    DISPLAY_SIDE,
    EXACT,
    MAX_BATCH_SIZE,
    MAX_INPUT_SIZE,
    MAX_NEUROMASK_STEPS,
    MAX_PHOTO_PIXELS,
    MIN_INPUT_SIZE,
    MODES,
    NAIVE,
    NEUROMASK,
    RECTANGLE,
    SELECTION_SHAPES,
    MapSettings,
    Photo,
    _real,
    _selected_pixels,
    bounding_rectangle,
    cells_overlapping,
    check_photo_size,
    check_size,
    display_crop,
    drill_down_of,
    grid_summary,
    make_photo,
    parse_colour,
    read_photo,
    sample_photo,
    selection_pixels,
    strokes_mask,
    whole_number,
)
from kfx._serve_render import (
    RUN_COLUMNS,
    RunRecord,
    _approximate_label,
    _side,
    _step_detail,
    render_heatmap,
    render_mask,
    runs_table,
    runs_table_html,
    status_html,
)
from kfx.common import DEFAULT_BATCH_SIZE, model_dtype_device
from kfx.engine import Engine, Heatmap, Progress
from kfx.errors import InputError, ModelError
from kfx.models import LoadedModel, resize_crop
from kfx.patch import Patch

# Re-exported: kfx.serve and the tests reach the whole explorer through this module.
__all__ = ["Explorer", "Frame", "RunCancelled", "naive_stream", "RENDER_INTERVAL_S", "TOP_CLASSES"]
__all__ += ["BRUSH", "RECTANGLE", "DISPLAY_SIDE", "MAX_PHOTO_PIXELS", "MIN_INPUT_SIZE", "MAX_INPUT_SIZE"]
__all__ += ["NAIVE", "EXACT", "APPROXIMATE", "NEUROMASK", "MODES", "SELECTION_SHAPES", "MAX_BATCH_SIZE"]
__all__ += ["MAX_NEUROMASK_STEPS", "Photo", "MapSettings", "make_photo", "read_photo", "check_photo_size"]
__all__ += ["sample_photo", "display_crop", "strokes_mask", "bounding_rectangle", "selection_pixels"]
__all__ += [
    "cells_overlapping",
    "parse_colour",
    "whole_number",
    "check_size",
    "grid_summary",
    "drill_down_of",
]
__all__ += ["RUN_COLUMNS", "RunRecord", "render_heatmap", "render_mask", "status_html", "runs_table"]
__all__ += ["runs_table_html"]

RENDER_INTERVAL_S = 0.4  # a matplotlib picture costs ~0.1 s: redraw at most this often while a map fills
TOP_CLASSES = 5


@dataclass(frozen=True)
class Frame:
    """One update of a running map for the page."""

    picture: np.ndarray | None  # RGB uint8, or None to keep the previous picture
    status: str  # HTML: progress bar and numbers
    record: RunRecord | None = None  # set on the last frame of a run that finished
    heatmap: Heatmap | None = None  # the map so far (patch modes); NaN where not evaluated


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
            drill_down_of(checked)  # its rule, fraction and speedup
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
                "drill-down: a coarse grid first, then level by level the cells where the interpolation "
                "is expected to be most wrong; the rest interpolated"
                if settings.drill_rule == "adaptive"
                else f"drill-down ({settings.drill_rule}): a coarse stage 1, the rest filled from it, then "
                "the target stride where the drops are largest"
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
