"""``kfx batch``: occlusion maps of a whole dataset into Parquet, resumable (``kfx.explain_dataset``)."""

from __future__ import annotations

import argparse
import sys

from kfx.cli.common import DEFAULT_PATCH, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, UsageError
from kfx.cli.options import _drill_down, _fill, _int_pair, _positive_int, _tau
from kfx.errors import PatchError

LOCAL_RAY = "local"  # --ray without an address: start a Ray on this machine


def add_batch(subparsers) -> None:
    from kfx.dataset import PART_ROWS

    parser = subparsers.add_parser(
        "batch",
        help="heat maps of a whole dataset into Parquet, resumable (locally or on Ray)",
        description="Explain every image of SOURCE and write one row per image (the map, target, "
        "label, probability, timings, status) to Parquet parts under --out. Rerunning the same "
        "command skips what is done and finishes the rest; a bad image becomes an error row.",
        epilog="SOURCE: a folder (recursive), a glob in quotes ('photos/**/*.jpg'), a .txt list of "
        "paths, a .csv of path[,target] rows (header optional), or a .parquet table with a path "
        "column. Read the results with kfx.read_results(DIR). Exit status: 0 all explained; 1 some "
        "inputs failed (listed in DIR/config-*/failures.txt) or a runtime failure; 2 a bad command "
        "line; 130 interrupted (finished results are written).",
    )
    parser.add_argument("source", metavar="SOURCE", help="folder, glob, .txt/.csv manifest or .parquet table")
    parser.add_argument("--out", required=True, metavar="DIR", help="the results folder (created if missing)")
    parser.add_argument(
        "--model",
        metavar="SPEC",
        help="efficientnet-lite0 (default), torchvision:NAME or package.module:factory, as for kfx explain",
    )
    parser.add_argument(
        "--weights", metavar="FILE", help="a state_dict file for a torchvision or factory model"
    )
    parser.add_argument("--size", type=_positive_int, metavar="N", help="input side (default: the model's)")
    parser.add_argument(
        "--target", metavar="CLASS", help="class for rows that name none (default: the predicted class)"
    )
    parser.add_argument(
        "--patch",
        type=_int_pair,
        default=DEFAULT_PATCH,
        metavar="N|HxW",
        help=f"patch side ({DEFAULT_PATCH})",
    )
    parser.add_argument("--stride", type=_int_pair, metavar="N|HxW", help="grid step (default patch // 4)")
    parser.add_argument(
        "--fill", type=_fill, metavar="V|R,G,B", help="patch value in model-input space (0.0)"
    )
    parser.add_argument("--tau", type=_tau, default=1.0, help="projective-field threshold, 1 = exact (1)")
    parser.add_argument(
        "--drill-down",
        type=_drill_down,
        metavar="SPEEDUP|FRACTION:SPEEDUP|KEY=VALUE,...",
        help="approximate maps from fewer queries, as for kfx explain (3 = kfx.DrillDown(target_speedup=3)); "
        "the settings are part of the configuration, and rows say approximate",
    )
    parser.add_argument(
        "--png",
        action="store_true",
        help="also write each image's picture (the map over the image, as kfx explain draws it) to "
        "DIR/config-*/images/<stem>-<hash>.png",
    )
    parser.add_argument(
        "--npy",
        action="store_true",
        help="also write each image's map as DIR/config-*/images/<stem>-<hash>.npy",
    )
    parser.add_argument("--batch-size", type=_positive_int, metavar="N", help="positions per batch (64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(auto)")
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        metavar="ADDRESS",
        help="run on Ray: no ADDRESS starts one here; 'auto' or ray://HOST:PORT joins a cluster "
        "(put --ray after SOURCE, or write --ray=ADDRESS)",
    )
    parser.add_argument(
        "--actors", type=_positive_int, metavar="N", help="Ray: explainer actors (CPUs // threads)"
    )
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="Ray: torch threads per actor (1)")
    parser.add_argument(
        "--part-rows", type=_positive_int, default=PART_ROWS, metavar="N", help=f"rows per part ({PART_ROWS})"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    parser.set_defaults(handler=_batch)


def _batch(args) -> int:
    from kfx.dataset import DatasetInterrupted, explain_dataset

    if args.ray is None and (args.actors is not None or args.threads is not None):
        raise UsageError("--actors and --threads apply to --ray runs")
    try:
        summary = explain_dataset(
            args.source,
            args.model,
            args.patch,
            args.out,
            runner="local" if args.ray is None else "ray",
            stride=args.stride,
            fill=args.fill,
            tau=args.tau,
            drill_down=_drill_down_option(args.drill_down),
            png=args.png,
            npy=args.npy,
            size=args.size,
            weights=args.weights,
            target=args.target,
            batch_size=args.batch_size,
            device=args.device,
            part_rows=args.part_rows,
            progress=not args.quiet and sys.stderr.isatty(),
            ray_address=None if args.ray in (None, LOCAL_RAY) else args.ray,
            actors=args.actors,
            threads=args.threads or 1,
        )
    except PatchError as exc:
        raise UsageError(f"--patch/--stride/--fill: {exc}") from None
    except DatasetInterrupted as interrupted:
        done = interrupted.summary
        print(
            f"kfx: error: interrupted (Ctrl-C); {done.done + done.failed} results of this run are written "
            f"to {done.folder}; run the same command again to finish the rest",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(f"kfx batch: {summary}", flush=True)
    if summary.failed:
        print(
            f"kfx: error: {summary.failed} of {summary.total} inputs failed; they are listed in {summary.failures}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_RUNTIME
    return EXIT_OK


def _drill_down_option(settings: dict | None):
    """The kfx.DrillDown of --drill-down, refused as kfx explain refuses it (a usage error)."""
    from kfx.cli.checks import _approximate_options

    if settings is None:
        return None
    only_drill_down = argparse.Namespace(tau=None, global_context=None, drill_down=settings)
    return _approximate_options(only_drill_down)[1]["drill_down"]
