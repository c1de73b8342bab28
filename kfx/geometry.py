"""The paper's patch geometry, one axis at a time, as small pure integer functions.

Every equation kfx relies on lives here once; the passes, the kernels, the cost model and the tests
all call these. No torch import: these are plain integers. Coordinates start at the top-left of the
*unpadded* tensor; height and width are handled separately by calling each function once per axis.

Equation numbers are those of KRYPTON (Nakandala, Kumar, Papakonstantinou, SIGMOD 2019; "[TR]"),
explained in docs/design.md §2 and §4 (departures from the paper: §6).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "Span",
    "ceil_div",
    "effective_kernel",
    "conv_output_size",
    "heatmap_size",
    "captum_heatmap_size",
    "changed_output_span",
    "read_in_span",
    "shift_inside",
    "union_span",
    "same_padding",
    "transposed_conv_output_span",
    "transposed_conv_read_span",
    "resample_output_span",
    "resample_read_span",
    "reach_output_span",
    "reach_read_span",
    "conv_fmas",
    "projective_field_cap",
    "thresholded_output_span",
    "drill_down_speedup",
    "drill_down_stage1_stride",
]


class Span(NamedTuple):
    """A half-open interval [start, start + width) along one axis."""

    start: int
    width: int

    @property
    def stop(self) -> int:
        return self.start + self.width


def ceil_div(a: int, b: int) -> int:
    """Ceiling of a / b for integers (b > 0), exact for negative a too.

    >>> ceil_div(7, 2), ceil_div(-3, 2)
    (4, -1)
    """
    return -(-a // b)


def effective_kernel(kernel: int, dilation: int = 1) -> int:
    """Extent of a dilated kernel, k_eff = d * (k - 1) + 1 (docs/design.md §1.2).

    >>> effective_kernel(3, 2)
    5
    """
    return dilation * (kernel - 1) + 1


def conv_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
    padding_after: int | None = None,
) -> int:
    """Output length of a conv/pool along one axis, PyTorch's own formula (docs/design.md §2.3, [TR] Eq. 8).

    floor((W + p_before + p_after - k_eff) / s) + 1, or the ceiling with ``ceil_mode``, where a
    last window that would start inside the right padding is dropped (as PyTorch does).

    >>> conv_output_size(224, 3, 1, 1), conv_output_size(112, 2, 2), conv_output_size(5, 2, 2, ceil_mode=True)
    (224, 56, 3)
    """
    after = padding if padding_after is None else padding_after
    span = size + padding + after - effective_kernel(kernel, dilation)
    out = (ceil_div(span, stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def heatmap_size(image: int, patch: int, stride: int) -> int:
    """Number of patch positions along one axis: x = 0, S, 2S, ... while x + p <= W (docs/design.md §2.1).

    This is kfx's convention, floor((W - p) / S) + 1: every window lies inside the image. The paper's
    Eq. 1 writes floor((W - p + 1) / S), one fewer at 224/16/4.

    >>> heatmap_size(224, 16, 4)
    53
    """
    return (image - patch) // stride + 1


def captum_heatmap_size(image: int, patch: int, stride: int) -> int:
    """Captum's windows per axis: ceil((W - p) / S) + 1, the last one clipped (docs/design.md §2.1).

    >>> captum_heatmap_size(10, 4, 4)
    3
    """
    return ceil_div(image - patch, stride) + 1


def shift_inside(start: int, width: int, size: int) -> int:
    """Move a span of fixed width back inside [0, size) if it runs off the end ([TR] Eq. 31).

    >>> shift_inside(6, 3, 8)
    5
    """
    return min(start, size - width)


def changed_output_span(
    in_start: int, in_width: int, *, kernel: int, stride: int, padding: int, out_size: int
) -> Span:
    """Output box of a conv/pool whose input changed over [in_start, in_start + in_width).

    kernel is the effective (dilated) extent, padding the padding *before* the axis.

    - start  x_out = max(ceil((x_in + p - k_eff + 1) / s), 0)              ([TR] Eq. 13)
    - width  w_out = min(ceil((w_in + k_eff - 1) / s), W_out)               ([TR] Eq. 14)
    - shifted back inside if x_out + w_out > W_out                          ([TR] Eq. 31)

    The width depends only on in_width: it is an upper bound shared by every patch position, which
    is what lets one batched op serve all of them. The span always contains every output whose
    window overlaps the changed input.

    >>> changed_output_span(100, 16, kernel=3, stride=1, padding=1, out_size=224)
    Span(start=99, width=18)
    """
    width = min(ceil_div(in_width + kernel - 1, stride), out_size)
    start = max(ceil_div(in_start + padding - kernel + 1, stride), 0)
    return Span(shift_inside(start, width, out_size), width)


def projective_field_cap(out_size: int, tau: float) -> int:
    """Widest changed box a local layer may output under projective-field thresholding.

    round(tau * W_out) ([TR] Eq. 22, docs/design.md §4.1), with Python's round as in the paper's numbers
    (docs/design.md §8), and at least 1: a cap of 0 would drop the occlusion entirely.

    >>> projective_field_cap(56, 0.5), projective_field_cap(7, 0.4), projective_field_cap(1, 0.4)
    (28, 3, 1)
    """
    return max(1, round(tau * out_size))


def thresholded_output_span(
    in_start: int, in_width: int, *, kernel: int, stride: int, padding: int, out_size: int, tau: float
) -> Span:
    """Output box of a conv/pool under projective-field thresholding with knob tau ([TR] Eqs. 21-27).

    - width  W_O = min(ceil((w_in + k_eff - 1) / s), W_out)                   ([TR] Eq. 21 = Eq. 14)
    - if W_O > cap = round(tau * W_out):  W_O = cap                           ([TR] Eqs. 22-23)
    - input box shrunk to w_in' = W_O * s - k_eff + 1, centred on the old one:
      x_in' = x_in + (w_in - w_in') / 2                                       ([TR] Eqs. 24-26)
    - start  x_O = max(ceil((x_in' + p - k_eff + 1) / s), 0)                  ([TR] Eq. 27)
    - shifted back inside if x_O + W_O > W_out                                ([TR] Eq. 31)

    The shrunk input box only places the output box: x_in' may sit half a pixel off the grid, so
    Eq. 27 is evaluated with numerator and denominator doubled, exactly as the paper's float code.
    Uncapped boxes (always so at tau = 1) are :func:`changed_output_span`'s, by the same code.

    >>> thresholded_output_span(100, 16, kernel=3, stride=1, padding=1, out_size=224, tau=0.05)
    Span(start=103, width=11)
    >>> thresholded_output_span(100, 16, kernel=3, stride=1, padding=1, out_size=224, tau=1.0)
    Span(start=99, width=18)
    """
    cap = projective_field_cap(out_size, tau)
    if min(ceil_div(in_width + kernel - 1, stride), out_size) <= cap:
        return changed_output_span(
            in_start, in_width, kernel=kernel, stride=stride, padding=padding, out_size=out_size
        )
    cropped_width = cap * stride - kernel + 1
    start = max(ceil_div(2 * (in_start + padding - kernel + 1) + in_width - cropped_width, 2 * stride), 0)
    return Span(shift_inside(start, cap, out_size), cap)


def read_in_span(out_start: int, out_width: int, *, kernel: int, stride: int, padding: int) -> Span:
    """Input window needed to recompute outputs [out_start, out_start + out_width).

    - start  x_rd = x_out * s - p       (may be negative: it reads from the padding)  ([TR] Eq. 15)
    - width  w_rd = k_eff + (w_out - 1) * s                                            ([TR] Eq. 16)

    >>> read_in_span(99, 18, kernel=3, stride=1, padding=1)
    Span(start=98, width=20)
    """
    return Span(out_start * stride - padding, kernel + (out_width - 1) * stride)


def union_span(spans: list[Span] | tuple[Span, ...]) -> Span:
    """Bounding box of several spans, for merge nodes (add, concat) ([TR] Eq. 20).

    >>> union_span([Span(3, 4), Span(5, 4)])
    Span(start=3, width=6)
    """
    start = min(s.start for s in spans)
    return Span(start, max(s.stop for s in spans) - start)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) of one axis, as timm's ``pad_same`` computes it
    from the input size: enough for ceil(size / stride) outputs, the odd element after.

    total = max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0);  before = total // 2

    >>> same_padding(224, 3, 2), same_padding(7, 5, 1), same_padding(8, 1, 2)
    ((0, 1), (2, 2), (0, 0))
    """
    total = max((ceil_div(size, stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def transposed_conv_output_span(
    in_start: int, in_width: int, *, kernel: int, stride: int, padding: int, out_size: int
) -> Span:
    """Output box of a transposed conv whose input changed over [in_start, in_start + in_width)
    (docs/design.md §2.10). Input i reaches outputs i * s - p + j * d for taps j; kernel is the
    effective extent d * (k - 1) + 1. Clipped to the map, the width made uniform by the caller.

    - start  x_out = max(x_in * s - p, 0)
    - stop   min((x_in + w_in - 1) * s - p + k_eff, W_out)

    >>> transposed_conv_output_span(3, 2, kernel=4, stride=2, padding=1, out_size=16)
    Span(start=5, width=6)
    """
    start = max(in_start * stride - padding, 0)
    stop = min((in_start + in_width - 1) * stride - padding + kernel, out_size)
    return Span(start, max(stop - start, 1))


def transposed_conv_read_span(
    out_start: int, out_width: int, *, kernel: int, stride: int, padding: int
) -> Span:
    """Inputs a transposed conv needs to recompute outputs [out_start, out_start + out_width)
    (docs/design.md §2.10): every input that reaches one of them, from
    floor((x_out + p - k_eff + 1) / s) (rounded down, so the window's own outputs start at or
    before x_out) to floor((x_out + w_out - 1 + p) / s). The caller clips it to the map.

    >>> transposed_conv_read_span(5, 6, kernel=4, stride=2, padding=1)
    Span(start=1, width=5)
    """
    start = (out_start + padding - kernel + 1) // stride
    stop = (out_start + out_width - 1 + padding) // stride + 1
    return Span(start, stop - start)


def resample_output_span(in_start: int, in_width: int, first: Sequence[int], stop: Sequence[int]) -> Span:
    """Output box of a resampling op (interpolate, Upsample) whose input changed over
    [in_start, in_start + in_width) (docs/design.md §2.8).

    Output o reads inputs [first[o], stop[o]) (its nonzero weights); both are nondecreasing in o for
    every nearest/linear/cubic resampling. The box runs from the first output whose reach ends after
    in_start to the last whose reach starts before the change ends. An output-skipping downsample
    may read none of the changed inputs: the box then keeps one output (a superset is exact).

    >>> first, stop = [0, 0, 0, 1, 1, 2, 2, 3], [1, 2, 2, 3, 3, 4, 4, 4]  # bilinear, x2, 4 -> 8
    >>> resample_output_span(1, 1, first, stop)
    Span(start=1, width=4)
    """
    begin = bisect.bisect_right(stop, in_start)
    end = bisect.bisect_left(first, in_start + in_width)
    begin = min(begin, len(first) - 1)
    return Span(begin, max(end - begin, 1))


def resample_read_span(out_start: int, out_width: int, first: Sequence[int], stop: Sequence[int]) -> Span:
    """Input window that recomputing resampled outputs [out_start, out_start + out_width) reads:
    from the first output's first input to the last output's last (docs/design.md §2.8).

    >>> first, stop = [0, 0, 0, 1, 1, 2, 2, 3], [1, 2, 2, 3, 3, 4, 4, 4]
    >>> resample_read_span(1, 4, first, stop)
    Span(start=0, width=3)
    """
    start = first[out_start]
    return Span(start, stop[out_start + out_width - 1] - start)


def reach_output_span(in_start: int, in_width: int, first: Sequence[int], stop: Sequence[int]) -> Span:
    """Output box of a linear map along one axis whose output o reads inputs [first[o], stop[o]) in
    any order: reflect, replicate and circular padding read backwards or wrap around at the borders
    (docs/design.md §2.8), so the box is the hull of every output that reads a changed input. If none
    does, the box keeps one output (a superset is exact).

    >>> first, stop = [2, 1, 0, 1, 2, 3, 2, 1], [3, 2, 1, 2, 3, 4, 3, 2]  # reflect pad 2, 4 -> 8
    >>> reach_output_span(1, 1, first, stop)
    Span(start=1, width=7)
    """
    readers = [o for o, (f, s) in enumerate(zip(first, stop)) if f < in_start + in_width and s > in_start]
    return Span(readers[0], readers[-1] - readers[0] + 1) if readers else Span(0, 1)


def reach_read_span(out_start: int, out_width: int, first: Sequence[int], stop: Sequence[int]) -> Span:
    """Input window that recomputing outputs [out_start, out_start + out_width) of a linear map with
    reach in any order reads: from the smallest first input to the largest stop among them.

    >>> first, stop = [2, 1, 0, 1, 2, 3, 2, 1], [3, 2, 1, 2, 3, 4, 3, 2]
    >>> reach_read_span(1, 7, first, stop)
    Span(start=0, width=4)
    """
    outputs = range(out_start, out_start + out_width)
    start = min(first[o] for o in outputs)
    return Span(start, max(stop[o] for o in outputs) - start)


def conv_fmas(
    in_channels: int, out_channels: int, groups: int, kernel_h: int, kernel_w: int, out_h: int, out_w: int
) -> int:
    """Fused multiply-adds of a conv producing an out_h x out_w output ([TR] Eqs. 9 and 11).

    Q = (C_in / groups * k_h * k_w) * (C_out * H_out * W_out). With the changed box's size in place
    of the full output size this is the incremental cost Q_inc.

    >>> conv_fmas(3, 64, 1, 3, 3, 224, 224)
    86704128
    """
    return (in_channels // groups) * kernel_h * kernel_w * out_channels * out_h * out_w


def drill_down_speedup(stage1_stride: float, stage2_stride: float, fraction: float) -> float:
    """Query-count speedup of adaptive drill-down over the stage-2 grid ([TR] Eq. 28, docs/design.md §4.2).

    S1^2 / (S2^2 + r * S1^2): stage 1 asks (S2/S1)^2 of the queries, stage 2 a fraction r of them.

    >>> round(drill_down_speedup(16, 4, 0.1), 2), round(drill_down_speedup(16, 4, 0.25), 2)
    (6.15, 3.2)
    """
    return stage1_stride**2 / (stage2_stride**2 + fraction * stage1_stride**2)


def drill_down_stage1_stride(stage2_stride: float, fraction: float, target_speedup: float) -> float:
    """Stage-1 stride that gives ``target_speedup`` at fraction r ([TR] Eq. 29, docs/design.md §4.2).

    S1 = S2 * sqrt(t / (1 - r * t)); it exists only for r * t < 1 ([TR] Eq. 30: the speedup stays
    below 1 / r, since stage 2 alone asks r of the queries).

    >>> round(drill_down_stage1_stride(4, 0.25, 3), 2)
    13.86
    """
    if not fraction * target_speedup < 1:
        raise ValueError(
            f"drill-down cannot reach speedup {target_speedup} at fraction {fraction}: needs r * t < 1"
        )
    return stage2_stride * math.sqrt(target_speedup / (1 - fraction * target_speedup))
