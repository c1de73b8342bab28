"""What every part of the ``kfx`` command line shares: exit codes, defaults and its own errors."""

from __future__ import annotations

from kfx.common import DEFAULT_BATCH_SIZE
from kfx.errors import KfxError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_PATCH = 16
DEFAULT_PICTURE = "{stem}_kfx.png"
STEM = "{stem}"
DEMO_STRIDE, DEMO_QUICK_STRIDE = 4, 8
DEMO_NAIVE_POSITIONS = DEFAULT_BATCH_SIZE  # per photo: one batch of the default size
PROGRESS_DELAY_S = 1.0  # tqdm shows a bar only for runs longer than this
OCCLUSION_ONLY = ("patch", "stride", "fill", "batch_size", "backend", "tau", "global_context", "drill_down")
NEUROMASK_ONLY = ("steps", "seed")


class UsageError(KfxError):
    """A bad command line: an option value kfx rejects before running anything (exit 2)."""


class OutputError(KfxError):
    """An output file that cannot be written (exit 1)."""


def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever the exception's text holds."""
    return " ".join(str(exc).split()) or type(exc).__name__
