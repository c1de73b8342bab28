"""The ``kfx`` argument parser: the subcommands (explain, demo, serve, batch, report) and their options."""

from __future__ import annotations

import argparse

import kfx
from kfx.cli.batch import add_batch
from kfx.cli.common import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PATCH,
    DEMO_NAIVE_POSITIONS,
    DEMO_QUICK_STRIDE,
    DEMO_STRIDE,
    EXIT_USAGE,
    UsageError,
    _one_line,
)
from kfx.cli.demo import _demo
from kfx.cli.explain import _explain
from kfx.cli.options import _drill_down, _fill, _int_axes, _positive_int, _tau
from kfx.cli.report import add_report
from kfx.neuromask import DEFAULT_STEPS

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
        "incremental) or a NeuroMask mask, written as a picture (and optionally JSON / .npy). "
        "Signals and volumes (.npy, NIfTI) get a line plot over the map, or three slices through "
        "the most important voxel; NIfTI inputs also get the per-voxel map as NIfTI.",
        epilog="Outputs (--out, --json, --npy, --nifti) take a file path, a directory (existing, or ending "
        "in '/'; gets <stem>_kfx.<ext>), or a pattern with {stem} (the image's file name without "
        "extension, or the sample name). With several images a single file path is an error. "
        "--json - writes JSON to stdout, one line per image, and the summary lines go to stderr. "
        "The progress bar appears only when stderr is a terminal and a map takes over a second.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="an image file, a scikit-image sample photo name (chelsea, coffee, astronaut, rocket, ...), "
        "a .npy array [C, L], [C, H, W] or [C, D, H, W] (channels first, the model's input as it is), "
        "or a NIfTI volume (.nii, .nii.gz; needs kfx[medical])",
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
        help="input side: pictures are resized and centre-cropped to it (default: the model's, 224); "
        ".npy and NIfTI inputs are taken as they are",
    )
    parser.add_argument(
        "--target", metavar="CLASS", help="class index or label name (default: the predicted class)"
    )
    occlusion = parser.add_argument_group("occlusion options")
    occlusion.add_argument(
        "--patch",
        type=_int_axes,
        metavar="N|HxW|DxHxW",
        help=f"patch side in pixels (samples, voxels), one for every axis or one per axis (default {DEFAULT_PATCH})",
    )
    occlusion.add_argument(
        "--stride", type=_int_axes, metavar="N|HxW|DxHxW", help="grid step (default patch // 4)"
    )
    occlusion.add_argument(
        "--fill",
        type=_fill,
        metavar="V|R,G,B|mean_patch|mean_image|blur",
        help="what the patch holds, in model-input space (after normalisation): one float or one per "
        "channel (default 0.0: the mean colour for ImageNet-normalised models, mid-gray for the "
        "default model's [-1, 1] inputs), or content from the input itself: mean_patch (the covered "
        "region's mean), mean_image, blur (a Gaussian-blurred copy of the region)",
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
        help="approximate: projective-field threshold in (0, 1], 1 = exact",
    )
    occlusion.add_argument(
        "--global-context",
        choices=("exact", "local"),
        help="squeeze-excitation gates: exact (default; dense after the first gate) or local (approximate: "
        "each gate applied inside the changed box only, as fast as the model without gates)",
    )
    occlusion.add_argument(
        "--drill-down",
        type=_drill_down,
        metavar="SPEEDUP|FRACTION:SPEEDUP|KEY=VALUE,...",
        help="approximate: drill-down from fewer queries. 3 = kfx.DrillDown(target_speedup=3), the adaptive "
        "rule; ssim=0.9 or queries=500 its other budgets; 0.25:3 = the two-stage rule "
        "kfx.DrillDown(fraction=0.25, target_speedup=3); rule=paper,fraction=0.25,speedup=3 the paper's",
    )
    neuromask = parser.add_argument_group("neuromask options")
    neuromask.add_argument(
        "--steps", type=_positive_int, metavar="N", help=f"optimisation steps (default {DEFAULT_STEPS})"
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
    outputs.add_argument(
        "--nifti",
        metavar="PATH",
        help="NIfTI inputs: the per-voxel map (the drop in probability, Heatmap.to_pixels) with the "
        "input's affine, to lay over the scan in a viewer (default <stem>_kfx.nii.gz here)",
    )
    outputs.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary lines")
    parser.set_defaults(handler=_explain)


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="heat maps of the bundled photos and the measured speedup",
        description="Occlusion maps of scikit-image's sample photos with the default model, as one "
        "gallery picture, and kfx's speedup over batched full inference measured in this run "
        f"(patch {DEFAULT_PATCH}, stride {DEMO_STRIDE}: 2,809 positions per photo; --quick: stride "
        f"{DEMO_QUICK_STRIDE}, 729 per photo).",
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
        help=f"positions per batch, kfx and full inference alike (default {DEFAULT_BATCH_SIZE})",
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
    """The ``kfx`` parser with its subcommands (explain, demo, serve, batch, report)."""
    parser = _Parser(
        prog="kfx",
        description="Exact, incremental occlusion heat maps for PyTorch CNNs.",
        epilog="Exit status: 0 success; 2 a bad command line (unknown option, bad option value, patch "
        "larger than the input, unknown --target, a --drill-down kfx.DrillDown refuses); 1 a "
        "runtime failure (missing or unreadable image, model or weights that cannot be loaded or "
        "traced, output that cannot be written); 130 interrupted (Ctrl-C). Errors are one line on stderr: "
        "'kfx: error: ...'.",
    )
    parser.add_argument("--version", action="version", version=f"kfx {kfx.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_explain(subparsers)
    _add_demo(subparsers)
    _add_serve(subparsers)
    add_batch(subparsers)
    add_report(subparsers)
    return parser
