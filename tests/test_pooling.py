"""Window pooling by strided slices (kfx.kernels.pooling) against torch's own pooling ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kfx.kernels.pooling import window_max, window_sum

MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}  # the 1-d pool has no divisor_override


@st.composite
def pooling_cases(draw):
    axes = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(axes))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(axes))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(axes))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    size = tuple(e + draw(st.integers(0, 5)) for e in extent)
    n, c = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return torch.randn(n, c, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), (
        kernel,
        stride,
        dilation,
    )


@settings(max_examples=150, deadline=None)
@given(pooling_cases())
def test_window_max_equals_torch_max_pool(case):
    window, (kernel, stride, dilation) = case
    expected = MAX_POOL[len(kernel)](window, kernel, stride, 0, dilation)
    got = window_max(window, kernel, stride, dilation)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)


@settings(max_examples=150, deadline=None)
@given(pooling_cases())
def test_window_sum_equals_torch_sum_pool(case):
    window, (kernel, stride, _) = case
    if len(kernel) == 1:  # as a 1 x k 2-d pool, the oracle torch has for 1-d sums
        expected = F.avg_pool2d(window.unsqueeze(-2), (1, *kernel), (1, *stride), 0, False, True, 1).squeeze(
            -2
        )
    else:
        expected = AVG_POOL[len(kernel)](window, kernel, stride, 0, False, True, 1)
    got = window_sum(window, kernel, stride)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * math.prod(kernel))


def test_window_max_lets_nan_win_and_leaves_its_input_alone():
    window = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    window[0, 1, 4, 4] = float("nan")
    window[1, 2, :3, :3] = float("-inf")  # a window of max-pool padding only
    before = window.clone()
    got = window_max(window, (3, 3), (2, 2), (1, 1))
    expected = F.max_pool2d(window, 3, 2)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert torch.equal(window.nan_to_num(), before.nan_to_num())


def test_window_sum_of_a_non_contiguous_window():
    window = torch.randn(2, 7, 8, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last storage
    torch.testing.assert_close(
        window_sum(window, (3, 2), (1, 2)), F.avg_pool2d(window, (3, 2), (1, 2), 0, False, True, 1)
    )


@pytest.mark.parametrize("pool", [window_max, window_sum])
def test_a_window_shorter_than_the_kernel_gets_torchs_error(pool):
    args = ((1, 1),) if pool is window_max else ()
    with pytest.raises(RuntimeError):
        pool(torch.randn(1, 2, 2, 5), (3, 3), (1, 1), *args)
