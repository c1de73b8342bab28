"""Transposed convolutions (``nn.ConvTranspose2d``, ``F.conv_transpose2d``) as local ops
(docs/design.md §2.10).

Input i of a transposed conv reaches outputs i * s - p + j * d: a change spreads over a box of
outputs (kfx.geometry.transposed_conv_output_span) that a window of inputs recomputes
(transposed_conv_read_span). The step runs the op with no padding on each position's window and
crops the box out of the result; the op's padding only crops its output, so nothing is read
outside the map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from kfx.geometry import effective_kernel
from kfx.passes.ops import _pair, bind_args  # kfx.passes.ops' argument reading

__all__ = ["TransposedSpec", "transposed_spec"]


@dataclass(frozen=True)
class TransposedSpec:
    """A transposed conv reduced to what the incremental step needs. ``apply(window, *consts)`` runs
    it with no padding and ``stride - 1`` extra output rows and columns (output_padding), so a
    window's result covers every output its inputs reach; ``consts`` are the runtime values of
    ``const_nodes`` (weight and bias of the functional form)."""

    kernel: tuple[int, int]  # effective (dilated) extent
    stride: tuple[int, int]
    padding: tuple[int, int]
    apply: Callable
    fmas_per_input: int  # C_in * C_out/groups * k_h * k_w: one input pixel's FMAs (the cost model's unit)
    const_nodes: tuple[fx.Node, ...] = ()


def _spec(weight_shape, stride, padding, dilation, groups, run, const_nodes=()) -> TransposedSpec | None:
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if isinstance(padding, str):
        return None
    kernel = tuple(effective_kernel(k, d) for k, d in zip(weight_shape[-2:], dilation))
    extra = tuple(s - 1 if s > d else 0 for s, d in zip(stride, dilation))  # output_padding < max(s, d)
    in_channels, out_per_group = weight_shape[0], weight_shape[1]
    fmas = in_channels * out_per_group * weight_shape[2] * weight_shape[3]

    def apply(window, *consts):
        return run(window, *consts, stride=stride, output_padding=extra, groups=groups, dilation=dilation)

    return TransposedSpec(kernel, stride, padding, apply, fmas, tuple(const_nodes))


def transposed_spec(node: fx.Node, modules: dict[str, nn.Module]) -> TransposedSpec | None:
    """The :class:`TransposedSpec` of a transposed-conv node, or None if it is not one kfx runs locally."""
    if node.op == "call_module":
        m = modules[node.target]
        if not (isinstance(m, nn.ConvTranspose2d) and type(m).forward is nn.ConvTranspose2d.forward):
            return None
        if m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:  # output_size given: dense
            return None
        run = lambda w, stride, output_padding, groups, dilation, m=m: F.conv_transpose2d(
            w, m.weight, m.bias, stride, 0, output_padding, groups, dilation
        )
        return _spec(m.weight.shape, m.stride, m.padding, m.dilation, m.groups, run)
    if node.op != "call_function" or node.target is not F.conv_transpose2d:
        return None
    a = bind_args(
        node,
        ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
        {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
    )
    weight, bias = a["weight"], a["bias"]
    if not isinstance(weight, fx.Node) or "tensor_meta" not in weight.meta:
        return None
    consts = (weight,) + ((bias,) if isinstance(bias, fx.Node) else ())
    if isinstance(bias, fx.Node):
        run = lambda w, wt, b, **kw: F.conv_transpose2d(
            w, wt, b, kw["stride"], 0, kw["output_padding"], kw["groups"], kw["dilation"]
        )
    else:
        run = lambda w, wt, **kw: F.conv_transpose2d(
            w, wt, bias, kw["stride"], 0, kw["output_padding"], kw["groups"], kw["dilation"]
        )
    return _spec(
        weight.meta["tensor_meta"].shape, a["stride"], a["padding"], a["dilation"], a["groups"], run, consts
    )
