"""The changed boxes along one axis (docs/design.md §2.3-2.5, §2.8, §2.10): for every patch
coordinate, where an op's changed output starts and which input window recomputes it, made one
width for all positions so that a batch shares one shape. Patch propagation (kfx.passes.patch_prop)
applies these once per spatial axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfx.geometry import (
    Span,
    reach_output_span,
    reach_read_span,
    read_in_span,
    resample_output_span,
    resample_read_span,
    shift_inside,
    thresholded_output_span,
    transposed_conv_output_span,
    transposed_conv_read_span,
    union_span,
)
from kfx.passes.local import LocalSpec
from kfx.passes.resample import ResampleSpec
from kfx.passes.transposed import TransposedSpec

__all__ = ["AxisBoxes", "local_axis", "resample_axis", "transposed_axis", "merge_axis"]


@dataclass(frozen=True)
class AxisBoxes:
    """Boxes along one axis for every patch position: [starts[x], starts[x] + width).

    ``starts`` is indexed by the patch's coordinate x in the *image* (0 .. W_image - patch),
    ``width`` is shared by all positions (the upper bound that makes batching possible).
    """

    width: int
    starts: tuple[int, ...]

    def span(self, x: int) -> Span:
        return Span(self.starts[x], self.width)


def local_axis(
    inp: AxisBoxes, spec: LocalSpec, axis: int, out_size: int, tau: float
) -> tuple[AxisBoxes, AxisBoxes]:
    kw = dict(kernel=spec.kernel[axis], stride=spec.stride[axis], padding=spec.padding[axis])
    # The paper caps convs and pools; a constant pad only shifts coordinates, it never grows a box.
    cap = 1.0 if spec.kind == "pad" else tau
    # The table has a start per patch coordinate, but after a few strided layers only a handful of
    # distinct ones: each distinct start is mapped once (compile time, not a different answer).
    out_of = {
        s: thresholded_output_span(s, inp.width, out_size=out_size, tau=cap, **kw) for s in set(inp.starts)
    }
    read_of = {o: read_in_span(o.start, o.width, **kw) for o in set(out_of.values())}
    outs = [out_of[s] for s in inp.starts]
    return (
        AxisBoxes(outs[0].width, tuple(o.start for o in outs)),
        AxisBoxes(read_of[outs[0]].width, tuple(read_of[o].start for o in outs)),
    )


def _uniform(spans: list[Span], size: int) -> AxisBoxes:
    """Spans of one axis made one width (the widest), shifted back inside [0, size) ([TR] Eq. 31)."""
    width = max(s.width for s in spans)
    shifted = {start: shift_inside(start, width, size) for start in {s.start for s in spans}}
    return AxisBoxes(width, tuple(shifted[s.start] for s in spans))


def resample_axis(inp: AxisBoxes, spec: ResampleSpec, axis: int, in_size: int) -> tuple[AxisBoxes, AxisBoxes]:
    first, stop = spec.first[axis], spec.stop[axis]
    # Interpolation reads forwards (bisection on its sorted reach); a reflect, replicate or circular
    # pad reads backwards or wraps at the borders (the hull of a scan). Each distinct start once.
    monotone = list(first) == sorted(first) and list(stop) == sorted(stop)
    output_span, read_span = (
        (resample_output_span, resample_read_span) if monotone else (reach_output_span, reach_read_span)
    )
    out_of = {s: output_span(s, inp.width, first, stop) for s in set(inp.starts)}
    box = _uniform([out_of[s] for s in inp.starts], len(first))
    read_of = {s: read_span(s, box.width, first, stop) for s in set(box.starts)}
    read = _uniform([read_of[s] for s in box.starts], in_size)
    return box, read


def transposed_axis(inp: AxisBoxes, spec: TransposedSpec, axis: int, in_size: int, out_size: int):
    """Box and read-in window along one axis, or None if a window's result would not hold its box."""
    kw = dict(kernel=spec.kernel[axis], stride=spec.stride[axis], padding=spec.padding[axis])
    box = _uniform(
        [transposed_conv_output_span(s, inp.width, out_size=out_size, **kw) for s in inp.starts], out_size
    )
    reads = [transposed_conv_read_span(s, box.width, **kw) for s in box.starts]
    read = _uniform([Span(max(r.start, 0), min(r.stop, in_size) - max(r.start, 0)) for r in reads], in_size)
    stride, pad = spec.stride[axis], spec.padding[axis]
    result = (read.width - 1) * stride + spec.kernel[axis] + stride - 1  # one window's output length
    offsets = [o + pad - r * stride for o, r in zip(box.starts, read.starts)]
    return (box, read) if all(0 <= off and off + box.width <= result for off in offsets) else None


def merge_axis(inputs: list[AxisBoxes], size: int) -> AxisBoxes:
    """Union box of several changed boxes ([TR] Eq. 20), made uniform in width across positions."""
    starts = list(zip(*(b.starts for b in inputs)))  # the inputs' starts at each patch coordinate
    union_of = {key: union_span([Span(s, b.width) for s, b in zip(key, inputs)]) for key in set(starts)}
    return _uniform([union_of[key] for key in starts], size)
