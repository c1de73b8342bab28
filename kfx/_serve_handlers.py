"""The explorer page's handlers: Gradio values in, Gradio values out (:class:`Handlers`), and the
per-session run control the Run and Stop buttons share (:class:`RunControl`).

``kfx.serve`` builds the page and wires these to its components; they call :mod:`kfx._serve_core`.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from dataclasses import dataclass

from kfx import _serve_core as core
from kfx.errors import KfxError

log = logging.getLogger("kfx.serve")  # the server's logger: handler failures are logged as before


# -- handlers: Gradio values in, Gradio values out ----------------------------------------------


def _message(exc: Exception) -> str:
    """The HTML shown in the page for a refused input or a failed run."""
    if isinstance(exc, KfxError):
        text = str(exc)
    else:
        text = f"Something went wrong: {type(exc).__name__}: {exc} (details in the server log)"
    return f'<div class="kfx-error">{html.escape(text)}</div>'


def _warn(gr, exc: Exception) -> str:
    """Report ``exc`` in the page (a toast and the message line) and keep serving."""
    if not isinstance(exc, KfxError):
        log.exception("explorer handler failed")
    gr.Warning(str(exc) if isinstance(exc, KfxError) else f"{type(exc).__name__}: {exc}")
    return _message(exc)


def editor_value(photo: core.Photo | None) -> dict | None:
    """The editor's value for a photo: the model's crop as background, no strokes yet."""
    if photo is None:
        return None
    crop = core.display_crop(photo)
    return {"background": crop, "layers": [], "composite": crop}


PREDICTED_CLASS = -1  # the class menu's value for "the predicted class"


def _settings(
    mode,
    size,
    patch,
    stride,
    fill,
    batch_size,
    tau,
    drill_down,
    drill_rule,
    fraction,
    speedup,
    steps,
    shape,
    target,
):
    """The page's controls as :class:`MapSettings`, as they come (sliders may deliver floats):
    :meth:`core.Explorer.check_settings` checks and converts them."""
    return core.MapSettings(
        mode=mode,
        size=size,
        patch=patch,
        stride=stride,
        fill=fill,
        batch_size=batch_size,
        tau=tau,
        drill_down=drill_down,
        drill_rule=drill_rule,
        fraction=fraction,
        target_speedup=speedup,
        neuromask_steps=steps,
        selection_shape=shape,
        target=None if target in (None, PREDICTED_CLASS) else target,
    )


@dataclass
class RunControl:
    """Per browser session (a ``gr.State``, shared by the Run and Stop handlers), in
    ``time.monotonic()`` seconds: when Run was last pressed, when the current run started, and when
    Stop was last pressed (or the page went away). A Stop ends every run asked for before it."""

    requested: float = 0.0
    started: float = 0.0
    stop_requested: float = -1.0

    def request(self) -> None:
        self.requested = time.monotonic()

    def stop(self) -> None:
        self.stop_requested = time.monotonic()


_STOPPED = core.status_html("Stopped", detail="the map shows the positions evaluated before Stop")


class Handlers:
    """The page's event handlers for one :class:`core.Explorer`; each catches bad input and answers
    with a message instead of an exception, so one bad upload or setting never stops the server."""

    def __init__(self, explorer: core.Explorer, gr):
        self.explorer = explorer
        self.gr = gr
        self._sessions: dict[str, RunControl] = {}  # the run control of each page that ran a map
        self._sessions_lock = threading.Lock()

    def _loaded(self, photo: core.Photo, size) -> tuple:
        """A new photo: shown without strokes, predicted; the old selection is gone."""
        prediction = self.explorer.predict(photo, size)
        return photo, editor_value(photo), prediction, "", None

    def upload(self, path, size) -> tuple:
        """An uploaded file -> (photo, editor, prediction, message, strokes, sample choice)."""
        try:
            if not path:
                raise KfxError("no file arrived; upload an image file")
            # the sample list no longer names the image shown
            return (*self._loaded(core.read_photo(path), size), self.gr.update(value=None))
        except Exception as exc:  # any failure is reported in the page
            skip = self.gr.skip()
            return skip, skip, skip, _warn(self.gr, exc), skip, skip

    def sample(self, name, size) -> tuple:
        """A bundled photo by name -> (photo, editor, prediction, message, strokes)."""
        try:
            return self._loaded(core.sample_photo(name), size)
        except Exception as exc:
            skip = self.gr.skip()
            return skip, skip, skip, _warn(self.gr, exc), skip

    def predict(self, photo, size):
        """The prediction again (the input size changed)."""
        if photo is None:
            return self.gr.skip()
        try:
            return self.explorer.predict(photo, size)
        except Exception as exc:
            _warn(self.gr, exc)
            return self.gr.skip()

    def classes(self, photo, size):
        """The class menu for the photo shown: the predicted class, then each of the top classes."""
        if photo is None:
            return self.gr.skip()
        try:
            choices = self.explorer.class_choices(photo, size)
        except Exception as exc:
            _warn(self.gr, exc)
            return self.gr.skip()
        return self.gr.update(
            choices=[("the predicted class", PREDICTED_CLASS), *choices], value=PREDICTED_CLASS
        )

    def clear_selection(self, photo) -> tuple:
        """(editor without strokes, no selection). Setting the editor's value from here fires no
        change event in the editor, so the strokes are cleared here too."""
        return (editor_value(photo) if photo is not None else self.gr.skip()), None

    def select(self, editor, size, patch, stride, shape) -> tuple:
        """The editor changed (a stroke, an erase, a new photo) -> (strokes mask, grid summary).

        Kept in a session state so that Run sends no image: the run starts at once, and a Stop
        right after Run finds it running.
        """
        layers = editor.get("layers") if isinstance(editor, dict) else None
        try:
            strokes = core.strokes_mask(layers)
        except Exception as exc:
            _warn(self.gr, exc)
            strokes = None
        return strokes, self.grid(size, patch, stride, strokes, shape)

    def grid(self, size, patch, stride, strokes=None, shape=core.BRUSH) -> str:
        """How many positions a run evaluates at these settings (and how many the selection keeps)."""
        return core.grid_summary(size, patch, stride, strokes, shape, max_size=self.explorer.max_size)

    def run(self, photo, strokes, runs, control: RunControl, *controls, session: str | None = None):
        """One run, streamed: yields (heat map, status, runs table, runs, message) after each batch.

        Stop reaches a run through ``control``: the run asks it before each batch (NeuroMask: each
        optimisation step) and ends itself, with a last frame saying so; a run still queued when
        Stop was pressed ends as it starts. When the page of ``session`` goes away,
        :meth:`page_closed` stops the run the same way (Gradio also closes this generator then, but
        only between steps).
        """
        skip = self.gr.skip()
        runs = list(runs or [])
        started = time.monotonic()
        control.started = started
        asked = control.requested or started  # when the page asked for this run
        if session is not None:
            with self._sessions_lock:
                self._sessions[session] = control

        def should_stop() -> bool:
            return control.stop_requested > asked

        frames = None
        finished = False
        try:
            if should_stop():
                yield skip, _STOPPED, skip, skip, ""
                return
            settings = _settings(*controls)
            layers = None if strokes is None else [strokes]
            frames = self.explorer.run(photo, layers, settings, should_stop)
            for frame in frames:
                if should_stop():  # the batch in flight at Stop: its frame must not say "running" again
                    break
                if frame.record is not None:
                    runs.append(frame.record)
                    finished = True
                picture = skip if frame.picture is None else frame.picture
                table = core.runs_table_html(runs) if frame.record is not None else skip
                yield picture, frame.status, table, runs, ""
            if not finished and should_stop():
                yield skip, _STOPPED, skip, skip, ""
        except Exception as exc:
            message = _warn(self.gr, exc)
            yield skip, core.status_html("Not run", detail="see the message below"), skip, skip, message
        finally:
            if frames is not None:
                frames.close()

    def page_closed(self, session: str) -> None:
        """The page of ``session`` went away: its run, if any, stops at its next batch or step
        (Gradio closes a run's stream only between steps, and only once the step in flight ends)."""
        with self._sessions_lock:
            control = self._sessions.pop(session, None)
        if control is not None:
            control.stop()

    @staticmethod
    def request_run(control: RunControl) -> None:
        """Run pressed: the time a later Stop compares with (the run itself may wait in the queue)."""
        control.request()

    @staticmethod
    def stop(status: str, control: RunControl) -> str:
        """Stop pressed: tell the running map (if any) to end; only a run in progress becomes 'stopped'."""
        control.stop()
        if control.started > 0 and status and ("running" in status or "Compiling" in status):
            return _STOPPED
        return status
