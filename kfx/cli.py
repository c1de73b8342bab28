"""``kfx``: occlusion heat maps from the command line.

    kfx explain IMAGE [IMAGE ...] [--model SPEC] [--patch 16] [--stride 4] [--json -] ...
    kfx demo [--quick] [--out gallery.png]
    kfx serve [--port 7860]

Exit status: 0 success; 2 a bad command line (an unknown option, a bad option value, a patch that
does not fit, a target the model does not have, an option this kfx build lacks); 1 a runtime failure
(an image that is missing or unreadable, a model or weights that cannot be loaded or traced, an
output that cannot be written); 130 interrupted (Ctrl-C, at any point). Every failure prints one
line, ``kfx: error: ...``, to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import kfx
from kfx.errors import InputError, KfxError, ModelError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_PATCH = 16
DEFAULT_BATCH_SIZE = 64
DEFAULT_PICTURE = "{stem}_kfx.png"
STEM = "{stem}"
DEMO_STRIDE, DEMO_QUICK_STRIDE = 4, 8
DEMO_NAIVE_POSITIONS = 64  # per photo: one batch of the default size
PROGRESS_DELAY_S = 1.0  # tqdm shows a bar only for runs longer than this
OCCLUSION_ONLY = ("patch", "stride", "fill", "batch_size", "backend", "tau", "drill_down")
NEUROMASK_ONLY = ("steps", "seed")


class UsageError(KfxError):
    """A bad command line: an option value kfx rejects before running anything (exit 2)."""


class OutputError(KfxError):
    """An output file that cannot be written (exit 1)."""


# -- option types (argparse calls them; ArgumentTypeError becomes a one-line usage error) ----------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_pair(text: str) -> int | tuple[int, int]:
    """``16`` (square) or ``16x8`` (height x width), each at least 1."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 16 or 16x8), got {text!r}")
    try:
        values = [_positive_int(part) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected N or HxW with positive integers (e.g. 16 or 16x8), got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else (values[0], values[1])


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _fill(text: str) -> float | tuple[float, ...]:
    """One float for every channel, or comma-separated floats, one per channel (R,G,B)."""
    values = tuple(_finite_float(part.strip()) for part in text.split(","))
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(
            f"expected one value or three (R,G,B), got {len(values)} in {text!r}"
        )
    return values[0] if len(values) == 1 else values


def _tau(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"tau must be in (0, 1] (1 = exact), got {value}")
    return value


def _drill_down(text: str) -> tuple[float, float]:
    """``FRACTION:SPEEDUP``, e.g. ``0.25:3``."""
    fraction_text, colon, speedup_text = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"expected FRACTION:SPEEDUP (e.g. 0.25:3), got {text!r}")
    fraction, speedup = _finite_float(fraction_text), _finite_float(speedup_text)
    if not 0.0 < fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"FRACTION must be in (0, 1], got {fraction}")
    if speedup <= 0.0:
        raise argparse.ArgumentTypeError(f"SPEEDUP must be positive, got {speedup}")
    return fraction, speedup


# -- the parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``kfx: error: ...`` and where to find help."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"kfx: error: {message} (see '{self.prog} --help')\n")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="SPEC",
        help="efficientnet-lite0 (the default: embedded ImageNet weights), torchvision:NAME "
        "(random weights unless --weights), or package.module:factory (a callable returning an "
        "nn.Module, or an nn.Module)",
    )
    parser.add_argument(
        "--weights", metavar="FILE", help="a state_dict file for a torchvision or factory model"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs (default auto: cuda when available, else cpu)",
    )


