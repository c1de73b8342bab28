"""Images for ``kfx``: reading files and sample photos, the model's input and its unoccluded prediction."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kfx.cli.common import UsageError
from kfx.common import model_dtype_device
from kfx.errors import InputError, KfxError, ModelError

# -- images ---------------------------------------------------------------------------------------


def _stem(name: str) -> str:
    """What an image's outputs are named after: the file name without extension (both of .nii.gz),
    or the sample name."""
    file_name = Path(name).name
    if file_name.lower().endswith(".nii.gz") and len(file_name) > len(".nii.gz"):
        return file_name[: -len(".nii.gz")]
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
    dtype, _ = model_dtype_device(loaded.model, default=(torch.get_default_dtype(), device))
    return image.to(device=device, dtype=dtype)


def _probabilities(
    model: torch.nn.Module, image: torch.Tensor, size: int, advice: str | None = None
) -> torch.Tensor:
    """Softmax [num_classes] of the model on the unoccluded image; ModelError when it cannot say
    (``advice``: what to check when the model fails on it; default: --size)."""
    try:
        with torch.no_grad():
            scores = model(image[None])
    except Exception as exc:  # any failure inside the user's model: name it, with the input it got
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"the model failed on a {list(image.shape)} input ({type(exc).__name__}: {first}); "
            f"{advice or f'check --size (now {size}) against what it expects'}"
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
