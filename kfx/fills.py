"""Position-dependent patch fills: what the occluded image holds inside the window, per position.

A constant fill paints the same values wherever the patch goes. The fills here compute the window's
content from the image and the position: the covered region's mean (:class:`MeanPatch`), the image's
mean (:class:`MeanImage`), a Gaussian-blurred copy of the region (:class:`Blur`), the region times
a mask (:class:`Multiply`, e.g. MONAI's Gaussian occlusion) or the same region of a reference image
(:class:`Baseline`, e.g. Captum's baseline tensors). Only the window changes, whatever the
fill, so an incremental engine stays exact.

>>> import torch
>>> image = torch.arange(16.0).reshape(1, 4, 4)
>>> MeanPatch().content(image, torch.tensor([[0, 0], [2, 2]]), (2, 2))[:, 0]
tensor([[[ 2.5000,  2.5000],
         [ 2.5000,  2.5000]],
<BLANKLINE>
        [[12.5000, 12.5000],
         [12.5000, 12.5000]]])

Every fill works for 1, 2 and 3 spatial axes: ``image`` is [C, *S], ``positions`` [N, n] top-left
corners (n = len(S)), ``size`` the window's n extents, and :meth:`PositionalFill.content` returns the
window contents [N, C, *size] in the image's dtype and device. Fills are frozen dataclasses: equal
parameters compare and hash equal, so engines can be cached per fill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kfx.errors import InputError, PatchError

__all__ = [
    "PositionalFill",
    "MeanPatch",
    "MeanImage",
    "Blur",
    "Multiply",
    "Baseline",
    "resolve_fill",
    "windows",
]

# The fill names kfx.Patch(fill=...) accepts as strings, and the objects they stand for.
FILL_NAMES = ("mean_patch", "mean_image", "blur")


def windows(image: torch.Tensor, positions: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """The image's windows [N, C, *size] with top-left corners ``positions`` [N, n] (a gather, no loop).

    >>> windows(torch.arange(6.0).reshape(1, 6), torch.tensor([[1], [4]]), (2,))
    tensor([[[1., 2.]],
    <BLANKLINE>
            [[4., 5.]]])
    """
    positions = _check_windows(image, positions, size)
    n = len(size)
    # One index tensor per axis, shaped to broadcast to [N, *size]: advanced indexing gathers all windows.
    index = []
    for axis, extent in enumerate(size):
        shape = [positions.shape[0]] + [1] * n
        shape[axis + 1] = extent
        offsets = torch.arange(extent, device=image.device)
        index.append((positions[:, axis].to(image.device)[:, None] + offsets).view(shape))
    gathered = image[(slice(None), *index)]  # [C, N, *size]
    return gathered.movedim(0, 1)


def _check_windows(image, positions, size) -> torch.Tensor:
    """Validate the arguments every fill takes; return the positions as a long tensor [N, n]."""
    if not isinstance(image, torch.Tensor) or image.dim() < 2:
        raise InputError(f"image must be a tensor [C, *spatial], got {_describe(image)}")
    spatial = tuple(image.shape[1:])
    if (
        not isinstance(size, tuple)
        or len(size) != len(spatial)
        or not all(_is_int(s) and s >= 1 for s in size)
    ):
        raise PatchError(
            f"window size must be a tuple of {len(spatial)} positive ints (one per spatial axis of the "
            f"image {list(image.shape)}), got {size!r}"
        )
    if any(s > d for s, d in zip(size, spatial)):
        raise PatchError(
            f"window {size} is larger than the image's spatial shape {spatial}; use a smaller patch"
        )
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != len(spatial):
        raise InputError(
            f"positions must be an integer tensor [N, {len(spatial)}] of top-left corners, got {_describe(positions)}"
        )
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise InputError(f"positions must hold integers, got dtype {positions.dtype}")
    positions = positions.long()
    limits = torch.tensor([d - s for d, s in zip(spatial, size)], device=positions.device)
    bad = ((positions < 0) | (positions > limits)).any(dim=1)
    if bad.any():
        first = positions[bad.nonzero()[0, 0]].tolist()
        raise InputError(
            f"position {tuple(first)} puts the {size} window outside the image {spatial}; valid corners are "
            f"0 <= p <= {tuple(limits.tolist())} per axis"
        )
    return positions


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spatial_dims(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, image.dim()))


@dataclass(frozen=True, eq=False)
class PositionalFill:
    """Base class of fills whose content depends on where the patch is.

    Subclasses implement :meth:`content` (and may name themselves with :meth:`name`). Declared as
    ``@dataclass(frozen=True)``, two fills with the same parameters are equal and hash alike, so
    engines compiled for one serve the other. The base compares by identity: a subclass that is not
    a dataclass is equal only to itself, never to an instance with other parameters.
    """

    def content(self, image: torch.Tensor, positions: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """What the occluded image holds inside the window at each of ``positions``.

        Args:
            image: the unoccluded image [C, *S].
            positions: integer tensor [N, n] of top-left corners (n = len(S)); each window must fit.
            size: the window's extent along each of the n spatial axes.

        Returns:
            [N, C, *size], in the image's dtype and on its device.
        """
        raise NotImplementedError

    def name(self) -> str:
        """A short name for reprs and JSON (the string :func:`resolve_fill` takes, for kfx's own fills
        with default parameters); by default the fill's repr."""
        return repr(self)