def _add_explain(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="heat maps of images (occlusion, or a NeuroMask mask)",
        description="Explain a model's prediction on each IMAGE: an occlusion heat map (exact, "
        "incremental) or a NeuroMask mask, written as a picture (and optionally JSON / .npy).",
        epilog="Outputs (--out, --json, --npy) take a file path, a directory (existing, or ending "
        "in '/'; gets <stem>_kfx.<ext>), or a pattern with {stem} (the image's file name without "
        "extension, or the sample name). With several images a single file path is an error. "
        "--json - writes JSON to stdout, one line per image, and the summary lines go to stderr. "
        "The progress bar appears only when stderr is a terminal and a map takes over a second.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="an image file, or a scikit-image sample photo name (chelsea, coffee, astronaut, rocket, ...)",
    )
    _add_model_options(parser)
    parser.add_argument(
        "--method",
        choices=("occlusion", "neuromask"),
        default="occlusion",
        help="occlusion (default): the exact occlusion map; neuromask: a learned mask (kfx.neuromask)",
    )
    parser.add_argument(
        "--size",
        type=_positive_int,
        metavar="N",
        help="input side: images are resized and centre-cropped to it (default: the model's, 224)",
    )
    parser.add_argument(
        "--target", metavar="CLASS", help="class index or label name (default: the predicted class)"
    )
    occlusion = parser.add_argument_group("occlusion options")
    occlusion.add_argument(
        "--patch", type=_int_pair, metavar="N|HxW", help=f"patch side in pixels (default {DEFAULT_PATCH})"
    )
    occlusion.add_argument("--stride", type=_int_pair, metavar="N|HxW", help="grid step (default patch // 4)")
    occlusion.add_argument(
        "--fill",
        type=_fill,
        metavar="V|R,G,B",
        help="value painted in the patch, in model-input space (after normalisation), one float or "
        "one per channel (default 0.0: the mean colour for ImageNet-normalised models, mid-gray for "
        "the default model's [-1, 1] inputs)",
    )
    occlusion.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help=f"positions per batch (default {DEFAULT_BATCH_SIZE})",
    )
    occlusion.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        help="kernels (default auto: triton on CUDA when available)",
    )
    occlusion.add_argument(
        "--tau",
        type=_tau,
        help="approximate: projective-field threshold in (0, 1], 1 = exact (needs a kfx build with approximate modes)",
    )
    occlusion.add_argument(
        "--drill-down",
        type=_drill_down,
        metavar="FRACTION:SPEEDUP",
        help="approximate: adaptive drill-down, e.g. 0.25:3 = kfx.DrillDown(fraction=0.25, "
        "target_speedup=3) (needs a kfx build with approximate modes)",
    )
    neuromask = parser.add_argument_group("neuromask options")
    neuromask.add_argument(
        "--steps", type=_positive_int, metavar="N", help="optimisation steps (default kfx.neuromask's, 150)"
    )
    neuromask.add_argument(
        "--seed", type=int, metavar="N", help="seed of the mask's random start (default 0)"
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--out",
        metavar="PATH",
        help="the picture (PNG; PDF/SVG/JPG by extension); default <stem>_kfx.png here",
    )
    outputs.add_argument(
        "--json",
        metavar="PATH",
        help="JSON with the map, target, label, probability, grid and timings ('-' = stdout)",
    )
    outputs.add_argument("--npy", metavar="PATH", help="the map's values as a NumPy .npy file")
    outputs.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary lines")
    parser.set_defaults(handler=_explain)


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="heat maps of the bundled photos and the measured speedup",
        description="Occlusion maps of scikit-image's sample photos with the default model, as one "
        "gallery picture, and kfx's speedup over batched full inference measured in this run "
        f"(patch {DEFAULT_PATCH}, stride {DEMO_STRIDE}: 2,809 positions per photo, about 3 minutes on a "
        "quiet 2-core CPU; --quick: 729 per photo, about a minute there).",
    )
    _add_model_options(parser)
    parser.add_argument(
        "--out", default="gallery.png", metavar="PATH", help="the gallery picture (default gallery.png)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"stride {DEMO_QUICK_STRIDE} instead of {DEMO_STRIDE}"
    )
    parser.add_argument(
        "--photos",
        nargs="+",
        metavar="NAME",
        help="scikit-image photos (default: chelsea coffee astronaut rocket)",
    )
    parser.add_argument(
        "--naive-positions",
        type=_positive_int,
        default=DEMO_NAIVE_POSITIONS,
        metavar="N",
        help="positions per photo on which full inference is timed; its time is scaled to all positions "
        f"(default {DEMO_NAIVE_POSITIONS})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="positions per batch, kfx and full inference alike (default 64)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no printed lines")
    parser.set_defaults(handler=_demo)


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="the interactive explorer, a local web page (needs kfx[ui])")
    try:
        from kfx import serve
    except Exception as exc:  # an optional part: a broken import must not take explain/demo down
        reason = f"{type(exc).__name__}: {exc}"
        parser.set_defaults(handler=lambda args: _fail_serve(reason))
        return
    serve.add_arguments(parser)
    parser.set_defaults(handler=serve.run)


