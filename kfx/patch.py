"""The occlusion patch: what it is, where it may go, and the reference definition of occluding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kfx.common import int_pair
from kfx.errors import InputError, PatchError
from kfx.geometry import heatmap_size

__all__ = ["Patch", "occlude", "grid_positions"]

IntPair = int | tuple[int, int]


@dataclass(frozen=True, init=False)
class Patch:
    """An occlusion patch: its size, the stride of the heat-map grid, and what it paints.

    Args:
        size: patch height and width in pixels, an int (square) or (h, w).
        stride: step between grid positions, an int or (h, w). Defaults to a quarter of the patch
            size (at least 1), the paper's setting (patch 16, stride 4).
        fill: the value painted over the image: a float for every channel, a sequence of one float
            per channel, or a tensor [C, h, w] (any pattern). Defaults to 0.0 (the mean colour of
            inputs normalised to zero mean).

    >>> Patch(16).stride
    (4, 4)
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    fill: float | tuple[float, ...] | torch.Tensor

    def __init__(self, size: IntPair, stride: IntPair | None = None, fill=0.0):
        size_hw = int_pair(size, "patch size", PatchError)
        if min(size_hw) < 1:
            raise PatchError(f"patch size must be at least 1 pixel, got {size_hw}")
        stride_hw = (
            tuple(max(1, s // 4) for s in size_hw)
            if stride is None
            else int_pair(stride, "stride", PatchError)
        )
        if min(stride_hw) < 1:
            raise PatchError(f"stride must be at least 1, got {stride_hw}; use 1 for every position")
        if isinstance(fill, torch.Tensor):
            if fill.dim() != 3 or tuple(fill.shape[1:]) != size_hw:
                raise PatchError(
                    f"a tensor fill must have shape [C, {size_hw[0]}, {size_hw[1]}], got {list(fill.shape)}"
                )
            if not torch.isfinite(fill).all():
                raise PatchError("the fill tensor holds NaN or infinite values; use finite values")
            fill = fill.detach().clone()
        elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
            fill = float(fill)
            if not math.isfinite(fill):
                raise PatchError(f"fill must be finite, got {fill}")
        elif isinstance(fill, Sequence) and fill and all(isinstance(v, (int, float)) for v in fill):
            fill = tuple(float(v) for v in fill)
            if not all(math.isfinite(v) for v in fill):
                raise PatchError(f"fill values must be finite, got {fill}")
        else:
            raise PatchError(
                f"fill must be a float, one float per channel, or a [C, h, w] tensor; got {fill!r}"
            )
        object.__setattr__(self, "size", size_hw)
        object.__setattr__(self, "stride", stride_hw)
        object.__setattr__(self, "fill", fill)

    def fill_tensor(
        self, channels: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The painted values as a [C, h, w] tensor for an image with ``channels`` channels."""
        h, w = self.size
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
            return values.view(channels, 1, 1).expand(channels, h, w).clone()
        return torch.full((channels, h, w), self.fill, dtype=dtype, device=device)

    def check_fits(self, image_hw: tuple[int, int]) -> None:
        """Raise :class:`PatchError` unless the patch fits inside an image of size ``image_hw``."""
        if self.size[0] > image_hw[0] or self.size[1] > image_hw[1]:
            raise PatchError(
                f"patch {self.size[0]}x{self.size[1]} is larger than the image "
                f"{image_hw[0]}x{image_hw[1]}; use a smaller patch"
            )

    def grid_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Heat-map shape (H_M, W_M) for an image of size ``image_hw`` (docs/design.md §2.1)."""
        self.check_fits(image_hw)
        return tuple(heatmap_size(image_hw[a], self.size[a], self.stride[a]) for a in (0, 1))


def grid_positions(image_hw: tuple[int, int], patch: Patch) -> torch.Tensor:
    """All heat-map positions, row-major, as a long tensor [H_M * W_M, 2] of (y, x) top-left corners."""
    h_m, w_m = patch.grid_shape(image_hw)
    ys = torch.arange(h_m) * patch.stride[0]
    xs = torch.arange(w_m) * patch.stride[1]
    return torch.cartesian_prod(ys, xs).view(-1, 2)


def check_positions(positions, image_hw: tuple[int, int], patch: Patch) -> torch.Tensor:
    """Validate (y, x) top-left corners and return them as a CPU long tensor [N, 2]."""
    if not isinstance(positions, torch.Tensor):
        try:
            positions = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError):
            raise InputError("positions must be an integer tensor [N, 2] of (y, x) corners") from None
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise InputError(f"positions must hold integers, got dtype {positions.dtype}")
    if positions.dim() == 1 and positions.numel() == 2:
        positions = positions.view(1, 2)
    if positions.dim() != 2 or positions.shape[1] != 2:
        raise InputError(f"positions must have shape [N, 2] of (y, x) corners, got {list(positions.shape)}")
    positions = positions.to(device="cpu", dtype=torch.long)
    limits = torch.tensor([image_hw[0] - patch.size[0], image_hw[1] - patch.size[1]])
    bad = ((positions < 0) | (positions > limits)).any(dim=1)
    if bad.any():
        first = positions[bad.nonzero()[0, 0]].tolist()
        raise InputError(
            f"position (y, x) = {tuple(first)} puts the {patch.size[0]}x{patch.size[1]} patch outside the "
            f"{image_hw[0]}x{image_hw[1]} image; valid corners are 0 <= y <= {limits[0].item()}, "
            f"0 <= x <= {limits[1].item()}"
        )
    return positions


def occlude(image: torch.Tensor, positions, patch: Patch) -> torch.Tensor:
    """The reference definition of occlusion: one copy of ``image`` per position, patch painted on.

    Args:
        image: [C, H, W] or [1, C, H, W].
        positions: integer tensor [N, 2] of (y, x) top-left corners; the patch must fit.
        patch: the :class:`Patch` to paint.

    Returns:
        The occluded batch [N, C, H, W].

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
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise InputError(f"image must be [C, H, W] or [1, C, H, W], got shape {list(image.shape)}")
    c, height, width = image.shape
    patch.check_fits((height, width))
    positions = check_positions(positions, (height, width), patch)
    fill = patch.fill_tensor(c, image.dtype, image.device)
    h, w = patch.size
    out = image.unsqueeze(0).repeat(positions.shape[0], 1, 1, 1)
    for i, (y, x) in enumerate(positions.tolist()):
        out[i, :, y : y + h, x : x + w] = fill
    return out