@dataclass(frozen=True)
class MeanPatch(PositionalFill):
    """The mean of the covered region: per channel (the default), or over all channels together
    (``per_channel=False``, one value painted on every channel)."""

    per_channel: bool = True

    def content(self, image, positions, size):
        region = windows(image, positions, size)
        dims = tuple(range(2, region.dim())) if self.per_channel else tuple(range(1, region.dim()))
        return region.mean(dim=dims, keepdim=True).expand_as(region).clone()

    def name(self) -> str:
        return "mean_patch" if self.per_channel else "mean_patch(per_channel=False)"


@dataclass(frozen=True)
class MeanImage(PositionalFill):
    """The mean of the whole image: per channel (the default) or over all channels together. The same
    values at every position, but they follow the image, so one engine serves every image."""

    per_channel: bool = True

    def content(self, image, positions, size):
        positions = _check_windows(image, positions, size)
        if self.per_channel:
            mean = image.mean(dim=_spatial_dims(image))  # [C]
        else:
            mean = image.mean().expand(image.shape[0])  # one full reduction, as torch's x.mean()
        shape = (positions.shape[0], image.shape[0], *size)
        return mean.view(1, -1, *(1,) * len(size)).expand(shape).clone()

    def name(self) -> str:
        return "mean_image" if self.per_channel else "mean_image(per_channel=False)"


