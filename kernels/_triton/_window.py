"""The shared device helper: reading one element of a read-in window.

A read-in window (docs/design.md §2.3-2.4) of position ``n`` is never materialized by the fused kernels. Its
element at window coordinates (y, x) is

    patch[n, c, y - py, x - px]          if that lies inside the changed patch, else
    base[c, y + ry, x + rx]              if that lies inside the (padded) base, else
    pad_value                            (reads past the base: the op's own padding value),

with (ry, rx) the window's top-left in the base's coordinates and (py, px) the patch's top-left
relative to the window. That is ``paste(gather_windows(base, read, size), read, patch, read + rel)``
element by element: the patch wins where it overlaps, parts of it outside the window are never
read. Every kernel in this folder reads its input through :func:`_window_source`.

The kernels use only triton.language builtins, no @triton.jit helpers of triton's standard
library (tl.cdiv, tl.zeros): those are built interpreted or compiled once, when triton
is first imported, so avoiding them lets these kernels be rebuilt for the interpreter after triton
was imported without TRITON_INTERPRET (tests/test_triton_kernels.py does that when needed).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _window_source(base_ptr, patch_ptr, n, y, x, ry, rx, py, px, C, Hp, Wp, hp, wp):
    """Where window pixel (y, x) of position ``n`` reads from, for broadcastable index tensors.

    Returns (ptr, channel_stride, readable): a pointer to the pixel's channel-0 element in the patch
    (if the patch covers it) or in the base, the distance between channels in that buffer, and
    whether either covers it (else it reads pad_value). The channel-c value is then one load at
    ``ptr + c * channel_stride``. Choosing the source per pixel, not per element, keeps one pointer
    and one load per element (two masked loads and a select spilled registers in the conv tiles).
    ``n`` must be int64: N * C * hp * wp may pass 2**31 at batch 128.
    """
    pi = y - py
    pj = x - px
    in_patch = (pi >= 0) & (pi < hp) & (pj >= 0) & (pj < wp)
    by = y + ry
    bx = x + rx
    in_base = (by >= 0) & (by < Hp) & (bx >= 0) & (bx < Wp)
    ptr = tl.where(in_patch, patch_ptr + n * C * hp * wp + (pi * wp + pj), base_ptr + (by * Wp + bx))
    stride = tl.where(in_patch, hp * wp, Hp * Wp)
    return ptr, stride, in_patch | in_base
