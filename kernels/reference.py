"""Batched patch gather / paste / projection in plain torch: the CPU path and the reference.

Every function works on a whole batch of N patch positions at once, with no per-position Python
loop: per-position offsets become flat index tensors and one ``index_select`` / ``gather`` /
``scatter`` moves the data. Triton kernels (kfx.kernels._triton) compute the same functions.

Conventions: a base activation is the unoccluded image's tensor [1, C, H, W]; a *changed patch*
is a tensor [N, C, h, w] plus its top-left corners ``origin`` [N, 2] (y, x) in that tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_base", "gather_windows", "paste", "gather_paste", "project"]


def pad_base(base: torch.Tensor, margins: tuple[int, int, int, int], value: float) -> torch.Tensor:
    """Pad a base activation [1, C, H, W] by (top, bottom, left, right) with ``value``.

    Done once per image, so that per-batch gathers never index outside the tensor: read-in windows
    may reach into the op's padding (docs/design.md §2.4). Returns [C, H + top + bottom, W + left + right].
    """
    top, bottom, left, right = margins
    if not any(margins):
        return base[0].contiguous()
    return F.pad(base, (left, right, top, bottom), value=value)[0].contiguous()


def _flat_window_index(origin: torch.Tensor, size: tuple[int, int], row_stride: int) -> torch.Tensor:
    """Flat indices [N, h, w] of the windows of ``size`` at ``origin`` in a [.., rows, row_stride] plane."""
    h, w = size
    rows = origin[:, 0, None] + torch.arange(h, device=origin.device)
    cols = origin[:, 1, None] + torch.arange(w, device=origin.device)
    return rows[:, :, None] * row_stride + cols[:, None, :]


def gather_windows(padded: torch.Tensor, origin: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Read-in windows [N, C, h, w] from a padded base [C, Hp, Wp] at ``origin`` [N, 2] (padded coords)."""
    c, _, wp = padded.shape
    n, (h, w) = origin.shape[0], size
    # One gather straight into [N, C, h*w] (10-20% faster here than index_select + transpose copy).
    index = _flat_window_index(origin, size, wp).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(1, c, -1).expand(n, c, -1).gather(2, index).view(n, c, h, w)


def paste(
    windows: torch.Tensor,
    window_origin: torch.Tensor,
    patch: torch.Tensor,
    patch_origin: torch.Tensor,
    *,
    inside: bool = False,
) -> torch.Tensor:
    """Paint each position's changed patch into its window; parts outside the window are dropped.

    windows [N, C, hr, wr] at window_origin [N, 2]; patch [N, C, hp, wp] at patch_origin [N, 2],
    both in the same tensor's coordinates. ``inside=True`` promises every patch lies wholly inside
    its window (checked at compile time), which allows a cheaper scatter. Returns the new windows
    (may reuse ``windows``' storage).
    """
    return _paste_at(windows, patch, patch_origin - window_origin, inside)


def gather_paste(
    padded: torch.Tensor,
    origin: torch.Tensor,
    size: tuple[int, int],
    patch: torch.Tensor,
    patch_offset: torch.Tensor,
    *,
    inside: bool = False,
) -> torch.Tensor:
    """Read-in windows with each position's patch painted in: ``paste(gather_windows(...))``.

    ``origin`` [N, 2] is in padded coordinates, ``patch_offset`` [N, 2] the patch's corner relative
    to its window. One semantic op for every backend (kfx.kernels dispatches it).
    """
    if inside and tuple(patch.shape[-2:]) == tuple(size):
        # The patch fills its whole window (common once boxes grow to the tensor's size): nothing
        # of the base shows through, so skip the gather and the paste.
        return patch
    return _paste_at(gather_windows(padded, origin, size), patch, patch_offset, inside)


def _paste_at(windows: torch.Tensor, patch: torch.Tensor, offset: torch.Tensor, inside: bool) -> torch.Tensor:
    n, c, hr, wr = windows.shape
    hp, wp = patch.shape[-2:]
    if inside:
        index = _flat_window_index(offset, (hp, wp), wr).view(n, 1, hp * wp).expand(n, c, hp * wp)
        out = windows.reshape(n, c, hr * wr)
        out.scatter_(2, index, patch.reshape(n, c, hp * wp))
        return out.view(n, c, hr, wr)
    rows = torch.arange(hr, device=windows.device)[None, :] - offset[:, 0, None]  # patch row per window row
    cols = torch.arange(wr, device=windows.device)[None, :] - offset[:, 1, None]
    valid = ((rows >= 0) & (rows < hp))[:, :, None] & ((cols >= 0) & (cols < wp))[:, None, :]
    index = rows.clamp(0, hp - 1)[:, :, None] * wp + cols.clamp(0, wp - 1)[:, None, :]
    from_patch = patch.reshape(n, c, hp * wp).gather(2, index.view(n, 1, hr * wr).expand(n, c, hr * wr))
    return torch.where(valid.view(n, 1, hr, wr), from_patch.view(n, c, hr, wr), windows)


def project(base: torch.Tensor, patch: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Projection to full (docs/design.md §2.6): N copies of base [C, H, W] with each patch painted in."""
    n, c, h, w = patch.shape
    _, height, width = base.shape
    # clone, not contiguous(): for N == 1 the expanded view is already contiguous, and scattering
    # into it would overwrite the cached base activation that later batches read.
    out = base.expand(n, c, height, width).clone(memory_format=torch.contiguous_format)
    index = _flat_window_index(origin, (h, w), width).view(n, 1, h * w).expand(n, c, h * w)
    out.view(n, c, height * width).scatter_(2, index, patch.reshape(n, c, h * w))
    return out