@dataclass(frozen=True)
class Blur(PositionalFill):
    """A Gaussian-blurred copy of the covered region: the whole image is blurred, then cropped to the
    window.

    Blurring the whole image (not the window on its own) makes the content a crop of one fixed image:
    a pixel's blurred value does not depend on where the window is, the patch's edges blend into
    their surroundings instead of being blurred against padding, and the blurred image is computed
    once per image rather than once per position. It is also what a Captum user gets by passing a
    blurred image as the baseline.

    Args:
        sigma: the Gaussian's standard deviation in pixels, one value or one per spatial axis (0 leaves
            that axis unblurred). None (the default) is a quarter of the patch size along each axis, so
            the patch loses the detail at its own scale whatever the image's resolution (4 pixels for
            a 16-pixel patch).
        truncate: the kernel's radius in standard deviations, ``int(truncate * sigma + 0.5)`` pixels.

    The kernel is the sampled Gaussian normalised to sum 1 and the border mode repeats the edge pixels
    (scipy.ndimage's ``mode="nearest"``, scikit-image's default), so this equals
    ``scipy.ndimage.gaussian_filter(image, (0, *sigma), mode="nearest", truncate=truncate)`` cropped.
    Edge repetition needs no padding size limit and does not darken the borders as zeros would.
    """

    sigma: float | tuple[float, ...] | None = None
    truncate: float = 4.0

    def __post_init__(self):
        if isinstance(self.sigma, list):
            object.__setattr__(self, "sigma", tuple(self.sigma))
        values = self.sigma if isinstance(self.sigma, tuple) else (self.sigma,)
        if self.sigma is not None and not all(_is_number(s) and math.isfinite(s) and s >= 0 for s in values):
            raise PatchError(
                f"Blur sigma must be None, a non-negative number, or one per spatial axis, got {self.sigma!r}"
            )
        if not (_is_number(self.truncate) and math.isfinite(self.truncate) and self.truncate > 0):
            raise PatchError(
                f"Blur truncate must be a positive number of standard deviations, got {self.truncate!r}"
            )

    def sigmas(self, size: tuple[int, ...]) -> tuple[float, ...]:
        """The standard deviation along each axis for a patch of ``size``."""
        if self.sigma is None:
            return tuple(s / 4 for s in size)
        if isinstance(self.sigma, tuple):
            if len(self.sigma) != len(size):
                raise PatchError(
                    f"Blur has {len(self.sigma)} sigmas but the patch has {len(size)} spatial axes; give one "
                    "sigma, or one per axis"
                )
            return tuple(float(s) for s in self.sigma)
        return (float(self.sigma),) * len(size)

    def blurred(self, image: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """The whole image [C, *S] blurred as the fill for a patch of ``size`` sees it."""
        out = image
        for axis, sigma in enumerate(self.sigmas(size)):
            out = _blur_axis(out, axis + 1, sigma, self.truncate)
        return out

    def content(self, image, positions, size):
        _check_windows(image, positions, size)
        return windows(self.blurred(image, size), positions, size)

    def name(self) -> str:
        if (self.sigma, self.truncate) == (None, 4.0):
            return "blur"
        return f"blur(sigma={self.sigma!r}, truncate={self.truncate!r})"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The sampled Gaussian with standard deviation ``sigma``, normalised, radius
    ``int(truncate * sigma + 0.5)`` (scipy.ndimage.gaussian_filter1d's kernel), in float64.

    >>> gaussian_kernel(1.0, truncate=1.0)
    tensor([0.2741, 0.4519, 0.2741], dtype=torch.float64)
    """
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur_axis(image: torch.Tensor, axis: int, sigma: float, truncate: float) -> torch.Tensor:
    """Blur ``image`` along one axis with edge-repeating borders (a 1-d convolution of every line)."""
    if sigma == 0:
        return image
    kernel = gaussian_kernel(sigma, truncate).to(dtype=image.dtype, device=image.device)
    radius = kernel.numel() // 2
    lines = image.movedim(axis, -1)
    shape = lines.shape
    flat = lines.reshape(-1, 1, shape[-1])
    # Replicate padding of any width: the edge value repeated (F.pad's "replicate" takes it too, but
    # only for inputs of rank 3 to 5, so index with clamped positions instead, which also works for
    # radii beyond the line's length).
    index = torch.arange(-radius, shape[-1] + radius, device=image.device).clamp(0, shape[-1] - 1)
    padded = flat[:, :, index]
    blurred = F.conv1d(padded, kernel.view(1, 1, -1))
    return blurred.reshape(shape).movedim(-1, axis)


@dataclass(frozen=True, eq=False, repr=False)
class Multiply(PositionalFill):
    """The covered region times ``1 - mask``: 0 in the mask keeps a pixel, 1 removes it.

    ``mask`` broadcasts to [C, *size] (e.g. [1, *size] for every channel alike). MONAI's "gaussian"
    occlusion is of this kind; :meth:`gaussian` builds its mask.

    The mask is kept in float64 on the CPU and ``1 - mask`` is formed there, then cast to the image's
    dtype: a float32 mask built as ``1 - factor`` gives back exactly ``factor``.
    """

    mask: torch.Tensor

    def __post_init__(self):
        mask = self.mask
        if not isinstance(mask, torch.Tensor):
            try:
                mask = torch.as_tensor(mask, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise PatchError(
                    f"Multiply needs a mask tensor (or nested numbers), got {type(mask).__name__}"
                ) from None
        if mask.dtype.is_complex:
            raise PatchError(f"the Multiply mask must hold real numbers, got dtype {mask.dtype}")
        mask = mask.detach().to(device="cpu", dtype=torch.float64).clone()
        if not torch.isfinite(mask).all():
            raise PatchError("the Multiply mask holds NaN or infinite values; use finite values")
        object.__setattr__(self, "mask", mask)

    def __eq__(self, other):
        if not isinstance(other, Multiply):
            return NotImplemented
        return self.mask.shape == other.mask.shape and torch.equal(self.mask, other.mask)

    def __hash__(self):
        return hash((tuple(self.mask.shape), self.mask.numpy().tobytes()))

    def __repr__(self):
        return f"Multiply(mask of shape {list(self.mask.shape)})"

    @classmethod
    def gaussian(cls, size: Sequence[int], sigma: float = 0.25) -> Multiply:
        """MONAI's Gaussian occlusion mask for a patch of ``size`` (one int per spatial axis), shape
        [1, *size]: ``monai.visualize.OcclusionSensitivity(mode="gaussian")`` multiplies the window by
        exactly ``1 - mask`` (MONAI 1.6's ``gaussian_occlusion``, computed the same way in float32).

        A unit impulse at the window's centre (index ``s // 2``) is smoothed by MONAI's "erf" Gaussian
        with standard deviation ``sigma * s`` along each axis (zero borders, kernel radius
        ``int(max(4 * sigma * s, 0.5) + 0.5)``, unnormalised) and min-max scaled to [0, 1]: 1 at the
        centre, 0 at the far corners. A window of one pixel in every axis has a constant kernel; MONAI
        then removes it whole (mask 1).
        """
        size = tuple(size) if isinstance(size, (tuple, list)) else None
        if not size or not all(_is_int(s) and s >= 1 for s in size):
            raise PatchError(f"Multiply.gaussian needs one positive int per spatial axis, got {size!r}")
        if not (_is_number(sigma) and math.isfinite(sigma) and sigma > 0):
            raise PatchError(
                f"Multiply.gaussian sigma must be a positive fraction of the patch size, got {sigma!r}"
            )
        smoothed = None
        for s in size:
            profile = _impulse_response(s, s * sigma)
            smoothed = profile if smoothed is None else smoothed.unsqueeze(-1) * profile
        factor = _min_max_scaled(-smoothed)  # MONAI's multiplicative factor: 0 at the centre
        return cls((1 - factor.double())[None])

    def content(self, image, positions, size):
        region = windows(image, positions, size)
        try:
            keep = torch.broadcast_to(1 - self.mask, (image.shape[0], *size))
        except RuntimeError:
            raise PatchError(
                f"the Multiply mask of shape {list(self.mask.shape)} does not broadcast to the window "
                f"[C, *size] = {[image.shape[0], *size]}"
            ) from None
        return region * keep.to(dtype=image.dtype, device=image.device)

    def name(self) -> str:
        return f"multiply(mask {list(self.mask.shape)})"


@dataclass(frozen=True, eq=False, repr=False)
class Baseline(PositionalFill):
    """The window of a reference image: the occluded image shows ``baseline`` where the patch is.

    ``baseline`` has the shape of the images explained, [C, *S]: a blurred copy of the image, a
    dataset's mean image, or Captum's ``baselines`` tensor (``kfx.captum`` uses this fill for a
    baseline that varies over space). It is kept on the CPU in its own dtype and cast to the
    image's dtype and device for each batch of windows.

    >>> fill = Baseline(torch.arange(16.0).reshape(1, 4, 4))
    >>> fill.content(torch.zeros(1, 4, 4), torch.tensor([[1, 2]]), (2, 2))[0, 0]
    tensor([[ 6.,  7.],
            [10., 11.]])
    """

    baseline: torch.Tensor

    def __post_init__(self):
        baseline = self.baseline
        if not isinstance(baseline, torch.Tensor) or baseline.dim() < 2:
            raise PatchError(
                f"Baseline needs a tensor [C, *spatial] of the images' shape, got {_describe(baseline)}"
            )
        if not baseline.dtype.is_floating_point or not torch.isfinite(baseline).all():
            raise PatchError("the Baseline image must hold finite floating-point values")
        object.__setattr__(self, "baseline", baseline.detach().to("cpu").clone())

    def __eq__(self, other):
        if not isinstance(other, Baseline):
            return NotImplemented
        b, o = self.baseline, other.baseline
        return b.shape == o.shape and b.dtype == o.dtype and torch.equal(b, o)

    def __hash__(self):
        return hash((tuple(self.baseline.shape), self.baseline.numpy().tobytes()))

    def __repr__(self):
        return f"Baseline(image of shape {list(self.baseline.shape)})"

    def content(self, image, positions, size):
        if tuple(self.baseline.shape) != tuple(image.shape):
            raise InputError(
                f"the Baseline fill holds an image of shape {list(self.baseline.shape)} but the image explained "
                f"has shape {list(image.shape)}; give a baseline of the image's shape"
            )
        return windows(self.baseline.to(dtype=image.dtype, device=image.device), positions, size)

    def name(self) -> str:
        return f"baseline(image {list(self.baseline.shape)})"


def _impulse_response(extent: int, sigma: float) -> torch.Tensor:
    """MONAI's erf Gaussian (``monai.networks.layers.convutils.gaussian_1d``, approx="erf") applied with
    zero borders to a unit impulse at ``extent // 2``, in float32: the value at each of ``extent`` points.
    """
    sigma_t = torch.as_tensor(sigma, dtype=torch.float)
    tail = int(max(float(sigma_t) * 4.0, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float)
    t = 0.70710678 / torch.abs(sigma_t)
    kernel = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
    # A cross-correlation of the impulse: output i reads kernel[tail + centre - i], 0 beyond its reach.
    offsets = extent // 2 - torch.arange(extent) + tail
    inside = (offsets >= 0) & (offsets <= 2 * tail)
    return torch.where(inside, kernel[offsets.clamp(0, 2 * tail)], torch.zeros(()))


def _min_max_scaled(values: torch.Tensor) -> torch.Tensor:
    """MONAI's ``rescale_array`` to [0, 1] in float32: all zeros when the values are all equal."""
    low, high = values.min(), values.max()
    if low == high:
        return values * 0.0
    return (values - low) / (high - low) * 1.0 + 0.0


def resolve_fill(spec) -> PositionalFill | None:
    """The positional fill ``spec`` names: "mean_patch", "mean_image" or "blur" (their defaults), or a
    :class:`PositionalFill` as it is. None for anything else (numbers, per-channel values, tensors:
    constant fills). An unknown string raises :class:`kfx.PatchError`.

    >>> resolve_fill("blur"), resolve_fill(0.5)
    (Blur(sigma=None, truncate=4.0), None)
    """
    if isinstance(spec, PositionalFill):
        return spec
    if isinstance(spec, str):
        named = {"mean_patch": MeanPatch(), "mean_image": MeanImage(), "blur": Blur()}
        if spec not in named:
            raise PatchError(
                f"unknown fill {spec!r}: use one of {', '.join(map(repr, FILL_NAMES))}, a number, one number "
                "per channel, a tensor, or a kfx.fills.PositionalFill (e.g. Blur(sigma=2.0))"
            )
        return named[spec]
    return None
