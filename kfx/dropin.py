"""What kfx's drop-ins for other libraries share (``kfx.captum.Occlusion``,
``kfx.monai.OcclusionSensitivity``): the warning a call gets when it runs on the original library
because kfx cannot accelerate it, the internal signal that says so, and the key under which
compiled engines are cached for a model."""

from __future__ import annotations

import warnings

from torch import nn

from kfx.errors import InputError, KfxError
from kfx.model_state import model_state, settings_key

__all__ = ["NotAcceleratedWarning", "NotAccelerated", "weights_version", "fall_back"]


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
    or replaced (``model.fc = ...``), or a module's settings or hooks change, so cached engines are
    recompiled for the model as it is now."""
    return (id(model), *model_state(model), settings_key(model))


def fall_back(owner, why: NotAccelerated, original, *, call: str, ours: str, theirs: str, package: str):
    """The original library's class to run a call kfx cannot accelerate: records ``why`` on
    ``owner.last_fallback_reason`` and warns once per reason and drop-in object; raises
    ``why.error`` when the library (``original`` is None) is not installed to run it instead."""
    owner.last_fallback_reason = why.reason
    if original is None:
        raise why.error(
            f"kfx cannot accelerate this {call} call ({why.reason}), and {package}, which would compute it "
            f"instead, is not installed: pip install {package.lower()}, or change the call"
        )
    if why.reason not in owner._warned:
        owner._warned.add(why.reason)
        warnings.warn(f"{ours} ran {theirs} instead: {why.reason}", NotAcceleratedWarning, stacklevel=4)
    return original
