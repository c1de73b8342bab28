"""Projection to full (docs/design.md §2.6): N copies of the base with each position's patch painted in.

Semantics (oracle: kfx.kernels.reference.project): out[n] = base with patch[n] at origin[n].
This is the window read of _window._window_source with the whole tensor as every position's window
(read origin (0, 0), no padding), so it shares that helper.

Program instance (pid0 = n * channel_blocks + channel_block, pid1 = spatial block) owns a
[BLOCK_C channels, BLOCK_S pixels] tile of one output copy: each element is read from the patch
or the base and stored once. Bytes moved = output + patch + (base, once per copy, mostly from
L2 since all N copies read the same base).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfx.kernels._triton._host import check_tensors, origins, pow2_at_least
from kfx.kernels._triton._window import _window_source

__all__ = ["project_triton"]


@triton.jit
def _project_kernel(
    base_ptr,
    patch_ptr,
    origin_ptr,
    out_ptr,
    C,
    H,
    W,
    hp,
    wp,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    c_blocks = (C + BLOCK_C - 1) // BLOCK_C  # not tl.cdiv: see _window.py
    pid = tl.program_id(0)
    n = pid // c_blocks
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    s_ok = s < H * W
    y = s // W
    x = s % W
    py = tl.load(origin_ptr + 2 * n).to(tl.int32)
    px = tl.load(origin_ptr + 2 * n + 1).to(tl.int32)
    n64 = n.to(tl.int64)
    valid = c_ok[:, None] & s_ok[None, :]
    ptr, stride, readable = _window_source(base_ptr, patch_ptr, n64, y, x, 0, 0, py, px, C, H, W, hp, wp)
    values = tl.load(ptr[None, :] + c[:, None] * stride[None, :], mask=valid & readable[None, :])
    tl.store(out_ptr + (n64 * C + c[:, None]) * (H * W) + s[None, :], values, mask=valid)


def project_triton(
    base: torch.Tensor, patch: torch.Tensor, origin: torch.Tensor, *, config: dict | None = None
) -> torch.Tensor:
    """[N, C, H, W]: N copies of base [C, H, W], copy n with patch[n] [C, hp, wp] at origin[n] (y, x).

    Never writes into ``base``. Parts of a patch outside the tensor are dropped (the reference
    requires patches inside; for those the two agree exactly). ``config``: override
    BLOCK_C / BLOCK_S (powers of two) or num_warps.

    >>> project_triton(torch.zeros(1, 2, 3), torch.ones(1, 1, 1, 2), torch.tensor([[1, 0]]))
    tensor([[[[0., 0., 0.],
              [1., 1., 0.]]]])
    """
    op = "project_triton"
    if base.dim() != 3 or patch.dim() != 4 or patch.shape[1] != base.shape[0]:
        raise ValueError(
            f"{op}: expected base [C, H, W] and patch [N, C, hp, wp], got "
            f"{tuple(base.shape)} and {tuple(patch.shape)}"
        )
    if patch.dtype != base.dtype:
        raise ValueError(f"{op}: patch dtype {patch.dtype} != base dtype {base.dtype}")
    check_tensors(op, base, patch, origin)
    n, c, hp, wp = patch.shape
    _, height, width = base.shape
    origin = origins(op, "origin", origin, n)
    base, patch = base.contiguous(), patch.contiguous()
    out = torch.empty((n, c, height, width), dtype=base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    block_s = pow2_at_least(height * width, 16, 1024)
    block_c = pow2_at_least(c, 1, max(1, 2048 // block_s))
    cfg = {"BLOCK_C": block_c, "BLOCK_S": block_s, **(config or {})}
    block_c, block_s = cfg["BLOCK_C"], cfg["BLOCK_S"]
    grid = (n * triton.cdiv(c, block_c), triton.cdiv(height * width, block_s))
    _project_kernel[grid](base, patch, origin, out, c, height, width, hp, wp, **cfg)
    return out