def _fail_serve(reason: str) -> int:
    """Exit 2, as for Gradio missing: this installation lacks the subcommand, nothing ran."""
    raise UsageError(
        f"kfx serve is unavailable in this installation ({_one_line(reason)}); reinstall it: pip install 'kfx[ui]'"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``kfx`` parser with its subcommands (explain, demo, serve)."""
    parser = _Parser(
        prog="kfx",
        description="Exact, incremental occlusion heat maps for PyTorch CNNs.",
        epilog="Exit status: 0 success; 2 a bad command line (unknown option, bad option value, patch "
        "larger than the input, unknown --target, --tau/--drill-down without approximate modes); 1 a "
        "runtime failure (missing or unreadable image, model or weights that cannot be loaded or "
        "traced, output that cannot be written); 130 interrupted (Ctrl-C). Errors are one line on stderr: "
        "'kfx: error: ...'.",
    )
    parser.add_argument("--version", action="version", version=f"kfx {kfx.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_explain(subparsers)
    _add_demo(subparsers)
    _add_serve(subparsers)
    return parser


# -- checks that need more than one option ------------------------------------------------------------


def _check_method_options(args) -> None:
    """Options of the other method are mistakes, not something to ignore silently."""
    foreign = NEUROMASK_ONLY if args.method == "occlusion" else OCCLUSION_ONLY
    given = [name for name in foreign if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{flags} do(es) not apply to --method {args.method}")


def _approximate_options(args) -> tuple[dict, dict]:
    """``kfx.compile`` and run keyword arguments for --tau / --drill-down."""
    compile_options, run_options = {}, {}
    if args.tau is not None:
        compile_options["tau"] = args.tau
    if args.drill_down is not None:
        fraction, speedup = args.drill_down
        try:
            run_options["drill_down"] = kfx.DrillDown(fraction=fraction, target_speedup=speedup)
        except (KfxError, ValueError, TypeError) as exc:
            raise UsageError(f"--drill-down {fraction:g}:{speedup:g}: {exc}") from None
    return compile_options, run_options


def _patch(args, size: int) -> kfx.Patch:
    """The patch from --patch/--stride/--fill, checked against the input side."""
    size_hw = args.patch if args.patch is not None else DEFAULT_PATCH
    try:
        patch = kfx.Patch(size_hw, stride=args.stride, fill=0.0 if args.fill is None else args.fill)
        patch.check_fits((size, size))
    except KfxError as exc:
        raise UsageError(f"--patch {_pair_text(size_hw)}: {exc} (or a larger --size)") from None
    return patch


def _pair_text(value) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)


def _load_model(args):
    """The --model / --weights model; --weights with the default model is a usage error (exit 2)."""
    from kfx.models import DEFAULT_MODEL, load_model

    if args.weights is not None and args.model in (None, DEFAULT_MODEL):
        raise UsageError(
            f"--weights applies to --model torchvision:NAME or package.module:factory, not the default "
            f"{DEFAULT_MODEL} (its ImageNet weights are built in)"
        )
    return load_model(args.model, args.weights)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(choice)


def _check_backend(backend: str | None, device: torch.device) -> str:
    """The --backend choice, refused here (exit 2) when it cannot run on this machine."""
    from kfx import kernels

    backend = backend or "auto"
    try:
        kernels.resolve_backend(backend, device)
    except KfxError as exc:
        raise UsageError(f"--backend {backend}: {exc}") from None
    return backend


# -- images ---------------------------------------------------------------------------------------


def _stem(name: str) -> str:
    """What an image's outputs are named after: the file name without extension, or the sample name."""
    return Path(name).stem or name


def _is_sample_name(name: str) -> bool:
    from kfx.models import BUNDLED_IMAGES

    return name in BUNDLED_IMAGES and not Path(name).exists()


def read_image(name: str):
    """Pixels [H, W(, C)] of an image file, or of a scikit-image sample photo by name.

    A file that exists wins over a sample of the same name. Every failure is an InputError naming
    ``name``.
    """
    from kfx.models import read_pixels

    if Path(name).exists() and "/" not in name:
        name_or_path = os.path.join(".", name)  # read_pixels would take "chelsea" for the sample
    elif "/" not in name and "." not in name and not _is_sample_name(name):
        raise InputError(f"{name}: no such image file (nor a scikit-image sample photo)")
    else:
        name_or_path = name
    if Path(name_or_path).is_dir():
        raise InputError(f"{name}: is a directory, not an image file")
    try:
        return read_pixels(name_or_path)
    except KfxError:
        raise
    except Exception as exc:  # a sample that needs a download, or returns something odd
        raise InputError(
            f"{name}: cannot load this scikit-image sample ({type(exc).__name__}: {exc})"
        ) from None


def _model_input(loaded, pixels, name: str, size: int, device: torch.device) -> torch.Tensor:
    """The model's input [3, size, size] for ``pixels``, in the model's dtype, on ``device``."""
    try:
        image = loaded.prepare(pixels, size)
    except KfxError as exc:
        raise InputError(f"{name}: {exc}") from None
    return image.to(device=device, dtype=_model_dtype(loaded.model))


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return torch.get_default_dtype()


def _probabilities(model: torch.nn.Module, image: torch.Tensor, size: int) -> torch.Tensor:
    """Softmax [num_classes] of the model on the unoccluded image; ModelError when it cannot say."""
    try:
        with torch.no_grad():
            scores = model(image[None])
    except Exception as exc:  # any failure inside the user's model: name it, with the input it got
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"the model failed on a {list(image.shape)} input ({type(exc).__name__}: {first}); "
            f"check --size (now {size}) against what it expects"
        ) from None
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != 1:
        raise ModelError(
            f"heat maps need a model that returns [1, num_classes] scores; it returns "
            f"{type(scores).__name__} of shape {list(getattr(scores, 'shape', []))}"
        )
    if not bool(torch.isfinite(scores).all()):  # every probability of the map would be NaN
        raise ModelError(
            f"the model's scores on the unoccluded image hold NaN or infinite values (dtype "
            f"{str(scores.dtype).removeprefix('torch.')}); check the model and its --weights"
        )
    return torch.softmax(scores, dim=1)[0]


