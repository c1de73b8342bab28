"""Local ops (docs/design.md §2.2-2.4): convs, pools and constant pads in their 1-d, 2-d and 3-d
forms, reduced to a :class:`LocalSpec` that says how to run the op with no padding on a read-in
window. Pure description, like kfx.passes.ops (the rest of the op taxonomy): no graph surgery.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from kfx.geometry import conv_fmas, effective_kernel, same_padding
from kfx.kernels.pooling import MAX_POOL_FUNCTIONS, avg_pool, window_max, window_sum
from kfx.passes.ops import _axes, bind_args, runs_own_forward

__all__ = ["LocalSpec", "local_spec"]


@dataclass(frozen=True)
class LocalSpec:
    """A local-context op reduced to what the incremental step needs.

    ``apply(window, *consts)`` runs the op with no padding on a read-in window; ``consts`` are the
    runtime values of ``const_nodes`` (weights of a functional conv). ``kernel`` is the effective
    (dilated) extent; ``padding`` the padding before each axis; ``pad_value`` what the op's padding
    holds (0 for conv and avg-pool, -inf for max-pool). ``divisor`` (avg-pool only) maps each output
    element to its divisor, so windows can be summed and divided exactly as the full op does.
    """

    kind: str  # "conv" | "max_pool" | "avg_pool" | "pad" | "space_to_depth"
    kernel: tuple[int, ...]  # one entry per spatial axis (1, 2 or 3 of them)
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    pad_value: float
    apply: Callable[..., torch.Tensor]
    const_nodes: tuple[fx.Node, ...] = ()
    divisor: torch.Tensor | None = None
    fmas_per_output: int = 0  # conv only: C_in/groups * prod(kernel) * C_out, the FMAs of one output pixel
    conv_args: tuple | None = None  # conv only: (stride, dilation, groups), for fused conv kernels


# The N-d forms of each local op, by number of spatial axes.
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_TORCH_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_TORCH_MAX_POOL = {torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3}


def _same_padding(kernel_eff: tuple[int, ...]) -> tuple[int, ...]:
    # PyTorch's padding="same" puts total//2 before each axis and the rest after.
    return tuple((k - 1) // 2 for k in kernel_eff)


def _conv_spec(
    weight_shape, bias, stride, padding, dilation, groups, apply, const_nodes=()
) -> LocalSpec | None:
    c_out, c_in_per_group, *kernel_size = weight_shape
    axes = len(kernel_size)
    dilation = _axes(dilation, "dilation", axes)
    kernel = tuple(effective_kernel(k, d) for k, d in zip(kernel_size, dilation))
    if isinstance(padding, str):
        padding = (0,) * axes if padding == "valid" else _same_padding(kernel)
    return LocalSpec(
        kind="conv",
        kernel=kernel,
        stride=_axes(stride, "stride", axes),
        padding=_axes(padding, "padding", axes),
        pad_value=0.0,
        apply=apply,
        const_nodes=const_nodes,
        conv_args=(_axes(stride, "stride", axes), dilation, groups),
        fmas_per_output=conv_fmas(c_in_per_group * groups, c_out, groups, math.prod(kernel_size), 1, 1, 1),
    )


def _avg_divisor(
    in_hw, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
) -> torch.Tensor:
    """Divisor of every output element of an avg-pool, computed once from the geometry alone."""
    ones = torch.ones(1, 1, *in_hw, dtype=torch.float64)
    sums = avg_pool(ones, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override=1)
    if divisor_override:
        return torch.full_like(sums[0, 0], float(divisor_override))
    means = avg_pool(ones, kernel, stride, padding, ceil_mode, count_include_pad)
    return torch.round(sums / means)[0, 0]


def _pool_spec(kind, kernel_size, stride, padding, dilation, ceil_mode, in_hw, avg_flags=None) -> LocalSpec:
    axes = len(in_hw)
    k = _axes(kernel_size, "kernel_size", axes)
    s = _axes(stride if stride not in (None, ()) else kernel_size, "stride", axes)
    p = _axes(padding, "padding", axes)
    if kind == "max_pool":
        d = _axes(dilation, "dilation", axes)
        kernel = tuple(effective_kernel(size, dil) for size, dil in zip(k, d))
        apply = lambda w: window_max(w, k, s, d)
        return LocalSpec("max_pool", kernel, s, p, -math.inf, apply)
    count_include_pad, divisor_override = avg_flags
    divisor = _avg_divisor(in_hw, k, s, p, ceil_mode, count_include_pad, divisor_override)
    first = divisor.reshape(-1)[0]
    if bool((divisor == first).all()):
        # One divisor everywhere (Inception's 3x3 pools with count_include_pad): the op divides each
        # window sum by it in one pass, as the full op does; no per-element divisor to gather.
        uniform = int(first)
        apply = lambda w: window_sum(w, k, s) / uniform
        return LocalSpec("avg_pool", k, s, p, 0.0, apply)
    # Sum each window, then divide by the full op's own divisor for that output element.
    apply = lambda w: window_sum(w, k, s)
    return LocalSpec("avg_pool", k, s, p, 0.0, apply, divisor=divisor)


def _pad_spec(pads, value, axes: int) -> LocalSpec | None:
    # Constant padding shifts coordinates by the padding before each axis: a 1x1 "kernel" with that
    # padding (negative padding crops). It runs as the identity on its read-in window. ``pads``
    # are in F.pad's order, the last axis first: (left, right, top, bottom, front, back).
    if len(pads) != 2 * axes:
        return None
    before = tuple(pads[2 * (axes - 1 - axis)] for axis in range(axes))
    return LocalSpec("pad", (1,) * axes, (1,) * axes, before, float(value or 0.0), lambda w: w)


def local_spec(
    node: fx.Node, modules: dict[str, nn.Module], in_hw: tuple[int, ...] | None
) -> LocalSpec | None:
    """The :class:`LocalSpec` of a conv/pool/pad node over ``len(in_hw)`` spatial axes (1, 2 or 3),
    or None if it is not one kfx runs locally."""
    if in_hw is None:
        return None
    axes = len(in_hw)
    if node.op == "call_module":
        return _module_spec(modules[node.target], in_hw)
    if node.op != "call_function":
        return None
    if node.target in (CONV_FUNCTIONS.get(axes), _conv_axes(node.target, axes)):
        a = bind_args(
            node,
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        )
        weight, bias = a["weight"], a["bias"]
        if not isinstance(weight, fx.Node) or "tensor_meta" not in weight.meta:
            return None
        const_nodes = (weight,) + ((bias,) if isinstance(bias, fx.Node) else ())
        if len(weight.meta["tensor_meta"].shape) != axes + 2:
            return None
        stride, dilation, groups = a["stride"], a["dilation"], a["groups"]
        conv = CONV_FUNCTIONS[axes]
        if isinstance(bias, fx.Node):
            apply = lambda w, wt, b: conv(w, wt, b, stride, 0, dilation, groups)
        else:
            apply = lambda w, wt: conv(w, wt, bias, stride, 0, dilation, groups)
        return _conv_spec(
            weight.meta["tensor_meta"].shape, bias, stride, a["padding"], dilation, groups, apply, const_nodes
        )
    if node.target is MAX_POOL_FUNCTIONS.get(axes) or _TORCH_MAX_POOL.get(node.target) == axes:
        a = bind_args(
            node,
            ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False},
        )
        if a["return_indices"]:
            return None
        return _pool_spec(
            "max_pool", a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], in_hw
        )
    if node.target is {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}.get(axes):
        a = bind_args(
            node,
            (
                "input",
                "kernel_size",
                "stride",
                "padding",
                "ceil_mode",
                "count_include_pad",
                "divisor_override",
            ),
            {
                "stride": None,
                "padding": 0,
                "ceil_mode": False,
                "count_include_pad": True,
                "divisor_override": None,
            },
        )
        flags = (a["count_include_pad"], a["divisor_override"])
        return _pool_spec(
            "avg_pool", a["kernel_size"], a["stride"], a["padding"], 1, a["ceil_mode"], in_hw, flags
        )
    if node.target is F.pad:
        a = bind_args(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
        if a["mode"] != "constant" or not all(isinstance(v, int) for v in a["pad"]):
            return None
        return _pad_spec(tuple(a["pad"]), a["value"], axes)
    if _is_same_pad(node.target):
        a = bind_args(
            node, ("input", "kernel_size", "stride", "dilation", "value"), {"dilation": 1, "value": 0}
        )
        kernel, stride, dilation = (
            _axes(a[name], name, axes) for name in ("kernel_size", "stride", "dilation")
        )
        per_axis = [same_padding(in_hw[i], kernel[i], stride[i], dilation[i]) for i in range(axes)]
        return _pad_spec(tuple(m for pair in reversed(per_axis) for m in pair), a["value"], axes)
    return None


def _conv_axes(target, axes: int):
    """``target`` if it is torch's own conv over ``axes`` spatial axes (torch.conv2d, ...), else None."""
    return target if _TORCH_CONV.get(target) == axes else None


