"""Batched patch gather / paste / projection in plain torch: the CPU path and the reference.

Every function works on a whole batch of N patch positions at once, with no per-position Python
loop: per-position offsets become flat index tensors and one ``index_select`` / ``gather`` /
``scatter`` moves the data. Triton kernels (kfx.kernels._triton) compute the same functions.

Conventions: a base activation is the unoccluded image's tensor [1, C, *S] (S: one to three spatial
axes); a *changed patch* is a tensor [N, C, *s] plus its top-left corners ``origin`` [N, axes] in
that tensor. Every function works for any number of spatial axes.

Layouts: a tensor whose channels are innermost in memory (channels-last, as kfx runs 2-d programs
on CPU: docs/design.md §3.6) is moved as rows of C values, with one index per cell instead of one
per element; the results keep that layout. Any other tensor is indexed element by element and the
results are contiguous. Both give the same values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["pad_base", "gather_windows", "paste", "gather_paste", "project"]


def _rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
    """``t`` with its channel dim moved last (a view whose memory is rows of C values) if ``t`` is
    channels-last, else None (also where both layouts coincide: one channel, one cell)."""
    moved = t.movedim(channel_dim, -1)
    return moved if moved.is_contiguous() and not t.is_contiguous() else None


def _dense(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``t`` in one dense block of memory, channels-last kept as it is."""
    return t if _rows(t, channel_dim) is not None else t.contiguous()


def pad_base(base: torch.Tensor, margins: tuple[int, ...], value: float) -> torch.Tensor:
    """Pad a base activation [1, C, *S] by ``margins`` = (before, after) per spatial axis, in axis
    order (for a map [1, C, H, W]: top, bottom, left, right), with ``value``.

    Done once per image, so that per-batch gathers never index outside the tensor: read-in windows
    may reach into the op's padding (docs/design.md §2.4). Returns [C, *padded S], in the layout
    of ``base`` (F.pad keeps channels-last).
    """
    if not any(margins):
        return _dense(base[0], 0)
    pairs = [margins[i : i + 2] for i in range(0, len(margins), 2)]
    torch_order = [m for pair in reversed(pairs) for m in pair]  # F.pad starts at the last axis
    return _dense(F.pad(base, torch_order, value=value)[0], 0)