def _named_target(loaded, text: str | None) -> int | None:
    """--target as a class index (a label name looked up in the model's labels), before any work."""
    if text is None:
        return None
    try:
        return loaded.class_index(text)
    except KfxError as exc:
        message = str(exc)  # class_index says "target 'x' ...": make it name the option
        raise UsageError(
            "--" + message if message.startswith("target ") else f"--target {text}: {message}"
        ) from None


def _target(index: int | None, num_classes: int, predicted: int) -> int:
    """The class to explain: --target, checked against the model's output, or the predicted one."""
    if index is None:
        return predicted
    if not 0 <= index < num_classes:
        raise UsageError(f"--target {index}: the model has {num_classes} classes, 0 to {num_classes - 1}")
    return index


# -- outputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Where one image's results go: the picture always; JSON and .npy when asked (``json == "-"``:
    stdout)."""

    picture: Path
    json: str | Path | None
    npy: Path | None


def _output_path(option: str, stem: str, suffix: str, count: int, flag: str) -> Path:
    """A file for one image from a file path, a directory or a {stem} pattern."""
    if STEM in option:
        path = Path(option.replace(STEM, stem))
    elif option.endswith(("/", os.sep)) or Path(option).is_dir():
        path = Path(option) / f"{stem}_kfx{suffix}"
    elif count > 1:
        raise UsageError(
            f"{flag} {option} names one file but {count} images were given; give a directory "
            f"(ending in '/') or a pattern with {STEM}"
        )
    else:
        path = Path(option)
    return path if path.suffix else path.with_suffix(suffix)


def _check_picture_format(path: Path) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    extension = path.suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise UsageError(
            f"--out {path}: matplotlib cannot write .{extension} pictures; use .png (or .pdf, .svg, .jpg)"
        )


def plan_outputs(args, stems: Sequence[str]) -> list[Outputs]:
    """Every image's output paths, checked before any work: distinct, and in a writable place."""
    count = len(stems)
    if args.npy == "-":
        raise UsageError("--npy needs a file path (a .npy file is binary; use --json - for stdout)")
    plans = []
    for stem in stems:
        picture = _output_path(args.out or DEFAULT_PICTURE, stem, ".png", count, "--out")
        _check_picture_format(picture)
        json_path = args.json
        if json_path is not None and json_path != "-":
            json_path = _output_path(json_path, stem, ".json", count, "--json")
        npy = _output_path(args.npy, stem, ".npy", count, "--npy") if args.npy else None
        plans.append(Outputs(picture, json_path, npy))
    files = [p for plan in plans for p in (plan.picture, plan.json, plan.npy) if isinstance(p, Path)]
    clashes = sorted({str(p) for p in files if files.count(p) > 1})
    if clashes:
        raise UsageError(
            f"two outputs would both be written to {clashes[0]}; give images distinct names or use {STEM}"
        )
    for path in files:
        _check_writable_place(path)
    return plans


