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

import contextlib
import os
import sys
from collections.abc import Sequence

import torch

from kfx.cli.common import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PATCH,
    DEFAULT_PICTURE,
    DEMO_NAIVE_POSITIONS,
    DEMO_QUICK_STRIDE,
    DEMO_STRIDE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    NEUROMASK_ONLY,
    OCCLUSION_ONLY,
    PROGRESS_DELAY_S,
    STEM,
    OutputError,
    UsageError,
    _one_line,
)
from kfx.cli.demo import PhotoRun, time_full_inference
from kfx.cli.explain import Explanation, Session, run_occlusion
from kfx.cli.images import read_image
from kfx.cli.outputs import Outputs, plan_outputs
from kfx.cli.parser import _Parser as _Parser
from kfx.cli.parser import build_parser
from kfx.errors import KfxError

# Everything kfx.cli offered as one module stays a name of the package. _run looks build_parser up
# here and the subcommands look read_image and run_occlusion up here, so replacing kfx.cli.NAME
# (as the tests do) takes effect.
__all__ = [
    "main",
    "build_parser",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_PATCH",
    "DEFAULT_PICTURE",
    "DEMO_NAIVE_POSITIONS",
    "DEMO_QUICK_STRIDE",
    "DEMO_STRIDE",
    "NEUROMASK_ONLY",
    "OCCLUSION_ONLY",
    "PROGRESS_DELAY_S",
    "STEM",
    "OutputError",
    "UsageError",
    "Explanation",
    "Outputs",
    "PhotoRun",
    "Session",
    "plan_outputs",
    "read_image",
    "run_occlusion",
    "time_full_inference",
]


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
