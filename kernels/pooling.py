"""Max- and sum-pooling of read-in windows as one strided slice per kernel tap, one axis at a time.

torch's CPU pooling kernels for contiguous (N, C, ...) tensors loop over every output's whole window
and, for max-pooling, also compute indices: on our 2-core CPU they ran 2.8-10x slower than
combining the kernel's taps as whole strided slices, one spatial axis after the other
(benchmarks/results/window_pooling.md). Incremental steps pool many small windows, and
Inception's 3x3 stride-1 average pools alone took a sixth of its incremental program's time, so
the CPU path pools this way. The results are the same: a max is exact in any order, and a window's sum differs
from torch's only in the order of its additions (float rounding). Other devices keep torch's
kernels (cuDNN's pools are fast, and one launch per tap would cost more than it saves there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kfx.geometry import conv_output_size, effective_kernel

__all__ = ["MAX_POOL_FUNCTIONS", "avg_pool", "window_max", "window_sum"]

MAX_POOL_FUNCTIONS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def avg_pool(
    window, kernel, stride, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """``F.avg_pool{1,2,3}d`` by the number of axes of ``kernel``; the 1-d form runs as a 1 x k
    2-d pool because ``F.avg_pool1d`` has no ``divisor_override``."""
    axes = len(kernel)
    if axes == 1:
        out = F.avg_pool2d(
            window.unsqueeze(-2),
            (1, *kernel),
            (1, *stride),
            (0, *(padding if isinstance(padding, (tuple, list)) else (padding,))),
            ceil_mode,
            count_include_pad,
            divisor_override,
        )
        return out.squeeze(-2)
    pool = F.avg_pool2d if axes == 2 else F.avg_pool3d
    return pool(window, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _taps(x: torch.Tensor, dim: int, kernel: int, stride: int, dilation: int) -> list[torch.Tensor] | None:
    """For each of the kernel's taps along ``dim``, the input element it reads for every output (views
    of ``x``); None when the axis is shorter than the kernel's extent (no output)."""
    if x.shape[dim] < effective_kernel(kernel, dilation):
        return None
    outputs = conv_output_size(x.shape[dim], kernel, stride, dilation=dilation)  # >= 1 here
    span = stride * (outputs - 1) + 1
    index = [slice(None)] * x.dim()
    taps = []
    for tap in range(kernel):
        index[dim] = slice(tap * dilation, tap * dilation + span, stride)
        taps.append(x[tuple(index)])
    return taps


def _separable(x, kernel, stride, dilation, combine) -> torch.Tensor | None:
    """The pool of ``x`` (a new dense tensor in ``x``'s layout, never a view of ``x``: as torch's
    pools, it may be written to), or None when an axis is too short for the kernel."""
    lead, fresh = x.dim() - len(kernel), False
    for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        taps = _taps(x, lead + axis, k, s, d)
        if taps is None:
            return None
        if len(taps) == 1:
            x = taps[0]
            continue
        x = combine(taps[0], taps[1], None)  # a new tensor: the in-place steps below never touch the input
        fresh = True
        for tap in taps[2:]:
            combine(x, tap, x)
    if fresh and (x.is_contiguous() or x.movedim(1, -1).is_contiguous()):
        return x  # dense, in the input's layout (channels-last stays so)
    return x.clone(memory_format=torch.preserve_format)


def _by_slices_or(torch_pool, window, kernel, stride, dilation, combine) -> torch.Tensor:
    """The pool by slices on CPU; torch's own ``torch_pool()`` on other devices, for an empty window, or
    where an axis is too short for the kernel (which raises torch's own error)."""
    out = None
    if window.device.type == "cpu" and window.shape[2:].numel():
        out = _separable(window, kernel, stride, dilation, combine)
    return out if out is not None else torch_pool()


def window_max(window: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """``F.max_pool{1,2,3}d(window, kernel, stride, padding=0, dilation)`` (NaN wins, as there)."""
    return _by_slices_or(
        lambda: MAX_POOL_FUNCTIONS[len(kernel)](window, kernel, stride, 0, dilation),
        window,
        kernel,
        stride,
        dilation,
        lambda a, b, out: torch.maximum(a, b, out=out),
    )


def window_sum(window: torch.Tensor, kernel, stride) -> torch.Tensor:
    """The sum of each pooling window: ``F.avg_pool{1,2,3}d(window, kernel, stride, padding=0,
    divisor_override=1)``, up to the order of the additions."""
    if window.dtype in (torch.float16, torch.bfloat16):
        # torch's pools add half-precision values in float32; so does this, then rounds once.
        return window_sum(window.float(), kernel, stride).to(window.dtype)
    return _by_slices_or(
        lambda: avg_pool(window, kernel, stride, 0, False, True, divisor_override=1),
        window,
        kernel,
        stride,
        (1,) * len(kernel),
        lambda a, b, out: torch.add(a, b, out=out),
    )
