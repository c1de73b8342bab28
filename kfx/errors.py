"""kfx's exceptions. Every error kfx raises on bad input derives from :class:`KfxError`.

Each message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "KfxError",
    "InputError",
    "PatchError",
    "ModelError",
    "TraceError",
]


class KfxError(Exception):
    """Base class of every error kfx raises on purpose."""


class InputError(KfxError, ValueError):
    """An image, a set of positions or a target that does not fit the compiled engine."""


class PatchError(KfxError, ValueError):
    """A patch specification that cannot be applied to the image (too large, stride < 1, bad fill)."""


class ModelError(KfxError):
    """A model kfx cannot use as given (training mode, more than one input, unsupported output)."""


class TraceError(ModelError):
    """torch.fx could not trace the model symbolically."""
