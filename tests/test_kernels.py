"""The batched torch kernels against per-position slicing (the plainest possible definition)."""

import pytest
import torch

from kfx import kernels


def _windows_by_slicing(padded, origin, size):
    return torch.stack([padded[:, y : y + size[0], x : x + size[1]] for y, x in origin.tolist()])


def test_gather_windows_matches_slicing():
    padded = torch.randn(5, 9, 11, dtype=torch.float64)
    origin = torch.tensor([[0, 0], [4, 6], [2, 3], [6, 0]])
    got = kernels.gather_windows(padded, origin, (3, 5))
    assert torch.equal(got, _windows_by_slicing(padded, origin, (3, 5)))


def test_pad_base_fills_margins_with_value():
    base = torch.randn(1, 2, 3, 4)
    padded = kernels.pad_base(base, (1, 2, 0, 3), float("-inf"))
    assert padded.shape == (2, 6, 7)
    assert torch.equal(padded[:, 1:4, 0:4], base[0])
    assert torch.isinf(padded[:, 0]).all() and torch.isinf(padded[:, :, 4:]).all()


@pytest.mark.parametrize("inside", [True, False])
def test_paste_clips_to_window(inside):
    n, c = 4, 3
    windows = torch.randn(n, c, 5, 6, dtype=torch.float64)
    window_origin = torch.tensor([[0, 0], [2, 2], [1, 0], [3, 1]])
    patch = torch.randn(n, c, 2, 3, dtype=torch.float64)
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
    got = kernels.paste(windows.clone(), window_origin, patch, patch_origin, inside=inside)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("n", [1, 3])
def test_project_paints_patches_and_leaves_base_untouched(n):
    base = torch.randn(2, 6, 7, dtype=torch.float64)
    keep = base.clone()
    patch = torch.randn(n, 2, 2, 3, dtype=torch.float64)
    origin = torch.tensor([[0, 0], [4, 4], [1, 2]])[:n]
    got = kernels.project(base, patch, origin)
    expected = keep.expand(n, -1, -1, -1).clone()
    for i, (y, x) in enumerate(origin.tolist()):
        expected[i, :, y : y + 2, x : x + 3] = patch[i]
    assert torch.equal(got, expected)
    # N == 1: the expanded base is already contiguous, so a scatter into it would write the base.
    assert torch.equal(base, keep)
