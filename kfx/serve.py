"""``kfx serve``: the interactive explorer, a local web page (Gradio) over :mod:`kfx._serve_core`.

Upload a photo or pick a bundled one, see the prediction, choose the class to explain, set patch
size, stride and colour, choose Naive / Exact / Approximate / NeuroMask, draw brush strokes (or a
rectangle around them) to evaluate only a selection, watch the heat map fill in, stop a run, and
compare the modes' run times.

    kfx serve [--host 127.0.0.1] [--port 7860] [--model torchvision:resnet18] [--weights FILE]
    kfx serve --results maps/     # also browse a kfx batch results folder, at /results

Needs the ``ui`` extra: ``pip install 'kfx[ui]'``. From Python::

    import kfx.serve
    from kfx.models import load_model
    kfx.serve.launch(load_model())          # blocks; the page is at http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from kfx import _serve_core as core
from kfx._serve_handlers import PREDICTED_CLASS, Handlers, RunControl
from kfx.common import DEFAULT_BATCH_SIZE
from kfx.errors import KfxError
from kfx.models import SAMPLE_PHOTOS, LoadedModel

__all__ = ["add_arguments", "run", "main", "build_app", "launch", "Handlers", "RunControl", "PREDICTED_CLASS"]

log = logging.getLogger("kfx.serve")

DEFAULT_HOST = "127.0.0.1"  # loopback only: the page runs models on this machine
DEFAULT_PORT = 7860
BRUSH_COLOUR = "rgb(255, 40, 200)"  # one vivid colour: the strokes only mark a selection

# Fonts on this machine, so the page never asks a font service (it may be offline).
_SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
_MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
_CSS = """
.kfx-status { font-size: 0.95em; min-height: 1.6em; }
.kfx-status progress { width: 12em; vertical-align: middle; margin-right: 0.5em; }
#kfx-runs table { width: 100%; border-collapse: collapse; font-size: 0.9em; }
#kfx-runs th, #kfx-runs td { border-bottom: 1px solid var(--border-color-primary, #ddd); padding: 4px 6px; text-align: left; }
#kfx-runs td:nth-child(n+5) { text-align: right; font-variant-numeric: tabular-nums; }
.kfx-error { color: var(--error-text-color, #b91c1c); font-weight: 600; }
"""


def _gradio():
    """Import Gradio quietly (no analytics or telemetry calls), or explain how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise KfxError("the explorer needs Gradio: pip install 'kfx[ui]'") from None
    major = gradio.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 6:
        raise KfxError(
            f"the explorer needs Gradio 6 or later, found {gradio.__version__}: pip install 'kfx[ui]'"
        )
    return gradio


# -- the page -----------------------------------------------------------------------------------


def build_app(
    loaded_model: LoadedModel,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    explorer: core.Explorer | None = None,
    results=None,
):
    """The explorer page for ``loaded_model`` as a ``gradio.Blocks`` (not yet launched); with
    ``results`` (a :class:`kfx._serve_results.ResultsBrowser`), a Results page at ``/results``.

    Element ids (``kfx-editor``, ``kfx-run``, ``kfx-heatmap``, ``kfx-runs``, ...) are stable so
    tests and scripts can drive the page.
    """
    gr = _gradio()
    explorer = explorer or core.Explorer(loaded_model, batch_size=batch_size)
    handlers = Handlers(explorer, gr)
    size = loaded_model.size
    modes = list(core.MODES)

    with gr.Blocks(title="kfx explorer") as app:
        photo = gr.State(None)
        strokes = gr.State(None)  # bool mask of the brush strokes, at the editor's resolution
        runs = gr.State([])
        run_control = gr.State(RunControl())
        gr.Markdown(
            f"## kfx explorer: occlusion heat maps for `{loaded_model.name}`\n"
            "Load an image, choose a mode and patch, press **Run**. To evaluate only some positions, "
            "draw on the image with the brush (interactive mode); **Clear selection** removes the strokes."
        )
        with gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(
                    label="Image: draw to select positions",
                    type="numpy",
                    image_mode="RGBA",
                    sources=(),
                    transforms=(),
                    layers=False,
                    brush=gr.Brush(colors=[BRUSH_COLOUR], color_mode="fixed"),
                    canvas_size=(core.DISPLAY_SIDE, core.DISPLAY_SIDE),
                    buttons=[],
                    elem_id="kfx-editor",
                )
                with gr.Row():
                    upload = gr.UploadButton("Upload an image", type="filepath", elem_id="kfx-upload")
                    sample = gr.Dropdown(
                        list(SAMPLE_PHOTOS),
                        value=SAMPLE_PHOTOS[0],
                        label="or a sample photo",
                        elem_id="kfx-sample",
                    )
                    clear = gr.Button("Clear selection", elem_id="kfx-clear")
                shape = gr.Radio(
                    list(core.SELECTION_SHAPES), value=core.BRUSH, label="Selection", elem_id="kfx-shape"
                )
                mode = gr.Radio(modes, value=core.EXACT, label="Mode", elem_id="kfx-mode")
                target = gr.Dropdown(
                    [("the predicted class", PREDICTED_CLASS)],
                    value=PREDICTED_CLASS,
                    label="Explain the probability of",
                    elem_id="kfx-target",
                )
                with gr.Row():
                    patch = gr.Slider(1, 128, value=16, step=1, label="Patch size", elem_id="kfx-patch")
                    stride = gr.Slider(1, 64, value=4, step=1, label="Stride", elem_id="kfx-stride")
                with gr.Row():
                    fill = gr.ColorPicker(
                        "#808080", label="Patch colour (gray: about the mean input)", elem_id="kfx-fill"
                    )
                    grid = gr.Markdown(core.grid_summary(size, 16, 4), elem_id="kfx-grid")
                with gr.Accordion("Approximate mode", open=False) as approximate_knobs:
                    tau = gr.Slider(
                        0.1,
                        1.0,
                        value=1.0,
                        step=0.05,
                        label="tau (projective-field threshold)",
                        elem_id="kfx-tau",
                    )
                    drill_down = gr.Checkbox(
                        False,
                        label="Adaptive drill-down (chooses its own positions: no selection)",
                        elem_id="kfx-drill-down",
                    )
                    drill_rule = gr.Radio(
                        ["adaptive", "lowest", "paper"],
                        value="adaptive",
                        label="drill-down rule (adaptive: coarse to fine where the fill is least sure)",
                        elem_id="kfx-drill-rule",
                    )
                    with gr.Row():
                        fraction = gr.Slider(
                            0.05,
                            0.9,
                            value=0.25,
                            step=0.05,
                            label="drill-down fraction r (lowest and paper rules)",
                        )
                        speedup = gr.Slider(
                            1.0,
                            10.0,
                            value=3.0,
                            step=0.5,
                            label="drill-down target speedup t",
                        )
                with gr.Accordion("NeuroMask", open=False) as neuromask_knobs:
                    steps = gr.Slider(
                        1,
                        core.MAX_NEUROMASK_STEPS,
                        value=150,
                        step=1,
                        label="optimisation steps",
                        elem_id="kfx-steps",
                    )
                    gr.Markdown("*NeuroMask learns a mask over the whole image; a selection does not apply.*")
                with gr.Accordion("More settings", open=False):
                    input_size = gr.Slider(
                        core.MIN_INPUT_SIZE,
                        explorer.max_size,
                        value=size,
                        step=1,
                        label="Input size (pixels per side)",
                        elem_id="kfx-size",
                    )
                    batch = gr.Slider(
                        1,
                        core.MAX_BATCH_SIZE,
                        value=explorer.batch_size,
                        step=1,
                        label="Positions per batch",
                        elem_id="kfx-batch",
                    )
            with gr.Column(scale=1):
                prediction = gr.Label(num_top_classes=3, label="Prediction", elem_id="kfx-prediction")
                heatmap = gr.Image(
                    label="Heat map",
                    type="numpy",
                    interactive=False,
                    buttons=["download"],
                    elem_id="kfx-heatmap",
                )
                status = gr.HTML(core.status_html("Ready"), elem_id="kfx-status")
                message = gr.HTML("", elem_id="kfx-message")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="kfx-run")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="kfx-stop")
                table = gr.HTML(core.runs_table_html([]), label="Runs", elem_id="kfx-runs")

        # Loading a photo or clearing the strokes resets the selection; the summary follows.
        loaded_outputs = [photo, editor, prediction, message, strokes]
        grid_inputs = [input_size, patch, stride, strokes, shape]
        app.load(handlers.sample, [sample, input_size], loaded_outputs).then(
            handlers.grid, grid_inputs, [grid]
        )
        upload.upload(handlers.upload, [upload, input_size], [*loaded_outputs, sample]).then(
            handlers.grid, grid_inputs, [grid]
        )
        sample.input(handlers.sample, [sample, input_size], loaded_outputs).then(
            handlers.grid, grid_inputs, [grid]
        )
        clear.click(handlers.clear_selection, [photo], [editor, strokes]).then(
            handlers.grid, grid_inputs, [grid]
        )
        input_size.release(handlers.predict, [photo, input_size], [prediction])
        # A new photo or input size predicts anew; the class menu follows (and resets).
        prediction.change(handlers.classes, [photo, input_size], [target], show_progress="hidden")
        editor.change(handlers.select, [editor, input_size, patch, stride, shape], [strokes, grid])
        for control in (input_size, patch, stride, shape):
            control.change(handlers.grid, grid_inputs, [grid], show_progress="hidden")
        # The chosen mode's knobs open by themselves.
        mode.change(
            lambda chosen: (
                gr.update(open=chosen == core.APPROXIMATE),
                gr.update(open=chosen == core.NEUROMASK),
            ),
            [mode],
            [approximate_knobs, neuromask_knobs],
            show_progress="hidden",
        )
        controls = [
            mode,
            input_size,
            patch,
            stride,
            fill,
            batch,
            tau,
            drill_down,
            drill_rule,
            fraction,
            speedup,
            steps,
            shape,
            target,
        ]

        def run_in_session(request, photo, strokes, runs, control, *controls):
            yield from handlers.run(photo, strokes, runs, control, *controls, session=request.session_hash)

        def page_closed(request):
            handlers.page_closed(request.session_hash)

        # Gradio passes the request to a parameter annotated gr.Request; set here, as an object,
        # because this module's annotations are strings and Gradio is imported only when needed.
        run_in_session.__annotations__ = page_closed.__annotations__ = {"request": gr.Request}
        app.unload(page_closed)
        # Run stamps the session's RunControl (at once, unqueued), then queues the run. Stop only
        # tells the RunControl: the run ends itself at its next batch or step. Gradio's own cancel
        # is not used: while it waits for the batch in flight, the page drops (or, deferred, may
        # lose) a Run pressed after Stop.
        run_button.click(handlers.request_run, [run_control], None, queue=False, show_progress="hidden").then(
            run_in_session,
            [photo, strokes, runs, run_control, *controls],
            [heatmap, status, table, runs, message],
            concurrency_limit=1,  # one engine run at a time: engines cache the image's activations
            show_progress="hidden",  # the status line is the progress indicator
            trigger_mode="always_last",  # Run pressed while a run ends: run next, not dropped
        )
        stop_button.click(handlers.stop, [status, run_control], [status], queue=False)
    if results is not None:
        from kfx._serve_results import add_results_page

        add_results_page(app, gr, results)
    return app