def _check_writable_place(path: Path) -> None:
    """Fail before a long run when an output's folder cannot take it (missing folders are made later)."""
    parent = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), Path("."))
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {parent}")


def _new_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the old file's, or the umask's for a new one."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary path beside ``path`` (same extension, so writers pick the format from it) that
    replaces ``path`` in one step once the block succeeds, and is removed if it fails."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(descriptor)
    try:
        yield temporary
        os.chmod(temporary, _new_file_mode(path))
        os.replace(temporary, path)
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _writing(path, write) -> None:
    """Run ``write(temporary path)`` and move the file onto ``path`` when it is complete, so that a
    failure midway (a full disk, Ctrl-C) leaves no truncated file and an older one intact. OS and
    format errors become one-line OutputErrors naming the file."""
    target = Path(os.path.realpath(path))  # through a symlink, as a plain write would go
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _replacing(target) as temporary:
            write(temporary)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a picture format matplotlib does not know
        raise OutputError(f"cannot write {path}: {exc}") from None


def _numpy_values(values: torch.Tensor):
    """The map as a NumPy array in its own dtype; bfloat16, which NumPy lacks, as float32 (exact)."""
    values = values.detach().cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def _json_values(values: torch.Tensor) -> list:
    """Nested lists of floats for JSON; cells without a value (NaN) become null."""
    return [[v if math.isfinite(v) else None for v in row] for row in values.detach().cpu().double().tolist()]


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


def _progress_bar(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="pos",
        delay=PROGRESS_DELAY_S,
        disable=not show,
        file=sys.stderr,
        leave=False,
    )


