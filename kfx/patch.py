"""The occlusion patch: what it is, where it may go, and the reference definition of occluding.

Every function here works for any number of spatial axes: 1 (signals [C, L]), 2 (images
[C, H, W]) or 3 (volumes [C, D, H, W]). A patch whose size was given as one int is the same along
every axis and fits an input of any rank (:meth:`Patch.for_axes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kfx.common import int_sequence
from kfx.errors import InputError, PatchError
from kfx.fills import FILL_NAMES, PositionalFill, resolve_fill
from kfx.geometry import heatmap_size

__all__ = ["Patch", "occlude", "grid_positions"]

IntAxes = int | tuple[int, ...]


def _axes_text(sizes) -> str:
    return "x".join(str(v) for v in sizes)


@dataclass(frozen=True, init=False)
class Patch:
    """An occlusion patch: its size, the stride of the heat-map grid, and what it paints.

    Args:
        size: patch extent in pixels (voxels, samples): an int (the same along every axis, for
            inputs of any rank) or one int per spatial axis, e.g. (h, w) or (d, h, w).
        stride: step between grid positions, an int or one per axis. Defaults to a quarter of the
            patch size (at least 1), the paper's setting (patch 16, stride 4).
        fill: what the patch puts over the input: a float for every channel, a sequence of one
            float per channel, or a tensor [C, *size] (any pattern); or content that depends on the
            position (kfx.fills): "mean_patch" (the covered region's mean, per channel),
            "mean_image" (the input's mean, per channel), "blur" (a Gaussian-blurred copy of the
            region), or any :class:`kfx.fills.PositionalFill` such as ``Blur(sigma=3)`` or
            ``Multiply(mask)`` (the region times 1 - mask). Only the window changes whatever the
            fill, so engines stay exact. Defaults to 0.0 (the mean colour of inputs normalised to
            zero mean).

    >>> Patch(16).stride
    (4, 4)
    >>> Patch(16, stride=8).for_axes(3).size
    (16, 16, 16)
    """

    size: tuple[int, ...]
    stride: tuple[int, ...]
    fill: float | tuple[float, ...] | torch.Tensor | PositionalFill
    # Whether size and stride were given as one int each (then they fit any number of axes).
    same_on_every_axis: tuple[bool, bool] = field(default=(True, True), compare=False, repr=False)

    def __init__(self, size: IntAxes, stride: IntAxes | None = None, fill=0.0):
        size_given = int_sequence(size)
        stride_given = () if stride is None else int_sequence(stride)
        fill_axes = fill.dim() - 1 if isinstance(fill, torch.Tensor) and fill.dim() >= 2 else None
        axes = fill_axes or max(len(size_given), len(stride_given), 2 if len(size_given) <= 1 else 1)
        for name, given, value in (("patch size", size_given, size), ("stride", stride_given, stride)):
            if (value is not None and not given) or len(given) not in (0, 1, axes):
                raise PatchError(
                    f"{name} must be an int or {axes} ints (one per spatial axis), got {value!r}"
                )
        size_axes = size_given * axes if len(size_given) == 1 else size_given
        if min(size_axes) < 1:
            raise PatchError(f"patch size must be at least 1 pixel, got {size_axes}")
        if not stride_given:
            stride_axes = tuple(max(1, s // 4) for s in size_axes)
        else:
            stride_axes = stride_given * axes if len(stride_given) == 1 else stride_given
        if min(stride_axes) < 1:
            raise PatchError(f"stride must be at least 1, got {stride_axes}; use 1 for every position")
        object.__setattr__(self, "size", size_axes)
        object.__setattr__(self, "stride", stride_axes)
        object.__setattr__(self, "fill", self._check_fill(fill, size_axes))
        object.__setattr__(
            self, "same_on_every_axis", (len(size_given) == 1 and fill_axes is None, len(stride_given) <= 1)
        )

    @staticmethod
    def _check_fill(fill, size: tuple[int, ...]):
        positional = resolve_fill(fill)
        if positional is not None:
            return positional
        if isinstance(fill, torch.Tensor):
            if tuple(fill.shape[1:]) != size or fill.dim() != len(size) + 1:
                raise PatchError(
                    f"a tensor fill must have shape [C, {', '.join(map(str, size))}], got {list(fill.shape)}"
                )
            if not torch.isfinite(fill).all():
                raise PatchError("the fill tensor holds NaN or infinite values; use finite values")
            return fill.detach().clone()
        if isinstance(fill, (int, float)) and not isinstance(fill, bool):
            fill = float(fill)
            if not math.isfinite(fill):
                raise PatchError(f"fill must be finite, got {fill}")
            return fill
        if isinstance(fill, Sequence) and fill and all(isinstance(v, (int, float)) for v in fill):
            fill = tuple(float(v) for v in fill)
            if not all(math.isfinite(v) for v in fill):
                raise PatchError(f"fill values must be finite, got {fill}")
            return fill
        raise PatchError(
            "fill must be a float, one float per channel, a [C, *size] tensor, one of "
            f"{', '.join(map(repr, FILL_NAMES))} or a kfx.fills.PositionalFill; got {fill!r}"
        )

    @property
    def positional(self) -> bool:
        """True if what the patch puts over the input depends on where it is (kfx.fills)."""
        return isinstance(self.fill, PositionalFill)

    def content(self, image: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What the occluded input holds in the window at each position: [N, C, *size] for an
        input [C, *S] and top-left corners [N, axes]."""
        if self.positional:
            return self.fill.content(image, positions, self.size)
        fill = self.fill_tensor(image.shape[0], image.dtype, image.device)
        return fill.expand(positions.shape[0], *fill.shape)

    @property
    def axes(self) -> int:
        """The number of spatial axes this patch has (2 unless given per axis or fitted by for_axes)."""
        return len(self.size)

    def for_axes(self, axes: int) -> Patch:
        """This patch for an input with ``axes`` spatial axes: a size or stride given as one int is
        repeated along every axis; one given per axis must have ``axes`` entries."""
        if axes == self.axes:
            return self
        same_size, same_stride = self.same_on_every_axis
        if not (same_size and (same_stride or len(set(self.stride)) == 1)):
            raise PatchError(
                f"the patch has {self.axes} axes (size {self.size}, stride {self.stride}) but the input has "
                f"{axes} spatial axes; give one size and stride per axis, or one int for all of them"
            )
        fitted = Patch(self.size[0], self.stride[0], fill=self.fill)
        object.__setattr__(fitted, "size", (self.size[0],) * axes)
        object.__setattr__(fitted, "stride", (self.stride[0],) * axes)
        object.__setattr__(fitted, "same_on_every_axis", self.same_on_every_axis)
        return fitted

    def fill_tensor(
        self, channels: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The painted values as a [C, *size] tensor for an input with ``channels`` channels (a
        constant fill; a position-dependent one has :meth:`content`)."""
        if self.positional:
            raise PatchError(
                f"the fill {self.fill.name()} depends on the position; use patch.content(image, positions)"
            )
        if isinstance(self.fill, torch.Tensor):
            if self.fill.shape[0] != channels:
                raise PatchError(
                    f"the fill tensor has {self.fill.shape[0]} channels but the image has {channels}"
                )
            return self.fill.to(dtype=dtype, device=device)
        if isinstance(self.fill, tuple):
            if len(self.fill) != channels:
                raise PatchError(f"fill has {len(self.fill)} values but the image has {channels} channels")
            values = torch.tensor(self.fill, dtype=dtype, device=device)
            return values.view(channels, *(1,) * self.axes).expand(channels, *self.size).clone()
        return torch.full((channels, *self.size), self.fill, dtype=dtype, device=device)

    def check_fits(self, image_size: tuple[int, ...]) -> None:
        """Raise :class:`PatchError` unless the patch fits inside an input of spatial size ``image_size``."""
        if len(image_size) != self.axes:
            raise PatchError(
                f"the patch has {self.axes} axes but the input has {len(image_size)} spatial axes; "
                "use patch.for_axes(n) or give one size per axis"
            )
        if any(p > s for p, s in zip(self.size, image_size)):
            raise PatchError(
                f"patch {_axes_text(self.size)} is larger than the image {_axes_text(image_size)}; "
                "use a smaller patch"
            )

    def grid_shape(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        """Heat-map shape (one entry per spatial axis) for an input of ``image_size`` (docs/design.md §2.1)."""
        self.check_fits(tuple(image_size))
        return tuple(heatmap_size(image_size[a], self.size[a], self.stride[a]) for a in range(self.axes))


def grid_positions(image_size: tuple[int, ...], patch: Patch) -> torch.Tensor:
    """All heat-map positions, row-major, as a long tensor [prod(grid), axes] of top-left corners."""
    grid = patch.grid_shape(image_size)
    coordinates = [torch.arange(cells) * stride for cells, stride in zip(grid, patch.stride)]
    return torch.cartesian_prod(*coordinates).view(-1, len(grid))


def check_positions(positions, image_size: tuple[int, ...], patch: Patch) -> torch.Tensor:
    """Validate top-left corners (one coordinate per spatial axis) and return them as a CPU long
    tensor [N, axes]."""
    axes = len(image_size)
    coordinates = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}.get(
        axes, tuple(f"x{a}" for a in range(axes))
    )
    names = f"({coordinates[0]},)" if axes == 1 else f"({', '.join(coordinates)})"
    if not isinstance(positions, torch.Tensor):
        try:
            positions = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"positions must be an integer tensor [N, {axes}] of {names} corners") from None
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise InputError(f"positions must hold integers, got dtype {positions.dtype}")
    if positions.dim() == 1 and positions.numel() == axes:
        positions = positions.view(1, axes)
    if positions.dim() != 2 or positions.shape[1] != axes:
        raise InputError(
            f"positions must have shape [N, {axes}] of {names} corners, got {list(positions.shape)}"
        )
    positions = positions.to(device="cpu", dtype=torch.long)
    limits = torch.tensor([s - p for s, p in zip(image_size, patch.size)])
    bad = ((positions < 0) | (positions > limits)).any(dim=1)
    if bad.any():
        first = positions[bad.nonzero()[0, 0]].tolist()
        bounds = ", ".join(f"0 <= {name} <= {limit}" for name, limit in zip(coordinates, limits.tolist()))
        raise InputError(
            f"position {names} = {tuple(first)} puts the {_axes_text(patch.size)} patch outside the "
            f"{_axes_text(image_size)} image; valid corners are {bounds}"
        )
    return positions


def image_has_batch(image: torch.Tensor, patch) -> bool:
    """Whether ``image``'s first dim is a batch of one in front of [C, *spatial]. A patch given per
    axis says how many spatial axes there are; otherwise a 4-d tensor [1, C, H, W] is one image
    with a batch dim (not a one-channel volume: give a volume as [C, D, H, W] with C > 1, as
    [1, C, D, H, W], or with a patch given per axis), and any other shape has none unless it has
    five dims."""
    if isinstance(patch, Patch) and not patch.same_on_every_axis[0]:
        return image.dim() == patch.axes + 2
    return image.dim() == 5 or (image.dim() == 4 and image.shape[0] == 1)


def occlude(image: torch.Tensor, positions, patch: Patch) -> torch.Tensor:
    """The reference definition of occlusion: one copy of ``image`` per position, patch painted on.

    Args:
        image: [C, *S] or [1, C, *S] with one to three spatial axes S.
        positions: integer tensor [N, axes] of top-left corners; the patch must fit. Its second
            dimension says how many spatial axes the image has (a [1, 3, 224, 224] image occluded at
            [N, 2] positions is one RGB picture; at [N, 3] positions, a volume of depth 3).
        patch: the :class:`Patch` to paint.

    Returns:
        The occluded batch [N, C, *S].

    >>> occlude(torch.ones(1, 4, 4), torch.tensor([[0, 2]]), Patch(2, fill=0.0))[0, 0]
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.]])
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(
            f"image must be a torch.Tensor [C, H, W], got {type(image).__name__}; convert a NumPy array "
            "with torch.from_numpy(array)"
        )
    given = torch.as_tensor(positions) if not isinstance(positions, torch.Tensor) else positions
    axes = given.shape[-1] if given.dim() in (1, 2) and given.numel() else patch.axes
    if image.dim() == axes + 2 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != axes + 1:
        raise InputError(
            f"image must be [C, {', '.join('HW' if axes == 2 else 'L' if axes == 1 else 'DHW')}] or with a "
            f"batch of 1 in front for {axes}-axis positions, got shape {list(image.shape)}"
        )
    patch = patch.for_axes(axes)
    size = tuple(image.shape[1:])
    patch.check_fits(size)
    positions = check_positions(positions, size, patch)
    content = patch.content(image, positions.to(image.device))
    out = image.unsqueeze(0).repeat(positions.shape[0], *(1,) * image.dim())
    for i, corner in enumerate(positions.tolist()):
        out[(i, slice(None), *(slice(c, c + p) for c, p in zip(corner, patch.size)))] = content[i]
    return out
