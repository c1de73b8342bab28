"""``kfx report``: one self-contained HTML page about a ``kfx batch`` results folder (kfx/report.py)."""

from __future__ import annotations

import argparse

from kfx.cli.common import EXIT_OK
from kfx.cli.options import _finite_float, _positive_int


def _border(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction of the side in (0, 0.5), got {value}")
    return value


def add_report(subparsers) -> None:
    from kfx.report import DEFAULT_BORDER, DEFAULT_CLASSES, DEFAULT_TOP, REPORT_FILE

    parser = subparsers.add_parser(
        "report",
        help="one self-contained HTML page about a kfx batch results folder",
        description="Write one HTML page (it opens offline) about the results in DIR: counts and "
        "error rows, the mean map per explained class, the images whose maps put the largest share "
        "of their drop in a band along the edges (a spurious-cue finder), and a table of every "
        "input that sorts by any column.",
        epilog="The outside share is the share of a map's positive per-pixel drop lying in the band "
        "of --border x the side along each edge: a proxy for drop outside the object, since the "
        "results hold no object masks. Exit status: 0 written; 1 DIR holds no results or the page "
        "cannot be written; 2 a bad command line.",
    )
    parser.add_argument("results", metavar="DIR", help="the --out folder of a kfx batch run")
    parser.add_argument(
        "-o", "--output", metavar="FILE", help=f"where the page goes (default DIR/{REPORT_FILE})"
    )
    parser.add_argument(
        "--fingerprint", metavar="PREFIX", help="the configuration to report on, when DIR holds several"
    )
    parser.add_argument(
        "--border",
        type=_border,
        default=DEFAULT_BORDER,
        metavar="F",
        help=f"the edge band's width as a fraction of the side ({DEFAULT_BORDER})",
    )
    parser.add_argument(
        "--top",
        type=_positive_int,
        default=DEFAULT_TOP,
        metavar="N",
        help=f"images shown by the spurious-cue finder ({DEFAULT_TOP})",
    )
    parser.add_argument(
        "--classes",
        type=_positive_int,
        default=DEFAULT_CLASSES,
        metavar="N",
        help=f"mean maps drawn, most frequent classes first ({DEFAULT_CLASSES})",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    parser.set_defaults(handler=_report)


def _report(args) -> int:
    from kfx.report import write_report

    path = write_report(
        args.results,
        args.output,
        fingerprint=args.fingerprint,
        border=args.border,
        top=args.top,
        classes=args.classes,
    )
    if not args.quiet:
        print(f"kfx report: wrote {path}", flush=True)
    return EXIT_OK