def run_occlusion(
    engine, image, target, *, batch_size, run_options, desc: str, show_bar: bool
) -> kfx.Progress:
    """Compute the map, driving a tqdm bar (positions/s) from the engine's stream; the last step."""
    total = math.prod(engine.patch.grid_shape(tuple(image.shape[-2:])))
    bar = _progress_bar(total, desc, show_bar)
    step = None
    try:
        for step in engine.stream(image, target, batch_size=batch_size, **run_options):
            if step.total != bar.total:
                bar.total = step.total
            bar.update(step.done - bar.n)
    finally:
        bar.close()
    values = step.heatmap.values
    missing = int(torch.isnan(values).sum())
    if missing:  # every cell was run: NaN is the model's arithmetic failing (float16 overflow, ...)
        dtype = str(values.dtype).removeprefix("torch.")
        half = values.dtype in (torch.float16, torch.bfloat16)
        hint = "run it in float32" if half else "check what it computes on occluded inputs (--fill)"
        raise ModelError(
            f"{desc}: the model gave NaN probabilities at {missing} of {values.numel()} patch "
            f"positions (dtype {dtype}); {hint}"
        )
    return step


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
    step = run_occlusion(
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
        "grid": list(heatmap.values.shape),
        "patch": list(patch.size),
        "stride": list(patch.stride),
        "fill": list(patch.fill) if isinstance(patch.fill, tuple) else patch.fill,
        "tau": args.tau,
        "drill_down": list(args.drill_down) if args.drill_down else None,
        "backend": engine.backend,
        "timings": {
            "compile_s": session.compile_s,  # once, for all the images of this command
            "run_s": step.elapsed,
            "positions": step.done,
            "positions_per_second": step.positions_per_second,
        },
        "theoretical_speedup": engine.cost().theoretical_speedup,
        "threads": torch.get_num_threads(),
    }
    return Explanation(
        name, "occlusion", heatmap.target, session.loaded.label(heatmap.target), heatmap.base,
        heatmap.values, step.elapsed, step.done, heatmap, details,
    )  # fmt: skip


def _explain_neuromask(
    session: Session, name: str, image: torch.Tensor, target: int, base: float
) -> Explanation:
    """The NeuroMask mask of one image (kfx.neuromask's defaults unless --steps / --seed)."""
    args = session.args
    steps = args.steps or inspect.signature(kfx.neuromask).parameters["steps"].default
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


def _write_outputs(result: Explanation, image: torch.Tensor, outputs: Outputs) -> list[str]:
    """Write the picture, the .npy and the JSON; the paths written (JSON to stdout not included)."""
    import numpy as np

    from kfx import plot

    written = []
    if result.heatmap is not None:
        _writing(outputs.picture, lambda p: plot.save(result.heatmap, p, image, label=result.label))
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
    """``kfx explain``: every check that needs no model first, then load, compile once, run each image."""
    _check_method_options(args)
    occlusion = args.method == "occlusion"
    compile_options, run_options = _approximate_options(args) if occlusion else ({}, {})
    device = _device(args.device)
    backend = _check_backend(args.backend, device) if occlusion else None
    stems = [_stem(name) for name in args.images]
    plans = plan_outputs(args, stems)
    loaded = _load_model(args)
    model = loaded.model.to(device)
    size = args.size or loaded.size
    patch = _patch(args, size) if occlusion else None
    named_target = _named_target(loaded, args.target)
    pixels = [read_image(name) for name in args.images]  # all first: a bad file fails before long work
    images = [_model_input(loaded, p, name, size, device) for p, name in zip(pixels, args.images)]
    # The unoccluded predictions first: a model that fails on this --size, or a --target it does
    # not have, is reported before compiling and before any long run.
    probabilities = [_probabilities(model, image, size) for image in images]
    targets = [_target(named_target, p.shape[0], int(p.argmax())) for p in probabilities]
    session = Session(args, loaded, model, run_options=run_options)
    if occlusion:
        started = time.perf_counter()
        engine = kfx.compile(
            model,
            tuple(images[0].shape),
            patch,
            batch_size=args.batch_size,
            backend=backend,
            **compile_options,
        )
        session = replace(session, engine=engine, compile_s=time.perf_counter() - started)
    summaries = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON with --json -
    for name, image, outputs, probability, target in zip(args.images, images, plans, probabilities, targets):
        if occlusion:
            result = _explain_occlusion(session, name, image, target)
        else:
            result = _explain_neuromask(session, name, image, target, float(probability[target]))
        written = _write_outputs(result, image, outputs)
        if not args.quiet:
            print(_summary(result, written), file=summaries, flush=True)
    return EXIT_OK


