"""Transposed convolutions (``nn.ConvTranspose2d``, ``F.conv_transpose2d``) as local ops
(docs/design.md §2.10).

Input i of a transposed conv reaches outputs i * s - p + j * d: a change spreads over a box of
outputs (kfx.geometry.transposed_conv_output_span) that a window of inputs recomputes
(transposed_conv_read_span). The step runs the op with no padding on each position's window and
crops the box out of the result; the op's padding only crops its output, so nothing is read
outside the map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from kfx.geometry import effective_kernel
from kfx.passes.ops import _axes, bind_args  # kfx.passes.ops' argument reading

__all__ = ["TransposedSpec", "transposed_spec"]

TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class TransposedSpec:
    """A transposed conv reduced to what the incremental step needs. ``apply(window, *consts)`` runs
    it with no padding and ``stride - 1`` extra output rows and columns (output_padding), so a
    window's result covers every output its inputs reach; ``consts`` are the runtime values of
    ``const_nodes`` (weight and bias of the functional form)."""

    kernel: tuple[int, ...]  # effective (dilated) extent, one per spatial axis
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    apply: Callable
    fmas_per_input: int  # C_in * C_out/groups * prod(kernel): one input pixel's FMAs (the cost model's unit)
    const_nodes: tuple[fx.Node, ...] = ()


def _spec(weight_shape, stride, padding, dilation, groups, run, const_nodes=()) -> TransposedSpec | None:
    if isinstance(padding, str):
        return None
    axes = len(weight_shape) - 2
    stride, padding, dilation = (
        _axes(stride, "stride", axes),
        _axes(padding, "padding", axes),
        _axes(dilation, "dilation", axes),
    )
    kernel = tuple(effective_kernel(k, d) for k, d in zip(weight_shape[2:], dilation))
    extra = tuple(s - 1 if s > d else 0 for s, d in zip(stride, dilation))  # output_padding < max(s, d)
    fmas = math.prod(weight_shape)  # C_in * C_out/groups * prod(kernel)

    def apply(window, *consts):
        return run(window, *consts, stride=stride, output_padding=extra, groups=groups, dilation=dilation)

    return TransposedSpec(kernel, stride, padding, apply, fmas, tuple(const_nodes))


def transposed_spec(node: fx.Node, modules: dict[str, nn.Module]) -> TransposedSpec | None:
    """The :class:`TransposedSpec` of a transposed-conv node, or None if it is not one kfx runs locally."""
    if node.op == "call_module":
        m = modules[node.target]
        if not (
            isinstance(m, TRANSPOSED_MODULES)
            and any(type(m).forward is c.forward for c in TRANSPOSED_MODULES)
        ):
            return None
        if m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:  # output_size given: dense
            return None
        function = TRANSPOSED_FUNCTIONS[m.weight.dim() - 2]
        run = lambda w, stride, output_padding, groups, dilation, m=m: function(
            w, m.weight, m.bias, stride, 0, output_padding, groups, dilation
        )
        return _spec(m.weight.shape, m.stride, m.padding, m.dilation, m.groups, run)
    if node.op != "call_function" or node.target not in TRANSPOSED_FUNCTIONS.values():
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
    function = node.target
    if isinstance(bias, fx.Node):
        run = lambda w, wt, b, **kw: function(
            w, wt, b, kw["stride"], 0, kw["output_padding"], kw["groups"], kw["dilation"]
        )
    else:
        run = lambda w, wt, **kw: function(
            w, wt, bias, kw["stride"], 0, kw["output_padding"], kw["groups"], kw["dilation"]
        )
    return _spec(
        weight.meta["tensor_meta"].shape, a["stride"], a["padding"], a["dilation"], a["groups"], run, consts
    )
