"""``kfx explain``: occlusion heat maps or NeuroMask masks of images, written as pictures, JSON, .npy."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import kfx

# read_image and run_occlusion are looked up on the package when called, so that replacing
# kfx.cli.read_image or kfx.cli.run_occlusion (as the tests do) takes effect here too.
from kfx import cli
from kfx.cli.arrays import (
    KINDS,
    ArrayInput,
    array_advice,
    array_model_input,
    array_patch,
    check_readers,
    is_array_file,
    is_nifti_file,
    nifti_bytes,
    read_array,
)
from kfx.cli.checks import (
    _approximate_options,
    _check_backend,
    _check_method_options,
    _device,
    _load_model,
    _patch,
)
from kfx.cli.common import EXIT_OK, PROGRESS_DELAY_S, UsageError
from kfx.cli.images import _model_input, _named_target, _probabilities, _stem, _target
from kfx.cli.outputs import Outputs, _json_values, _numpy_values, _writing, plan_outputs
from kfx.common import follow_progress, progress_bar
from kfx.errors import ModelError
from kfx.neuromask import DEFAULT_STEPS

# -- explaining one image ---------------------------------------------------------------------------


@dataclass
class Explanation:
    """One image's result: the map (or mask), what it explains, and how long it took."""

    image: str
    method: str
    target: int
    label: str
    base: float
    values: torch.Tensor  # occlusion: probabilities on the grid; neuromask: the mask [H, W]
    run_s: float
    positions: int = 0  # occlusion: positions evaluated
    heatmap: kfx.Heatmap | None = None
    details: dict = field(default_factory=dict)

    def to_json(self, written: list[str]) -> dict:
        """The --json document: what was explained, the settings, the map, the files written."""
        return {
            "image": self.image,
            "method": self.method,
            "target": self.target,
            "label": self.label,
            "base_probability": self.base,
            **self.details,
            "map": _json_values(self.values),
            "outputs": written,
        }


def _fill_record(fill):
    """The patch's fill for the JSON record: a number, one per channel, or a positional fill's name."""
    if isinstance(fill, tuple):
        return list(fill)
    return fill if isinstance(fill, float) else fill.name()


def run_occlusion(
    engine, image, target, *, batch_size, run_options, desc: str, show_bar: bool
) -> kfx.Progress:
    """Compute the map, driving a tqdm bar (positions/s) from the engine's stream; the last step."""
    total = math.prod(engine.patch.grid_shape(tuple(image.shape[1:])))
    bar = progress_bar(desc, total=total, show=show_bar, file=sys.stderr, delay=PROGRESS_DELAY_S, leave=False)
    step = follow_progress(engine.stream(image, target, batch_size=batch_size, **run_options), bar)
    check_no_nan(step.heatmap.values, desc)
    return step


def check_no_nan(values: torch.Tensor, desc: str) -> None:
    """Every cell was run: NaN is the model's arithmetic failing (float16 overflow, ...)."""
    missing = int(torch.isnan(values).sum())
    if missing:
        dtype = str(values.dtype).removeprefix("torch.")
        half = values.dtype in (torch.float16, torch.bfloat16)
        hint = "run it in float32" if half else "check what it computes on occluded inputs (--fill)"
        raise ModelError(
            f"{desc}: the model gave NaN probabilities at {missing} of {values.numel()} patch "
            f"positions (dtype {dtype}); {hint}"
        )


@dataclass(frozen=True)
class Session:
    """What every image of one ``kfx explain`` shares: the options, the model, the compiled engine."""

    args: argparse.Namespace
    loaded: object  # kfx.models.LoadedModel
    model: torch.nn.Module
    engine: object | None = None  # kfx.Engine, for --method occlusion
    compile_s: float = 0.0
    run_options: dict = field(default_factory=dict)  # e.g. drill_down, passed to each run


def _explain_occlusion(session: Session, name: str, image: torch.Tensor, target: int) -> Explanation:
    """The occlusion map of one image, with its settings and timings for --json."""
    args, engine = session.args, session.engine
    step = cli.run_occlusion(
        engine,
        image,
        target,
        batch_size=args.batch_size,
        run_options=session.run_options,
        desc=_stem(name),
        show_bar=_show_progress(args),
    )
    heatmap, patch = step.heatmap, engine.patch
    details = {
        "model": session.loaded.name,
        "size": int(image.shape[-1]),
        "input_shape": list(image.shape),
        "grid": list(heatmap.values.shape),
        "patch": list(patch.size),
        "stride": list(patch.stride),
        "fill": _fill_record(patch.fill),
        "tau": args.tau,
        "global_context": engine.global_context,
        "drill_down": _drill_down_details(session.run_options.get("drill_down")),
        "backend": engine.backend,
        "timings": {
            "compile_s": session.compile_s,  # once, for all the images of this command
            "run_s": step.elapsed,
            "positions": step.done,
            "positions_per_second": step.positions_per_second,
        },
        "theoretical_speedup": engine.cost().theoretical_speedup,
        "plan": None if getattr(engine, "plan", None) is None else engine.plan.summary(),
        "threads": torch.get_num_threads(),
    }
    return Explanation(
        name, "occlusion", heatmap.target, session.loaded.label(heatmap.target), heatmap.base,
        heatmap.values, step.elapsed, step.done, heatmap, details,
    )  # fmt: skip


