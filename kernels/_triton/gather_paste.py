"""Batched read-in windows with each position's patch pasted in, one launch (docs/design.md §2.4).

Semantics (the oracle is kfx.kernels.reference):

    gather_paste_triton(padded, read, size, patch, rel)
        == paste(gather_windows(padded, read, size), read, patch, read + rel)

Program instance (pid0 = n * channel_blocks + channel_block, pid1 = spatial block) owns a
[BLOCK_C channels, BLOCK_S window pixels] tile of one position's output window: it loads that
position's two origins once, picks per pixel the buffer it reads (patch, base, or none: pad_value;
_window._window_source), then every output element is one load and one store. Bytes moved =
output + the patch and base elements actually read = 2 x output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfx.kernels._triton._host import check_tensors, origins, pow2_at_least
from kfx.kernels._triton._window import _window_source

__all__ = ["gather_paste_triton"]


@triton.jit
def _gather_paste_kernel(
    base_ptr,
    read_ptr,
    patch_ptr,
    rel_ptr,
    out_ptr,
    C,
    Hp,
    Wp,
    h,
    w,
    hp,
    wp,
    pad_value,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    c_blocks = (C + BLOCK_C - 1) // BLOCK_C  # not tl.cdiv: see _window.py
    pid = tl.program_id(0)
    n = pid // c_blocks
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    s_ok = s < h * w
    y = s // w
    x = s % w
    ry = tl.load(read_ptr + 2 * n).to(tl.int32)
    rx = tl.load(read_ptr + 2 * n + 1).to(tl.int32)
    py = tl.load(rel_ptr + 2 * n).to(tl.int32)
    px = tl.load(rel_ptr + 2 * n + 1).to(tl.int32)
    n64 = n.to(tl.int64)
    valid = c_ok[:, None] & s_ok[None, :]
    ptr, stride, readable = _window_source(base_ptr, patch_ptr, n64, y, x, ry, rx, py, px, C, Hp, Wp, hp, wp)
    values = tl.load(
        ptr[None, :] + c[:, None] * stride[None, :], mask=valid & readable[None, :], other=pad_value
    )
    tl.store(out_ptr + (n64 * C + c[:, None]) * (h * w) + s[None, :], values, mask=valid)


def gather_paste_triton(
    padded_base: torch.Tensor,
    read_origin_padded: torch.Tensor,
    size: tuple[int, int],
    patch: torch.Tensor,
    patch_origin_rel: torch.Tensor,
    *,
    pad_value: float = 0.0,
    config: dict | None = None,
) -> torch.Tensor:
    """Read-in windows [N, C, h, w] with each position's patch pasted in (clipped to its window).

    padded_base [C, Hp, Wp]; read_origin_padded [N, 2] (y, x) window corners in padded_base's
    coordinates; patch [N, C, hp, wp]; patch_origin_rel [N, 2] the patch's corner relative to its
    window (patch_origin - window_origin; may be negative or past the window: the patch is clipped).
    Window elements outside padded_base read ``pad_value``, so an *unpadded* base with negative
    origins works as well as a pre-padded one (pass the op's padding value: 0 conv, -inf max-pool).
    ``config``: override BLOCK_C / BLOCK_S (powers of two) or num_warps (tests hit tile edges with it).

    >>> base, patch = torch.arange(12.).view(1, 3, 4), torch.full((1, 1, 1, 1), -5.0)
    >>> gather_paste_triton(base, torch.tensor([[-1, 1]]), (2, 3), patch, torch.tensor([[1, 2]]))
    tensor([[[[ 0.,  0.,  0.],
              [ 1.,  2., -5.]]]])
    """
    op = "gather_paste_triton"
    h, w = (int(v) for v in size)
    if padded_base.dim() != 3 or patch.dim() != 4 or patch.shape[1] != padded_base.shape[0]:
        raise ValueError(
            f"{op}: expected padded_base [C, Hp, Wp] and patch [N, C, hp, wp], got "
            f"{tuple(padded_base.shape)} and {tuple(patch.shape)}"
        )
    if patch.dtype != padded_base.dtype:
        raise ValueError(f"{op}: patch dtype {patch.dtype} != base dtype {padded_base.dtype}")
    check_tensors(op, padded_base, read_origin_padded, patch, patch_origin_rel)
    n, c, hp, wp = patch.shape
    read = origins(op, "read_origin_padded", read_origin_padded, n)
    rel = origins(op, "patch_origin_rel", patch_origin_rel, n)
    base, patch = padded_base.contiguous(), patch.contiguous()
    out = torch.empty((n, c, h, w), dtype=base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    # Channels x pixels tile of ~1-4K elements: windows are small (h*w from ~20 to a few thousand)
    # so the pixel block adapts to the window and the channel block fills the rest.
    block_s = pow2_at_least(h * w, 16, 1024)
    block_c = pow2_at_least(c, 1, max(1, 2048 // block_s))
    cfg = {"BLOCK_C": block_c, "BLOCK_S": block_s, **(config or {})}
    block_c, block_s = cfg["BLOCK_C"], cfg["BLOCK_S"]
    grid = (n * triton.cdiv(c, block_c), triton.cdiv(h * w, block_s))
    _gather_paste_kernel[grid](
        base,
        read,
        patch,
        rel,
        out,
        c,
        base.shape[1],
        base.shape[2],
        h,
        w,
        hp,
        wp,
        float(pad_value),
        **cfg,
    )
    return out