def _flat_window_index(origin: torch.Tensor, size: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Flat indices [N, *size] of the windows of ``size`` at ``origin`` [N, axes] in a tensor whose
    spatial dims are ``shape`` (row-major, the last axis fastest)."""
    n, axes = origin.shape[0], len(size)
    index = torch.zeros((n,) + (1,) * axes, dtype=torch.long, device=origin.device)
    step = 1
    for axis in reversed(range(axes)):
        along = origin[:, axis, None] + torch.arange(size[axis], device=origin.device)
        index = index + (along * step).view((n,) + tuple(size[axis] if d == axis else 1 for d in range(axes)))
        step *= shape[axis]
    return index


def gather_windows(padded: torch.Tensor, origin: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Read-in windows [N, C, *size] from a padded base [C, *Sp] at ``origin`` [N, axes] (padded coords)."""
    c, n, cells = padded.shape[0], origin.shape[0], math.prod(size)
    rows = _rows(padded, 0)
    if rows is not None:  # one row of C values per window cell: 2-4x faster than the gather below
        index = _flat_window_index(origin, size, tuple(padded.shape[1:])).reshape(-1)
        return rows.reshape(-1, c).index_select(0, index).view(n, *size, c).movedim(-1, 1)
    # One gather straight into [N, C, cells] (10-20% faster here than index_select + transpose copy).
    index = _flat_window_index(origin, size, tuple(padded.shape[1:])).view(n, 1, cells).expand(n, c, cells)
    return padded.reshape(1, c, -1).expand(n, c, -1).gather(2, index).view(n, c, *size)


def paste(
    windows: torch.Tensor,
    window_origin: torch.Tensor,
    patch: torch.Tensor,
    patch_origin: torch.Tensor,
    *,
    inside: bool = False,
) -> torch.Tensor:
    """Paint each position's changed patch into its window; parts outside the window are dropped.

    windows [N, C, *window size] at window_origin [N, axes]; patch [N, C, *patch size] at
    patch_origin [N, axes], both in the same tensor's coordinates. ``inside=True`` promises every
    patch lies wholly inside its window (checked at compile time), which allows a cheaper scatter.
    Returns the new windows (may reuse ``windows``' storage).
    """
    return _paste_at(windows, patch, patch_origin - window_origin, inside)


def gather_paste(
    padded: torch.Tensor,
    origin: torch.Tensor,
    size: tuple[int, ...],
    patch: torch.Tensor,
    patch_offset: torch.Tensor,
    *,
    inside: bool = False,
) -> torch.Tensor:
    """Read-in windows with each position's patch painted in: ``paste(gather_windows(...))``.

    ``origin`` [N, axes] is in padded coordinates, ``patch_offset`` [N, axes] the patch's corner
    relative to its window. One semantic op for every backend (kfx.kernels dispatches it).
    """
    if inside and tuple(patch.shape[2:]) == tuple(size):
        # The patch fills its whole window (common once boxes grow to the tensor's size): nothing
        # of the base shows through, so skip the gather and the paste.
        return patch
    return _paste_at(gather_windows(padded, origin, size), patch, patch_offset, inside)


def _paste_at(windows: torch.Tensor, patch: torch.Tensor, offset: torch.Tensor, inside: bool) -> torch.Tensor:
    rows = _rows(windows, 1)
    if rows is not None:
        return _paste_rows(windows, rows, patch, offset, inside)
    n, c = windows.shape[:2]
    window_size, patch_size = tuple(windows.shape[2:]), tuple(patch.shape[2:])
    window_cells, patch_cells = math.prod(window_size), math.prod(patch_size)
    if inside:
        index = _flat_window_index(offset, patch_size, window_size).view(n, 1, patch_cells)
        out = windows.reshape(n, c, window_cells)
        out.scatter_(2, index.expand(n, c, patch_cells), patch.reshape(n, c, patch_cells))
        return out.view(n, c, *window_size)
    index, valid = _patch_cells_in_windows(offset, window_size, patch_size)
    index = index.reshape(n, 1, window_cells).expand(n, c, window_cells)
    from_patch = patch.reshape(n, c, patch_cells).gather(2, index).view(n, c, *window_size)
    return torch.where(valid.view(n, 1, *window_size), from_patch, windows)


def _patch_cells_in_windows(offset: torch.Tensor, window_size, patch_size):
    """For each window cell [N, *window size]: the patch cell it shows (clamped into the patch) and
    whether it lies inside the patch."""
    n, axes = offset.shape[0], len(window_size)
    valid = torch.ones((n,) + (1,) * axes, dtype=torch.bool, device=offset.device)
    index = torch.zeros((n,) + (1,) * axes, dtype=torch.long, device=offset.device)
    for axis in range(axes):
        along = torch.arange(window_size[axis], device=offset.device)[None, :] - offset[:, axis, None]
        shape = (n,) + tuple(window_size[axis] if d == axis else 1 for d in range(axes))
        valid = valid & ((along >= 0) & (along < patch_size[axis])).view(shape)
        index = index * patch_size[axis] + along.clamp(0, patch_size[axis] - 1).view(shape)
    return index.expand((n,) + tuple(window_size)), valid


def _paste_rows(windows, rows, patch, offset, inside: bool) -> torch.Tensor:
    """:func:`_paste_at` for channels-last windows (``rows``: their [N, *window size, C] view)."""
    n, c = windows.shape[:2]
    window_size, patch_size = tuple(windows.shape[2:]), tuple(patch.shape[2:])
    window_cells, patch_cells = math.prod(window_size), math.prod(patch_size)
    patch_rows = patch.movedim(1, -1).reshape(n * patch_cells, c)  # a copy unless channels-last too
    first = torch.arange(n, device=offset.device)[:, None]
    if inside:
        index = (
            _flat_window_index(offset, patch_size, window_size).view(n, patch_cells) + first * window_cells
        )
        rows.view(n * window_cells, c).index_copy_(0, index.reshape(-1), patch_rows)
        return windows
    index, valid = _patch_cells_in_windows(offset, window_size, patch_size)
    index = index.reshape(n, window_cells) + first * patch_cells
    from_patch = patch_rows.index_select(0, index.reshape(-1)).view(n, *window_size, c).movedim(-1, 1)
    return torch.where(valid.view(n, 1, *window_size), from_patch, windows)


def project(base: torch.Tensor, patch: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Projection to full (docs/design.md §2.6): N copies of base [C, *S] with each patch painted in."""
    n, c, size = patch.shape[0], patch.shape[1], tuple(patch.shape[2:])
    full = tuple(base.shape[1:])
    cells = math.prod(size)
    rows = _rows(base, 0)
    if rows is not None:  # channels-last: N copies of the rows, each patch's rows written in
        out = rows.unsqueeze(0).expand(n, *rows.shape).clone(memory_format=torch.contiguous_format)
        first = torch.arange(n, device=origin.device)[:, None]
        index = _flat_window_index(origin, size, full).view(n, cells) + first * math.prod(full)
        out.view(-1, c).index_copy_(0, index.reshape(-1), patch.movedim(1, -1).reshape(-1, c))
        return out.movedim(-1, 1)
    # clone, not contiguous(): for N == 1 the expanded view is already contiguous, and scattering
    # into it would overwrite the cached base activation that later batches read.
    out = base.expand(n, c, *full).clone(memory_format=torch.contiguous_format)
    index = _flat_window_index(origin, size, full).view(n, 1, cells).expand(n, c, cells)
    out.view(n, c, math.prod(full)).scatter_(2, index, patch.reshape(n, c, cells))
    return out
