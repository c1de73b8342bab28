"""Window pooling by strided slices (kfx.kernels.pooling) against torch's own pooling ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfx
from kfx.kernels.pooling import window_max, window_sum
from kfx.passes.steps import DensePoolStep

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


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MAX_POOL_MODULE = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_POOL_MODULE = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class GatedPools(nn.Module):
    """A conv, a squeeze-excitation-style gate (every output cell changes: the exact engine runs
    densely after it), then pools of every kind kfx runs densely: padded ceil-mode max, dilated max,
    3x3 stride-1 average (one divisor everywhere) and a ceil-mode average without padding counted
    (divisors differ at the edge: left to torch's op)."""

    def __init__(self, axes: int):
        super().__init__()
        self.axes = axes
        self.conv = CONV[axes](2, 3, 3, padding=1)
        self.max = MAX_POOL_MODULE[axes](3, stride=2, padding=1, ceil_mode=True)
        self.dilated = MAX_POOL_MODULE[axes](2, stride=1, dilation=2)
        self.avg = AVG_POOL_MODULE[axes](3, stride=1, padding=1)
        self.edge = AVG_POOL_MODULE[axes](2, stride=2, ceil_mode=True, count_include_pad=False)

    def forward(self, x):
        x = self.conv(x)
        spatial = tuple(range(2, 2 + self.axes))
        x = x * torch.sigmoid(x.mean(spatial, keepdim=True))
        x = self.avg(self.dilated(self.max(x)))
        return self.edge(x).flatten(1)


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_pools_run_densely_by_window_pools_equal_full_inference(axes):
    torch.manual_seed(axes)
    model = GatedPools(axes).double().eval()
    # A multiple of 4 along an axis: ceil_mode pads the max-pool one more after than before, and the
    # edge pool gets an odd length, so its divisors differ.
    shape = {1: (2, 24), 2: (2, 12, 11), 3: (2, 8, 9, 12)}[axes]
    engine = kfx.compile(model, shape, kfx.Patch(3, stride=2), plan="incremental")
    dense = [m for m in engine.program.modules() if isinstance(m, DensePoolStep)]
    assert len(dense) == 3  # max, dilated max, uniform average; the edge average stays torch's
    image = torch.randn(shape, dtype=torch.float64)
    positions = kfx.grid_positions(shape[1:], engine.patch)
    occluded = image.expand(len(positions), *shape).clone()
    for i, corner in enumerate(positions.tolist()):
        occluded[(i, slice(None), *(slice(c, c + 3) for c in corner))] = 0.0
    expected = model(occluded)
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_sum_adds_half_precision_in_float32_as_torch_does(dtype):
    # Values whose float32 sum rounds to another half-precision number than a running half sum does.
    window = (torch.rand(3, 4, 12, 12, generator=torch.Generator().manual_seed(0)) * 64 + 200).to(dtype)
    expected = F.avg_pool2d(window, 5, 1, 0, False, True, 1)
    got = window_sum(window, (5, 5), (1, 1))
    assert got.dtype == dtype
    assert (got.float() - expected.float()).abs().max() <= (
        expected.float().abs().max() * torch.finfo(dtype).eps
    )


@pytest.mark.parametrize("pool", [window_max, window_sum])
def test_a_one_cell_kernel_returns_a_new_tensor(pool):
    window = torch.randn(2, 3, 5, 5)
    args = ((1, 1),) if pool is window_max else ()
    out = pool(window, (1, 1), (1, 1), *args)
    assert torch.equal(out, window) and out.data_ptr() != window.data_ptr()


def test_window_pools_keep_a_channels_last_layout():
    window = torch.randn(2, 8, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got_max, got_sum = window_max(window, (3, 3), (2, 2), (1, 1)), window_sum(window, (3, 3), (1, 1))
    assert torch.equal(got_max, F.max_pool2d(window, 3, 2))
    torch.testing.assert_close(got_sum, F.avg_pool2d(window, 3, 1, 0, False, True, 1))
    assert got_max.is_contiguous(memory_format=torch.channels_last)
    assert got_sum.is_contiguous(memory_format=torch.channels_last)