@dataclass(frozen=True)
class PhotoRun:
    """One demo photo: its map and both timings (kfx on every position, full inference on a subset)."""

    name: str
    label: str
    heatmap: kfx.Heatmap
    kfx_s: float
    positions: int
    naive_s: float
    naive_positions: int
    max_difference: float  # |kfx - full inference| over the subset, probabilities of the target


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads the time the work took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_full_inference(
    model, image, patch, positions, batch_size: int, target: int
) -> tuple[float, torch.Tensor]:
    """Seconds to run ``model(kfx.occlude(image, batch, patch))`` over ``positions`` in batches, and
    the target's probabilities: the baseline kfx replaces (KRYPTON's "naive" full inference)."""
    probabilities = []
    _synchronize(image.device)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, positions.shape[0], batch_size):
            scores = model(kfx.occlude(image, positions[start : start + batch_size], patch))
            probabilities.append(torch.softmax(scores, dim=1)[:, target])
    _synchronize(image.device)
    return time.perf_counter() - started, torch.cat(probabilities).cpu()


def _spread_indices(total: int, count: int) -> torch.Tensor:
    """``count`` grid indices spread evenly over ``total`` (full inference costs the same anywhere)."""
    return torch.linspace(0, total - 1, min(count, total)).round().long().unique()


def _warm_up(engine, model, image: torch.Tensor, patch: kfx.Patch) -> None:
    """One small untimed batch each way (lazy initialisation, allocator), on another image so that
    kfx's cache of the unoccluded activations does not favour the first timed photo."""
    other = torch.zeros_like(image)
    positions = kfx.grid_positions(tuple(image.shape[-2:]), patch)[:2]
    engine.outputs(other, positions)
    with torch.no_grad():
        model(kfx.occlude(other, positions, patch))


def _measure_photo(name, image, engine, model, loaded, args, show_bar: bool) -> PhotoRun:
    """kfx's whole map, then full inference on an evenly spread subset of the same positions."""
    _synchronize(image.device)
    started = time.perf_counter()
    step = run_occlusion(
        engine, image, None, batch_size=args.batch_size, run_options={}, desc=name, show_bar=show_bar
    )
    _synchronize(image.device)
    kfx_s = time.perf_counter() - started
    heatmap = step.heatmap
    grid = kfx.grid_positions(tuple(image.shape[-2:]), engine.patch)
    subset = _spread_indices(grid.shape[0], args.naive_positions)
    naive_s, naive = time_full_inference(
        model, image, engine.patch, grid[subset], args.batch_size, heatmap.target
    )
    ours = heatmap.values.reshape(-1)[subset].to(naive.dtype)
    return PhotoRun(
        name, loaded.label(heatmap.target), heatmap, kfx_s, step.done, naive_s, int(subset.numel()),
        float((ours - naive).abs().max()),
    )  # fmt: skip


def _demo_report(
    runs: list[PhotoRun], loaded, engine, batch_size: int, compile_s: float, device
) -> tuple[float, list[str]]:
    """The measured speedup and the lines that say honestly how it was measured."""
    positions = sum(run.positions for run in runs)
    kfx_s = sum(run.kfx_s for run in runs)
    naive_timed = sum(run.naive_positions for run in runs)
    naive_s = sum(run.naive_s for run in runs)
    naive_rate = naive_timed / naive_s
    naive_estimate = positions / naive_rate
    speedup = naive_estimate / kfx_s
    patch, theoretical = engine.patch, engine.cost().theoretical_speedup
    threads = f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs"
    where = threads if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} ({threads})"
    lines = [
        f"speedup {speedup:.2f}x over batched full inference, measured in this run ({loaded.name}, "
        f"patch {patch.size[0]}, stride {patch.stride[0]}, batches of {batch_size}; {where})",
        f"  kfx: all {positions} positions of {len(runs)} photos in {kfx_s:.1f} s = {positions / kfx_s:,.1f} positions/s "
        f"(compile {compile_s:.1f} s, once, not counted)",
        f"  full inference: timed on {naive_timed} of the same positions ({naive_timed // len(runs)} per photo, "
        f"evenly spread) in {naive_s:.1f} s = {naive_rate:,.1f} positions/s, scaled by count to {positions} "
        f"positions: {naive_estimate:.1f} s (estimated, not run in full)",
        f"  max |kfx - full inference| over the timed positions: {max(run.max_difference for run in runs):.1e}; "
        f"static FLOP model of this engine: {theoretical:.2f}x",
    ]
    return speedup, lines