def launch(
    loaded_model: LoadedModel | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block: bool = True,
    quiet: bool = False,
    explorer: core.Explorer | None = None,
    results=None,
):
    """Serve the explorer for ``loaded_model`` (default: EfficientNet-Lite0) at http://host:port.

    ``block=False`` returns the running ``gradio.Blocks`` at once (call ``.close()`` to stop it);
    otherwise this returns when the server is stopped (Ctrl-C). ``explorer`` serves an
    :class:`core.Explorer` made by the caller (e.g. to watch its ``active_runs``). ``results``: a
    results folder of ``kfx batch`` (or a :class:`kfx._serve_results.ResultsBrowser`) to browse
    on the page ``/results``.
    """
    gr = _gradio()
    if loaded_model is None:
        from kfx.models import load_model

        loaded_model = load_model()
    if results is not None and not hasattr(results, "show"):
        from kfx._serve_results import ResultsBrowser

        results = ResultsBrowser(results)
    app = build_app(loaded_model, batch_size=batch_size, explorer=explorer, results=results)
    app.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=_SYSTEM_FONTS, font_mono=_MONO_FONTS)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=quiet,
        share=False,
        ssr_mode=False,
        theme=theme,
        css=_CSS,
        show_error=True,
        max_file_size="50mb",  # photos; anything larger is refused before it reaches a handler
    )
    return app


