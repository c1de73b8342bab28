"""The batched torch kernels against per-position slicing (the plainest possible definition), on
contiguous tensors and on channels-last ones (moved as rows of channels, and kept in that layout)."""

import pytest
import torch

from kfx import kernels

LAYOUTS = ["contiguous", "channels_last"]


def _in_layout(t: torch.Tensor, layout: str, channel_dim: int) -> torch.Tensor:
    """``t`` (same values) with its channels innermost in memory for "channels_last"."""
    if layout == "contiguous":
        return t.contiguous()
    return t.movedim(channel_dim, -1).contiguous().movedim(-1, channel_dim)


def _has_layout(t: torch.Tensor, layout: str, channel_dim: int) -> bool:
    return t.is_contiguous() if layout == "contiguous" else t.movedim(channel_dim, -1).is_contiguous()


def _windows_by_slicing(padded, origin, size):
    return torch.stack([padded[:, y : y + size[0], x : x + size[1]] for y, x in origin.tolist()])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_windows_matches_slicing(layout):
    padded = _in_layout(torch.randn(5, 9, 11, dtype=torch.float64), layout, 0)
    origin = torch.tensor([[0, 0], [4, 6], [2, 3], [6, 0]])
    got = kernels.gather_windows(padded, origin, (3, 5))
    assert torch.equal(got, _windows_by_slicing(padded, origin, (3, 5)))
    assert _has_layout(got, layout, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pad_base_fills_margins_with_value(layout):
    base = _in_layout(torch.randn(1, 2, 3, 4), layout, 1)
    padded = kernels.pad_base(base, (1, 2, 0, 3), float("-inf"))
    assert _has_layout(padded, layout, 0) and _has_layout(kernels.pad_base(base, (0,) * 4, 0.0), layout, 0)
    assert padded.shape == (2, 6, 7)
    assert torch.equal(padded[:, 1:4, 0:4], base[0])
    assert torch.isinf(padded[:, 0]).all() and torch.isinf(padded[:, :, 4:]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("patch_layout", LAYOUTS)
@pytest.mark.parametrize("inside", [True, False])
def test_paste_clips_to_window(inside, layout, patch_layout):
    n, c = 4, 3
    windows = _in_layout(torch.randn(n, c, 5, 6, dtype=torch.float64), layout, 1)
    window_origin = torch.tensor([[0, 0], [2, 2], [1, 0], [3, 1]])
    patch = _in_layout(torch.randn(n, c, 2, 3, dtype=torch.float64), patch_layout, 1)
    if inside:
        patch_origin = window_origin + torch.tensor([[0, 0], [3, 3], [1, 2], [2, 1]])
    else:  # hangs off every side of its window
        patch_origin = window_origin + torch.tensor([[-1, 0], [4, 4], [0, -2], [-1, 5]])
    expected = windows.clone()
    for i in range(n):
        for r in range(2):
            for col in range(3):
                y, x = (patch_origin[i] - window_origin[i]).tolist()
                if 0 <= y + r < 5 and 0 <= x + col < 6:
                    expected[i, :, y + r, x + col] = patch[i, :, r, col]
    got = kernels.paste(
        windows.clone(memory_format=torch.preserve_format), window_origin, patch, patch_origin, inside=inside
    )
    assert torch.equal(got, expected) and _has_layout(got, layout, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 3])
def test_project_paints_patches_and_leaves_base_untouched(n, layout):
    base = _in_layout(torch.randn(2, 6, 7, dtype=torch.float64), layout, 0)
    keep = base.clone()
    patch = torch.randn(n, 2, 2, 3, dtype=torch.float64)
    origin = torch.tensor([[0, 0], [4, 4], [1, 2]])[:n]
    got = kernels.project(base, patch, origin)
    expected = keep.expand(n, -1, -1, -1).clone()
    for i, (y, x) in enumerate(origin.tolist()):
        expected[i, :, y : y + 2, x : x + 3] = patch[i]
    assert torch.equal(got, expected) and _has_layout(got, layout, 1)
    # N == 1: the expanded base is already contiguous, so a scatter into it would write the base.
    assert torch.equal(base, keep)