def _module_spec(m: nn.Module, in_hw: tuple[int, ...]) -> LocalSpec | None:
    """The :class:`LocalSpec` of a conv/pool/pad module over ``len(in_hw)`` spatial axes."""
    axes = len(in_hw)
    if runs_own_forward(m, CONV_MODULES) and m.weight.dim() == axes + 2:
        if m.padding_mode != "zeros":
            return None
        conv = CONV_FUNCTIONS[axes]
        apply = lambda w, m=m: conv(w, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
        return _conv_spec(m.weight.shape, m.bias, m.stride, m.padding, m.dilation, m.groups, apply)
    if runs_own_forward(m, MAX_POOL_MODULES) and _pool_axes(m) == axes and not m.return_indices:
        return _pool_spec("max_pool", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, in_hw)
    if runs_own_forward(m, AVG_POOL_MODULES) and _pool_axes(m) == axes:
        flags = (m.count_include_pad, getattr(m, "divisor_override", None))
        return _pool_spec("avg_pool", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, in_hw, flags)
    if runs_own_forward(m, PAD_MODULES) and _pool_axes(m) == axes:
        return _pad_spec(tuple(m.padding), m.value, axes)
    block = _space_to_depth_block(m)
    if block and axes == 2:
        # Each output cell is one block x block tile of the input, stacked as channels: a local op
        # with kernel = stride = block and no padding, run on each aligned window by the module.
        return LocalSpec("space_to_depth", (block,) * 2, (block,) * 2, (0, 0), 0.0, lambda w, m=m: m(w))
    return None


def _space_to_depth_block(m: nn.Module) -> int:
    """The block size of a space-to-depth module (``nn.PixelUnshuffle``, timm's ``SpaceToDepth``,
    which kfx.passes.trace keeps as one call), else 0."""
    if type(m) is nn.PixelUnshuffle:
        return m.downscale_factor
    if type(m).__module__ == "timm.layers.space_to_depth" and type(m).__name__ == "SpaceToDepth":
        return m.bs
    return 0


def _pool_axes(m: nn.Module) -> int:
    """How many spatial axes a pool or pad module acts on (from its class: MaxPool3d -> 3)."""
    for classes in (MAX_POOL_MODULES, AVG_POOL_MODULES, PAD_MODULES[:3], PAD_MODULES[3:]):
        for axes, cls in enumerate(classes, start=1):
            if isinstance(m, cls):
                return axes
    return 0


def _is_same_pad(target) -> bool:
    """timm's ``pad_same(x, kernel_size, stride, dilation, value)``: TF "SAME" padding from the size."""
    return (
        getattr(target, "__module__", None) == "timm.layers.padding"
        and getattr(target, "__name__", "") == "pad_same"
    )