def _drill_down_details(drill_down: kfx.DrillDown | None) -> dict | None:
    """The --json record of a drill-down: its rule and the settings it was given (None: not set)."""
    if drill_down is None:
        return None
    fields = ("rule", "queries", "target_speedup", "target_ssim", "fraction", "stage1_stride")
    settings = {name: getattr(drill_down, name) for name in fields}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in settings.items() if v is not None}


def _explain_neuromask(
    session: Session, name: str, image: torch.Tensor, target: int, base: float
) -> Explanation:
    """The NeuroMask mask of one image (kfx.neuromask's defaults unless --steps / --seed)."""
    args = session.args
    steps = args.steps or DEFAULT_STEPS
    seed = 0 if args.seed is None else args.seed
    started = time.perf_counter()
    mask = kfx.neuromask(session.model, image, target, steps=steps, seed=seed)
    run_s = time.perf_counter() - started
    if not bool(torch.isfinite(mask).all()):  # never written as a map with holes (JSON nulls)
        raise ModelError(
            f"{name}: NeuroMask's mask holds NaN or infinite values after {steps} steps with the model "
            f"in {str(image.dtype).removeprefix('torch.')}; run it in float32 (or try another --seed)"
        )
    details = {
        "model": session.loaded.name,
        "size": int(image.shape[-1]),
        "steps": steps,
        "seed": seed,
        "timings": {"run_s": run_s, "steps_per_second": steps / run_s if run_s > 0 else 0.0},
        "threads": torch.get_num_threads(),
    }
    label = session.loaded.label(target)
    return Explanation(name, "neuromask", target, label, base, mask.cpu(), run_s, details=details)


def _save_picture(result: Explanation, image: torch.Tensor, path, source: ArrayInput | None) -> None:
    """The occlusion map's picture for its rank: a line plot (signals), the map over the image
    (images), three slices through the most important voxel (volumes)."""
    from kfx import plot, plot_nd

    axes = result.heatmap.values.dim()
    if axes == 1:
        plot_nd.save_signal(result.heatmap, path, image, label=result.label)
    elif axes == 3:
        geometry = {"axis_names": source.axis_names, "spacing": source.spacing} if source else {}
        plot_nd.save_volume(result.heatmap, path, image, label=result.label, **geometry)
    else:
        plot.save(result.heatmap, path, image, label=result.label)


def _nifti_map(result: Explanation, source: ArrayInput, path: Path) -> bytes:
    """The per-voxel map (occlusion: the drop in probability; NeuroMask: the mask) as NIfTI."""
    if result.heatmap is not None:
        pixels, what = result.heatmap.to_pixels(), "occlusion drop in P"
    else:
        pixels, what = result.values, "NeuroMask mask for"
    return nifti_bytes(pixels, source, path, f"kfx {what}({result.label})")


def _write_outputs(
    result: Explanation, image: torch.Tensor, outputs: Outputs, source: ArrayInput | None = None
) -> list[str]:
    """Write the picture, the .npy, the NIfTI map and the JSON; the paths written (JSON to stdout
    not included). ``source``: the array the input came from (None for pictures)."""
    import numpy as np

    from kfx import plot

    written = []
    if result.heatmap is not None:
        _writing(outputs.picture, lambda p: _save_picture(result, image, p, source))
    else:
        steps = result.details.get("steps")
        _writing(
            outputs.picture,
            lambda p: plot.save_mask(
                result.values, p, image, label=result.label, base=result.base, steps=steps
            ),
        )
    written.append(str(outputs.picture))
    if outputs.npy is not None:
        _writing(outputs.npy, lambda p: np.save(p, _numpy_values(result.values)))
        written.append(str(outputs.npy))
    if outputs.nifti is not None:
        data = _nifti_map(result, source, outputs.nifti)
        _writing(outputs.nifti, lambda p: Path(p).write_bytes(data))
        written.append(str(outputs.nifti))
    if isinstance(outputs.json, Path):
        written.append(str(outputs.json))
    if outputs.json is not None:
        text = json.dumps(result.to_json(written))
        if outputs.json == "-":
            print(text, flush=True)
        else:
            _writing(outputs.json, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))
    return written


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.1f} s"