# -- command line -------------------------------------------------------------------------------


def _port(text: str) -> int:
    """A TCP port a server can listen on: 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {value}")
    return value


def _batch_size(text: str) -> int:
    """Positions per batch: what the page's batch slider offers."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= core.MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {core.MAX_BATCH_SIZE}, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``kfx serve`` options, for a parser of its own or a subcommand's."""
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--model",
        default=None,
        help="efficientnet-lite0 (default, ImageNet weights), torchvision:NAME, or package.module:factory",
    )
    parser.add_argument(
        "--weights", default=None, help="a state_dict file for a torchvision or factory model"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=DEFAULT_BATCH_SIZE,
        help=f"positions per batch, 1 to {core.MAX_BATCH_SIZE} (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--results", metavar="DIR", help="also browse this kfx batch results folder (page /results)"
    )
    parser.epilog = (
        "Exit status: 0 stopped with Ctrl-C; 2 a bad command line (bad option value, a --host that is "
        "not an address of this machine, Gradio not installed); 1 a runtime failure (port in use, a "
        "model or weights that cannot be loaded, a server that does not start)."
    )
    return parser


def check_address(host: str, port: int) -> None:
    """Refuse, before the model loads, an address the server could not listen on.

    Raises kfx.cli.UsageError (exit 2) for a host that is unknown or not an address of this
    machine, :class:`kfx.KfxError` (exit 1) for a port in use or not allowed.
    """
    from kfx.cli import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(
            f"--host {host}: unknown host ({getattr(exc, 'strerror', None) or exc}); use 127.0.0.1 "
            "(this machine only) or one of this machine's addresses"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"--host {host}: not an address of this machine, so the server cannot listen on it; "
                    "use 127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)"
                ) from None
            if exc.errno == errno.EADDRINUSE:
                raise KfxError(
                    f"port {port} on {host} is in use (another server?); choose another with --port"
                ) from None
            if exc.errno == errno.EACCES:
                raise KfxError(
                    f"port {port} on {host}: permission denied (ports below 1024 need administrator "
                    "rights); choose a port from 1024 up with --port"
                ) from None
            raise KfxError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    """Check the address, load the model and serve until Ctrl-C (then 0).

    Failures are raised for :func:`kfx.cli.main` to print as one line: kfx.cli.UsageError (exit 2)
    for Gradio missing or an address this machine does not have, :class:`kfx.KfxError` or
    ``OSError`` (exit 1) for a port in use, a model that cannot be loaded, a server that does not
    start.
    """
    from kfx.cli import UsageError
    from kfx.models import load_model

    try:
        _gradio()
    except KfxError as exc:
        raise UsageError(str(exc)) from None
    results = _results_browser(getattr(args, "results", None))  # a bad folder fails first
    check_address(args.host, args.port)
    loaded = load_model(args.model, args.weights)
    import matplotlib

    matplotlib.use("Agg")  # pictures are drawn in worker threads; never open a window
    print(
        f"kfx explorer for {loaded.name}: http://{args.host}:{args.port}  (Ctrl-C stops it)", file=sys.stderr
    )
    try:
        launch(
            loaded,
            host=args.host,
            port=args.port,
            batch_size=args.batch_size,
            block=True,
            quiet=True,
            results=results,
        )
    except KeyboardInterrupt:
        pass
    except KfxError:
        raise
    except Exception as exc:  # e.g. the port was taken since the check; Gradio's words, on one line
        log.debug("the server did not start", exc_info=True)
        raise KfxError(
            f"the explorer's server did not start on {args.host}:{args.port} ({type(exc).__name__}: {exc})"
        ) from None
    return 0


def _results_browser(folder):
    if folder is None:
        return None
    from kfx._serve_results import ResultsBrowser

    return ResultsBrowser(folder)


def main(argv: list[str] | None = None) -> int:
    """``kfx serve`` as a program: ``python -m kfx.serve --port 7860`` (the same as ``kfx serve``:
    the same options, messages and exit status)."""
    from kfx.cli import main as kfx_main

    return kfx_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
