"""kfx.geometry against brute force: torch decides which outputs really change."""

import doctest

import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from kfx import geometry
from kfx.geometry import Span, changed_output_span, conv_output_size, read_in_span, union_span


def test_doctests():
    assert doctest.testmod(geometry).failed == 0


@st.composite
def axis_case(draw):
    kernel = draw(st.integers(1, 7), label="kernel")
    dilation = draw(st.integers(1, 3), label="dilation")
    stride = draw(st.integers(1, 4), label="stride")
    k_eff = geometry.effective_kernel(kernel, dilation)
    padding = draw(st.integers(0, (k_eff - 1) // 2 + 1), label="padding")
    size = draw(st.integers(max(1, k_eff - 2 * padding), 30), label="size")
    ceil_mode = draw(st.booleans(), label="ceil_mode") and padding <= kernel // 2 and dilation == 1
    width = draw(st.integers(1, size), label="changed_width")
    start = draw(st.integers(0, size - width), label="changed_start")
    return kernel, dilation, stride, padding, size, ceil_mode, start, width


@given(axis_case())
@example((3, 1, 2, 1, 7, True, 6, 1))  # ceil_mode window that starts in the right padding
def test_output_span_contains_every_changed_output_and_read_span_suffices(case):
    kernel, dilation, stride, padding, size, ceil_mode, start, width = case
    k_eff = geometry.effective_kernel(kernel, dilation)
    x = torch.randn(1, 1, 1, size, dtype=torch.float64)
    y = x.clone()
    y[..., start : start + width] += 1.0 + torch.rand(width, dtype=torch.float64)
    if ceil_mode:  # max pool: the op where ceil_mode applies
        op = lambda t: F.max_pool2d(t, (1, kernel), (1, stride), (0, padding), ceil_mode=True)
    else:  # a positive-weight conv: any change in its window changes the output
        w = torch.rand(1, 1, 1, kernel, dtype=torch.float64) + 0.1
        op = lambda t: F.conv2d(t, w, None, (1, stride), (0, padding), (1, dilation))
    out_x, out_y = op(x), op(y)
    out_size = out_x.shape[-1]
    assert out_size == conv_output_size(size, kernel, stride, padding, dilation, ceil_mode)

    span = changed_output_span(start, width, kernel=k_eff, stride=stride, padding=padding, out_size=out_size)
    assert 0 <= span.start and span.stop <= out_size
    changed = (out_x != out_y)[0, 0, 0].nonzero().flatten().tolist()
    assert all(span.start <= i < span.stop for i in changed)

    # Recomputing the span from its read-in window (padded with the op's padding) is exact.
    read = read_in_span(span.start, span.width, kernel=k_eff, stride=stride, padding=padding)
    assert read.width == k_eff + (span.width - 1) * stride
    pad_value = float("-inf") if ceil_mode else 0.0
    padded = F.pad(y, (padding, read.stop + 1), value=pad_value)
    window = padded[..., read.start + padding : read.stop + padding]
    if ceil_mode:
        recomputed = F.max_pool2d(window, (1, kernel), (1, stride))
    else:
        recomputed = F.conv2d(window, w, None, (1, stride), 0, (1, dilation))
    # float64, but not bit for bit: a conv over a narrower input may sum in another order
    torch.testing.assert_close(
        recomputed[0, 0, 0], out_y[0, 0, 0, span.start : span.stop], rtol=1e-12, atol=1e-12
    )


def test_union_span_and_paper_example():
    assert union_span([Span(3, 4), Span(5, 4)]) == Span(3, 6)
    # VGG16 conv1_1 with a 16-wide patch at x = 104: 18 outputs from 103, read 20 from 102.
    span = changed_output_span(104, 16, kernel=3, stride=1, padding=1, out_size=224)
    assert span == Span(103, 18)
    assert read_in_span(*span, kernel=3, stride=1, padding=1) == Span(102, 20)


def test_heatmap_conventions():
    assert geometry.heatmap_size(224, 16, 4) == 53  # kfx: every window inside the image
    assert (224 - 16 + 1) // 4 == 52  # the paper's Eq. 1, one fewer
    assert geometry.captum_heatmap_size(224, 16, 4) == 53
    assert geometry.captum_heatmap_size(10, 4, 4) == 3 and geometry.heatmap_size(10, 4, 4) == 2
