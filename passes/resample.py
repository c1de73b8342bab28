"""Resampling ops (``F.interpolate``, ``nn.Upsample``) and padding that copies the map's own values
(reflect, replicate, circular) as separable linear maps (docs/design.md §2.8).

Nearest, (bi/tri)linear and bicubic resampling of a [N, C, H, W] map is ``out = A_h @ x @ A_w^T`` per
channel, for two fixed matrices A_h [H_out, H_in] and A_w [W_out, W_in]; a signal [N, C, L] has one
matrix and a volume [N, C, D, H, W] three, one per spatial axis (:func:`apply_per_axis`). kfx does not rederive
torch's coordinate rules (half-pixel centres, align_corners, recomputed scales, float rounding): it
reads the matrices off the op itself, by running it once on one-hot rows and columns at compile
time, and keeps them only if they reproduce the op on a random map. From the matrices' nonzero
pattern come the changed box and the read-in window (kfx.geometry.resample_output_span; for pads,
whose reach runs backwards or wraps at the borders, kfx.geometry.reach_output_span).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from kfx.passes.ops import runs_own_forward, static_value

__all__ = ["ResampleSpec", "resample_spec"]

RESAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
__all__ += ["apply_per_axis"]
RESAMPLE_FUNCTIONS = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
# Padding that copies the map's own values (mirrored, edge-repeated, wrapped around) is a 0/1 matrix
# per axis too; constant padding is a local op (kfx.passes.local). timm's BlurPool2d reflects.
COPY_PAD_MODULES = (
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
COPY_PAD_MODES = ("reflect", "replicate", "circular")
# Reading the matrices costs one op call on an [1, H_in, H_in, W_in] one-hot stack per axis; maps
# larger than this (in elements of that stack) are left to run densely.
MAX_TABLE_ELEMENTS = 2**25


@dataclass(frozen=True)
class ResampleSpec:
    """The two matrices of a resampling op, and per axis the input range each output reads
    (``first[o]`` to ``stop[o]``, its nonzero weights)."""

    matrices: tuple[torch.Tensor, ...]  # one [out, in] per spatial axis: A_h [H_out, H_in], A_w [W_out, W_in]
    first: tuple[tuple[int, ...], ...]
    stop: tuple[tuple[int, ...], ...]


def apply_per_axis(x: torch.Tensor, matrices) -> torch.Tensor:
    """``x`` [N, C, *S] with spatial axis a contracted with ``matrices[a]``: one matrix [out, in]
    for every position, or one per position [N, out, in] (the incremental step's blocks)."""
    for axis, matrix in enumerate(matrices):
        dim = 2 + axis
        moved = x.movedim(dim, -1)
        moved = moved @ matrix.T if matrix.dim() == 2 else torch.einsum("n...r,nor->n...o", moved, matrix)
        x = moved.movedim(-1, dim)
    return x


def _resampler(node: fx.Node, modules: dict[str, nn.Module]):
    """``x -> op(x)`` with the node's own static arguments, or None if the node does not resample."""
    if node.op == "call_module":
        module = modules[node.target]
        return (
            module
            if runs_own_forward(module, (*RESAMPLE_MODULES, *COPY_PAD_MODULES))
            and len(node.args) == 1
            and not node.kwargs
            else None
        )
    if node.op != "call_function" or not (node.target in RESAMPLE_FUNCTIONS or _is_copy_pad(node)):
        return None
    args, kwargs = static_value(tuple(node.args[1:])), static_value(dict(node.kwargs))
    if any(isinstance(a, fx.Node) for a in (*args, *kwargs.values())):
        return None
    return lambda x: node.target(x, *args, **kwargs)


def _is_copy_pad(node: fx.Node) -> bool:
    """``F.pad(x, pad, mode)`` with a mode that copies the map's own values."""
    if node.target is not F.pad:
        return False
    mode = static_value(node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant"))
    return mode in COPY_PAD_MODES


def _axis_matrix(op, in_hw: tuple[int, ...], axis: int, dtype) -> torch.Tensor:
    """A [out, in] along ``axis``: the op applied to a stack (as channels) of one-hot slices along
    that axis; the answer is read at index 0 of every other axis (the op is separable)."""
    size = in_hw[axis]
    one_hot = torch.zeros(1, size, *in_hw, dtype=dtype)
    index = torch.arange(size)
    one_hot[(0, index, *(index if d == axis else slice(None) for d in range(len(in_hw))))] = 1
    out = op(one_hot)[0]
    return out[(slice(None), *(slice(None) if d == axis else 0 for d in range(len(in_hw))))].T.contiguous()


def _reach(matrix: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    nonzero = matrix != 0
    columns = torch.arange(matrix.shape[1])
    first = torch.where(nonzero, columns, matrix.shape[1]).min(dim=1).values
    stop = torch.where(nonzero, columns + 1, 0).max(dim=1).values
    first = torch.minimum(first, stop)  # an output that reads nothing (all-zero row) reads an empty range
    return tuple(first.tolist()), tuple(stop.tolist())


def resample_spec(node: fx.Node, modules: dict[str, nn.Module], in_hw, out_hw, dtype) -> ResampleSpec | None:
    """The :class:`ResampleSpec` of a nearest/bilinear/bicubic resampling node, or None when the node
    is not one, is too large to tabulate, or its matrices do not reproduce it (then it runs densely)."""
    op = _resampler(node, modules)
    if op is None or in_hw is None or out_hw is None or max(in_hw) * math.prod(in_hw) > MAX_TABLE_ELEMENTS:
        return None
    with torch.no_grad():
        try:
            matrices = tuple(_axis_matrix(op, in_hw, axis, dtype) for axis in range(len(in_hw)))
            probe = torch.randn(1, 2, *in_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            expected = op(probe.to(dtype))
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            return None
        # A layer for another rank reads [1, C, *S] as unbatched and pads or pools C too (ReflectionPad3d
        # of an image): not a per-channel map of the spatial axes.
        if (
            tuple(expected.shape[:2]) != tuple(probe.shape[:2])
            or tuple(expected.shape[2:]) != tuple(out_hw)
            or tuple(m.shape[0] for m in matrices) != tuple(out_hw)
        ):
            return None
        replayed = apply_per_axis(probe.to(dtype), matrices)
        tolerance = 1e-9 if dtype == torch.float64 else 1e-4
        if not torch.allclose(
            replayed, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()
        ):
            return None
    reach = [_reach(m) for m in matrices]
    return ResampleSpec(matrices, tuple(r[0] for r in reach), tuple(r[1] for r in reach))