def _summary(result: Explanation, written: list[str]) -> str:
    """One line per image: what the model sees, where the files went, how fast it was."""
    named = (
        result.label
        if result.label == f"class {result.target}"
        else f"{result.label} (class {result.target})"
    )
    head = f"{result.image}: {named}, p = {result.base:.3f} -> {', '.join(written)}"
    if result.method == "neuromask":
        return f"{head}; NeuroMask, {result.details['steps']} steps in {_seconds(result.run_s)}"
    speed = result.positions / result.run_s if result.run_s > 0 else 0.0
    return f"{head}; {result.positions} positions in {_seconds(result.run_s)}, {speed:,.0f} positions/s"


def _show_progress(args) -> bool:
    """A bar only for a person watching: not with --quiet, not when stderr is a file or a pipe."""
    return not args.quiet and sys.stderr.isatty()


# -- subcommands ----------------------------------------------------------------------------------


def _explain(args) -> int:
    """``kfx explain``: every check that needs no model first, then load, compile once per input
    shape, run each input."""
    _check_method_options(args)
    _check_size_option(args)
    check_readers(args.images)
    occlusion = args.method == "occlusion"
    compile_options, run_options = _approximate_options(args) if occlusion else ({}, {})
    device = _device(args.device)
    backend = _check_backend(args.backend, device) if occlusion else None
    stems = [_stem(name) for name in args.images]
    plans = plan_outputs(args, stems, [is_nifti_file(name) for name in args.images])
    loaded = _load_model(args)
    model = loaded.model.to(device)
    size = args.size or loaded.size
    pictures = not all(is_array_file(name) for name in args.images)
    picture_patch = _patch(args, size) if occlusion and pictures else None
    named_target = _named_target(loaded, args.target)
    sources = [_read_input(name) for name in args.images]  # all first: a bad file fails before long work
    if not occlusion:
        _check_neuromask_inputs(sources)
    images = [_input_tensor(loaded, source, name, size, device) for source, name in zip(sources, args.images)]
    patches = [_input_patch(args, source, picture_patch) if occlusion else None for source in sources]
    # The unoccluded predictions first: a model that fails on this --size or this array, or a
    # --target it does not have, is reported before compiling and before any long run.
    probabilities = [
        _probabilities(model, image, size, array_advice(model, source) if _is_array(source) else None)
        for image, source in zip(images, sources)
    ]
    targets = [_target(named_target, p.shape[0], int(p.argmax())) for p in probabilities]
    session = Session(args, loaded, model, run_options=run_options)
    sessions = {}  # one compiled engine per input shape: pictures share one, arrays may differ
    summaries = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON with --json -
    inputs = zip(args.images, sources, images, patches, plans, probabilities, targets)
    for name, source, image, patch, outputs, probability, target in inputs:
        if occlusion:
            shape = tuple(image.shape)
            if shape not in sessions:
                sessions[shape] = _compiled(session, shape, patch, backend, compile_options)
            result = _explain_occlusion(sessions[shape], name, image, target)
        else:
            result = _explain_neuromask(session, name, image, target, float(probability[target]))
        written = _write_outputs(result, image, outputs, source if _is_array(source) else None)
        if not args.quiet:
            print(_summary(result, written), file=summaries, flush=True)
    return EXIT_OK


def _compiled(session: Session, shape: tuple[int, ...], patch, backend, compile_options) -> Session:
    """``session`` with the engine for inputs of ``shape`` and the time it took to compile."""
    args = session.args
    started = time.perf_counter()
    engine = kfx.compile(
        session.model, shape, patch, batch_size=args.batch_size, backend=backend, **compile_options
    )
    return replace(session, engine=engine, compile_s=time.perf_counter() - started)


def _is_array(source) -> bool:
    return isinstance(source, ArrayInput)


def _read_input(name: str):
    """A .npy or NIfTI file as an ArrayInput, anything else as a picture's pixels."""
    return read_array(name) if is_array_file(name) else cli.read_image(name)


def _input_tensor(loaded, source, name: str, size: int, device: torch.device) -> torch.Tensor:
    """The model's input: an array as it is (in the model's dtype), a picture resized and normalised."""
    if _is_array(source):
        return array_model_input(loaded.model, source, device)
    return _model_input(loaded, source, name, size, device)


def _input_patch(args, source, picture_patch: kfx.Patch) -> kfx.Patch:
    return array_patch(args, source) if _is_array(source) else picture_patch


def _check_size_option(args) -> None:
    """--size resizes pictures: with only arrays to explain it would be ignored, so it is a mistake."""
    if args.size is not None and all(is_array_file(name) for name in args.images):
        raise UsageError(
            "--size resizes pictures, and .npy and NIfTI inputs are taken as they are (the model's "
            "input); resize them beforehand, or leave --size out"
        )


def _check_neuromask_inputs(sources) -> None:
    for source in sources:
        if _is_array(source) and source.axes != 2:
            raise UsageError(
                f"--method neuromask explains images [C, H, W], and {source.name} is a {KINDS[source.axes]} "
                f"of shape {list(source.values.shape)}; use --method occlusion"
            )