def _demo(args) -> int:
    """``kfx demo``: maps of the sample photos, a gallery, and the speedup measured side by side."""
    from kfx import plot
    from kfx.models import SAMPLE_PHOTOS

    device = _device(args.device)
    out = Path(args.out) if Path(args.out).suffix else Path(args.out).with_suffix(".png")
    _check_picture_format(out)
    _check_writable_place(out)
    photos = args.photos or list(SAMPLE_PHOTOS)
    loaded = _load_model(args)
    model = loaded.model.to(device)
    images = [_model_input(loaded, read_image(name), name, loaded.size, device) for name in photos]
    patch = kfx.Patch(DEFAULT_PATCH, stride=DEMO_QUICK_STRIDE if args.quick else DEMO_STRIDE, fill=0.0)
    started = time.perf_counter()
    engine = kfx.compile(model, tuple(images[0].shape), patch, batch_size=args.batch_size)
    compile_s = time.perf_counter() - started
    _warm_up(engine, model, images[0], patch)
    show_bar = not args.quiet and sys.stderr.isatty()
    runs = []
    for name, image in zip(photos, images):
        run = _measure_photo(name, image, engine, model, loaded, args, show_bar)
        runs.append(run)
        if not args.quiet:
            print(
                f"{name}: {run.label} (p = {run.heatmap.base:.3f}); kfx {run.positions} positions in "
                f"{run.kfx_s:.1f} s, full inference {run.naive_positions} positions in {run.naive_s:.1f} s",
                flush=True,
            )
    speedup, lines = _demo_report(runs, loaded, engine, args.batch_size, compile_s, device)
    title = (
        f"kfx occlusion maps, {loaded.name}, patch {patch.size[0]}, stride {patch.stride[0]}: "
        f"{speedup:.1f}x faster than batched full inference here ({torch.get_num_threads()} threads)"
    )
    panels = [(run.heatmap, image, run.label, run.name) for run, image in zip(runs, images)]
    _writing(out, lambda p: plot.gallery(panels, p, title=title))
    if not args.quiet:
        print("\n".join([*lines, f"wrote {out}"]), flush=True)
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever the exception's text holds."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _error(message: str, status: int) -> int:
    print(f"kfx: error: {message}", file=sys.stderr, flush=True)
    return status


def _out_of_memory(exc: BaseException) -> str:
    where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "CPU"
    advice = "use a smaller --batch-size or --size, or --device cpu"
    return f"out of {where} memory ({_first_line(exc)}); {advice}"


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush at exit does not fail
    again on the closed pipe (Python's documented recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error argparse has printed (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except BrokenPipeError:  # stdout's reader (e.g. `| head`) stopped reading
        _silence_stdout()
        return _error("stdout was closed before kfx finished writing; the rest was not run", EXIT_RUNTIME)
    except UsageError as exc:
        return _error(_one_line(exc), EXIT_USAGE)
    except (KfxError, OSError) as exc:
        return _error(_one_line(exc), EXIT_RUNTIME)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        return _error(_out_of_memory(exc), EXIT_RUNTIME)
    except Exception as exc:  # a failure kfx does not anticipate: still one line, and said to be a bug
        return _error(
            f"unexpected {_first_line(exc)}; this is a bug: please report it with the command line",
            EXIT_RUNTIME,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kfx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # at any point, start-up included; written files are whole (_writing)
        return _error(
            "interrupted (Ctrl-C); the files written before it are complete, none is half-written",
            EXIT_INTERRUPTED,
        )


if __name__ == "__main__":
    sys.exit(main())
