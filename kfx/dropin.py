"""What kfx's drop-ins for other libraries share (``kfx.captum.Occlusion``,
``kfx.monai.OcclusionSensitivity``): the warning a call gets when it runs on the original library
because kfx cannot accelerate it, the internal signal that says so, and the key under which
compiled engines are cached for a model."""

from __future__ import annotations

from torch import nn

from kfx.engine import model_state
from kfx.errors import InputError, KfxError

__all__ = ["NotAcceleratedWarning", "NotAccelerated", "weights_version"]


class NotAcceleratedWarning(UserWarning):
    """A call ran on the original library's implementation (Captum's Occlusion, MONAI's
    OcclusionSensitivity) because kfx cannot accelerate it; the message says why."""


class NotAccelerated(Exception):
    """Internal signal: this call cannot take the fast path; ``error`` is the kfx error to raise
    when the original library is not installed to run it instead."""

    def __init__(self, reason: str, error: type[KfxError] = InputError):
        super().__init__(reason)
        self.reason = reason
        self.error = error


def weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is modified in place (optimizer steps, load_state_dict)
    or replaced (``model.fc = ...``), so cached engines are recompiled for the model as it is now."""
    return (id(model), *model_state(model))
