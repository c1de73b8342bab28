"""Resampling ops (``F.interpolate``, ``nn.Upsample``) as separable linear maps (docs/design.md §2.8).

Nearest, bilinear and bicubic resampling of a [N, C, H, W] map is ``out = A_h @ x @ A_w^T`` per
channel, for two fixed matrices A_h [H_out, H_in] and A_w [W_out, W_in]. kfx does not rederive
torch's coordinate rules (half-pixel centres, align_corners, recomputed scales, float rounding): it
reads the matrices off the op itself, by running it once on one-hot rows and columns at compile
time, and keeps them only if they reproduce the op on a random map. From the matrices' nonzero
pattern come the changed box and the read-in window (kfx.geometry.resample_output_span).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from kfx.passes.ops import static_value

__all__ = ["ResampleSpec", "resample_spec"]

RESAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
RESAMPLE_FUNCTIONS = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
# Reading the matrices costs one op call on an [1, H_in, H_in, W_in] one-hot stack per axis; maps
# larger than this (in elements of that stack) are left to run densely.
MAX_TABLE_ELEMENTS = 2**25


@dataclass(frozen=True)
class ResampleSpec:
    """The two matrices of a resampling op, and per axis the input range each output reads
    (``first[o]`` to ``stop[o]``, its nonzero weights)."""

    matrices: tuple[torch.Tensor, torch.Tensor]  # A_h [H_out, H_in], A_w [W_out, W_in]
    first: tuple[tuple[int, ...], tuple[int, ...]]
    stop: tuple[tuple[int, ...], tuple[int, ...]]


def _resampler(node: fx.Node, modules: dict[str, nn.Module]):
    """``x -> op(x)`` with the node's own static arguments, or None if the node does not resample."""
    if node.op == "call_module":
        module = modules[node.target]
        return (
            module
            if isinstance(module, RESAMPLE_MODULES) and len(node.args) == 1 and not node.kwargs
            else None
        )
    if node.op != "call_function" or node.target not in RESAMPLE_FUNCTIONS:
        return None
    args, kwargs = static_value(tuple(node.args[1:])), static_value(dict(node.kwargs))
    if any(isinstance(a, fx.Node) for a in (*args, *kwargs.values())):
        return None
    return lambda x: node.target(x, *args, **kwargs)


def _axis_matrix(op, in_hw: tuple[int, int], axis: int, dtype) -> torch.Tensor:
    """A [out, in] along ``axis``: the op applied to a stack of one-hot rows (axis 0) or columns."""
    size = in_hw[axis]
    one_hot = torch.zeros(1, size, *in_hw, dtype=dtype)
    index = torch.arange(size)
    if axis == 0:
        one_hot[0, index, index, :] = 1
        return op(one_hot)[0, :, :, 0].T.contiguous()
    one_hot[0, index, :, index] = 1
    return op(one_hot)[0, :, 0, :].T.contiguous()


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
    if op is None or in_hw is None or out_hw is None or max(in_hw) ** 2 * min(in_hw) > MAX_TABLE_ELEMENTS:
        return None
    with torch.no_grad():
        try:
            matrices = tuple(_axis_matrix(op, in_hw, axis, dtype) for axis in (0, 1))
            probe = torch.randn(1, 2, *in_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            expected = op(probe.to(dtype))
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            return None
        if tuple(expected.shape[-2:]) != tuple(out_hw) or tuple(m.shape[0] for m in matrices) != tuple(
            out_hw
        ):
            return None
        replayed = torch.einsum("oh,nchw,pw->ncop", matrices[0], probe.to(dtype), matrices[1])
        tolerance = 1e-9 if dtype == torch.float64 else 1e-4
        if not torch.allclose(
            replayed, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()
        ):
            return None
    reach = [_reach(m) for m in matrices]
    if any(list(f) != sorted(f) or list(s) != sorted(s) for f, s in reach):
        return None
    return ResampleSpec(matrices, (reach[0][0], reach[1][0]), (reach[0][1], reach[1][1]))
