"""Which traced op belongs to which layer class (docs/design.md §2.2).

Pure description, no graph surgery: given an fx node, say whether it is point-wise, a merge (add/mul
of spatial tensors, channel concat), a global mean, a shape query, or anything else (global: it runs
densely after a projection to full). Local ops (conv, pool, constant pad) have their own module,
kfx.passes.local. The table at the end of the file is the contents.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as torch_module  # the registry of global module hooks
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from kfx.common import int_tuple
from kfx.errors import TraceError

__all__ = [
    "is_pointwise",
    "is_merge",
    "is_global_mean",
    "bind_args",
    "group_norm_args",
    "runs_own_forward",
    "acts_per_channel",
    "forward_hooks",
    "INPLACE_TO_FUNCTIONAL",
]


def _axes(value, name: str, axes: int) -> tuple[int, ...]:
    """A kernel/stride/padding/dilation argument, one int per spatial axis; else a TraceError."""
    return int_tuple(value, name, axes, TraceError)


def _pair(value, name: str) -> tuple[int, int]:
    return _axes(value, name, 2)


# Set by shape propagation on nodes whose value is not a tensor (kfx.passes.trace.VALUE_KEY).
_VALUE_KEY = "kfx_value"


def static_value(arg):
    """``arg`` with every node that computes a shape-derived value (x.size(2) // 2, x.shape[2:])
    replaced by that value: for a fixed image shape it is a constant, so an op whose kernel size or
    padding was computed from a shape has a static geometry. Other nodes are left as they are."""
    if isinstance(arg, fx.Node):
        return arg.meta[_VALUE_KEY] if _VALUE_KEY in arg.meta and "tensor_meta" not in arg.meta else arg
    if isinstance(arg, (tuple, list)):
        return type(arg)(static_value(a) for a in arg)
    if isinstance(arg, dict):
        return {key: static_value(value) for key, value in arg.items()}
    return arg


def bind_args(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    """Arguments of a call_function/call_method node by parameter name, shape-derived ones resolved."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return {name: value if name == "input" else static_value(value) for name, value in bound.items()}


# ---------------------------------------------------------------------------------------------
# Point-wise ops: the output element at (c, y, x) depends only on the input element at (c, y, x)
# (and on constants that do not vary over space). They run on the changed patch alone.

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

POINTWISE_FUNCTIONS: frozenset = frozenset(
    {
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.selu,
        F.celu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.softplus,
        F.softsign,
        F.sigmoid,
        F.tanh,
        F.logsigmoid,
        F.prelu,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.clamp,
        torch.clip,
        torch.abs,
        torch.neg,
        torch.exp,
        torch.square,
        torch.sqrt,
        torch.rsqrt,
        torch.log,
        torch.sin,
        torch.cos,
        torch.erf,
        operator.neg,
        operator.pos,
        operator.abs,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.pow,
        operator.floordiv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.pow,
        torch.maximum,
        torch.minimum,
        torch.addcmul,
        torch.addcdiv,
    }
)

POINTWISE_METHODS: frozenset = frozenset(
    {
        "relu",
        "sigmoid",
        "tanh",
        "clamp",
        "clip",
        "abs",
        "neg",
        "exp",
        "sqrt",
        "rsqrt",
        "square",
        "add",
        "sub",
        "mul",
        "div",
        "pow",
        "contiguous",
        "maximum",
        "minimum",
        "addcmul",
        "addcdiv",
    }
)

# Binary ops whose two spatial operands may both carry changes: merge nodes (docs/design.md §2.5).
MERGE_FUNCTIONS: frozenset = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.maximum,
        torch.minimum,
        torch.addcmul,  # input + value * t1 * t2, element by element (ConvNeXt-V2's GRN)
        torch.addcdiv,
    }
)
MERGE_METHODS: frozenset = frozenset({"add", "sub", "mul", "div", "maximum", "minimum", "addcmul", "addcdiv"})

# Metadata a model may ask of a tensor (timm asserts ``x.ndim == 4``; others read ``x.dtype`` to
# build constants): answered from the full tensor's shape and the batch's dtype and device, so
# asking never turns the map dense.
SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device", "is_cuda")
SHAPE_METHODS = ("size", "dim", "numel")


# In-place spellings and the functional op each stands for (the trace pass rewrites them so that
# cached base activations can never be overwritten).
INPLACE_TO_FUNCTIONAL: dict = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    F.relu_: F.relu,
    torch.relu_: torch.relu,
    F.elu_: F.elu,
    F.leaky_relu_: F.leaky_relu,
    F.hardtanh_: F.hardtanh,
}


def runs_own_forward(m: nn.Module, classes: tuple[type[nn.Module], ...]) -> bool:
    """``m`` is one of ``classes`` and runs that class's own forward. A subclass kept whole with
    ``leaf_modules=`` may compute anything in its own forward (a convolution may also override
    ``_conv_forward``), so only what torch's class computes is known."""
    own = any(
        type(m).forward is c.forward
        and getattr(type(m), "_conv_forward", None) is getattr(c, "_conv_forward", None)
        for c in classes
    )
    return isinstance(m, classes) and own


# Forward pre-hooks that only recompute a parameter from others before each call (pruning's mask,
# weight normalisation): the module still computes its own op, with the weight the base run set.
_PARAMETER_HOOKS = (BasePruningMethod, WeightNorm, SpectralNorm)


def forward_hooks(m: nn.Module) -> list:
    """The forward hooks and pre-hooks that run when ``m`` is called (its own and the global ones)
    and may change what it computes. A module with any runs densely: its hooks see and may
    change full tensors only there (the incremental steps run the op itself, or on boxes)."""
    global_hooks = torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks
    if not (m._forward_pre_hooks or m._forward_hooks or global_hooks):
        return []  # the common case
    hooks = [
        *m._forward_pre_hooks.values(),
        *m._forward_hooks.values(),
        *torch_module._global_forward_pre_hooks.values(),
        *torch_module._global_forward_hooks.values(),
    ]
    return [hook for hook in hooks if not isinstance(hook, _PARAMETER_HOOKS)]


def is_pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True if the node's op acts element by element on its spatial input (docs/design.md §2.2)."""
    if node.op == "call_module":
        m = modules[node.target]
        if runs_own_forward(m, POINTWISE_MODULES):
            return not (
                m.training
                and isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout))
            )
        if (
            isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            and type(m).forward is nn.BatchNorm2d.forward
        ):
            # Eval-mode BN with running statistics is an affine map per channel; otherwise it
            # normalises with batch statistics, which mixes every position.
            return not m.training and m.track_running_stats and m.running_mean is not None
        return False
    if node.op == "call_function":
        if getattr(node.target, "__name__", "") == "stochastic_depth":  # torchvision.ops, identity in eval
            return not bind_args(node, ("input", "p", "mode", "training"), {"training": True})["training"]
        if node.target is F.dropout:
            return not bind_args(node, ("input", "p", "training"), {"p": 0.5, "training": True})["training"]
        if node.target is F.batch_norm:
            a = bind_args(
                node,
                ("input", "running_mean", "running_var", "weight", "bias", "training"),
                {"weight": None, "bias": None, "training": False},
            )
            return not a["training"] and a["running_mean"] is not None
        return node.target in POINTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in POINTWISE_METHODS or (node.target in ("to", "type_as") and _keeps_dtype(node))
    return False


def _keeps_dtype(node: fx.Node) -> bool:
    """``x.to(...)`` that leaves the dtype as it is (a no-op, or a move to the device x is on)."""
    source, out = (getattr(n, "meta", {}).get("tensor_meta") for n in (node.args[0], node))
    return (
        source is not None and out is not None and getattr(source, "dtype", None) == getattr(out, "dtype", 0)
    )


def per_channel_operands(node: fx.Node) -> list[fx.Node]:
    """The operands a pointwise op applies per channel by definition, though their shape is [C] and
    not [C, 1, 1]: functional BatchNorm's statistics and affine parameters (timm's BatchNormAct2d)."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return []
    bound = bind_args(node, ("input", "running_mean", "running_var", "weight", "bias"), {})
    names = ("running_mean", "running_var", "weight", "bias")
    return [bound[name] for name in names if isinstance(bound.get(name), fx.Node)]


def acts_per_channel(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An element-wise op with one parameter per channel along dim 1 (BatchNorm, a PReLU with one
    weight per channel): element-wise only where dim 1 holds the channels."""
    if node.op == "call_module":
        m = modules[node.target]
        batch_norm = isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        return batch_norm or (isinstance(m, nn.PReLU) and m.num_parameters > 1)
    return node.op == "call_function" and node.target in (F.batch_norm, F.prelu, torch.prelu)


ADAPTIVE_AVG_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
ADAPTIVE_AVG_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


def _to_one(output_size) -> bool:
    """An adaptive pool's output size of 1 along every axis (1, (1,), (1, 1), [1, 1, 1])."""
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    return len(sizes) > 0 and all(size == 1 for size in sizes)


def is_global_mean(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Global average pooling over every spatial axis (output [1, C, 1, ...] or [1, C]): it has an
    exact delta. Its input's rank says which dims are spatial: all but the batch and the channels.
    An adaptive pool must pool exactly those: AdaptiveAvgPool3d of a [1, C, H, W] map reads it as
    one unbatched volume and averages over the channels too."""
    if node.op == "call_module":
        m = modules[node.target]
        if not runs_own_forward(m, ADAPTIVE_AVG_POOL_MODULES):
            return False
        axes = next(a for a, cls in enumerate(ADAPTIVE_AVG_POOL_MODULES, 1) if isinstance(m, cls))
        return _to_one(m.output_size) and _input_rank(node) == axes + 2
    if node.op == "call_function" and node.target in ADAPTIVE_AVG_POOL_FUNCTIONS:
        axes = ADAPTIVE_AVG_POOL_FUNCTIONS.index(node.target) + 1
        output_size = bind_args(node, ("input", "output_size"), {})["output_size"]
        return _to_one(output_size) and _input_rank(node) == axes + 2
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    ):
        a = bind_args(node, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
        dims = a["dim"]
        rank = len(getattr(getattr(a["input"], "meta", {}).get("tensor_meta"), "shape", ()))
        dims = (dims,) if isinstance(dims, int) else dims
        return (
            isinstance(dims, (tuple, list))
            and rank >= 3  # [1, C, *S]: every dim after the channels is spatial
            and sorted(d % rank for d in dims) == list(range(2, rank))
            and "dtype" not in node.kwargs
        )
    return False


def _input_rank(node: fx.Node) -> int:
    """The rank of the node's first operand (0 if it has no traced shape)."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    return len(getattr(getattr(source, "meta", {}).get("tensor_meta"), "shape", ()))


def is_gate_product(node: fx.Node) -> bool:
    """A product of two tensors (``x * g``, ``torch.mul``, ``x.mul(g)``): the shape of a gate."""
    if node.op == "call_function":
        return node.target in (operator.mul, torch.mul)
    return node.op == "call_method" and node.target == "mul"


def is_merge(node: fx.Node) -> bool:
    """True for element-wise binary ops and channel concatenation (merge nodes, docs/design.md §2.5)."""
    if node.op == "call_function":
        if node.target is torch.cat:
            dim = bind_args(node, ("tensors", "dim"), {"dim": 0})["dim"]
            rank = len(getattr(node.meta.get("tensor_meta"), "shape", ()))
            return isinstance(dim, int) and rank >= 3 and dim % rank == 1
        return node.target in MERGE_FUNCTIONS
    if node.op == "call_method":
        return node.target in MERGE_METHODS
    return False


INSTANCE_NORM_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def group_norm_args(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, float, object, object] | None:
    """``(groups, eps, weight, bias)`` of a normalisation with statistics of the whole map per group
    of channels: ``nn.GroupNorm``, ``F.group_norm`` (timm's GroupNormAct) and an instance norm without
    running statistics (one group per channel). Weight and bias are parameters, constant nodes or
    None. None for any other node."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward:
            return m.num_groups, m.eps, m.weight, m.bias
        own_forward = type(m).forward is nn.modules.instancenorm._InstanceNorm.forward
        if isinstance(m, INSTANCE_NORM_MODULES) and own_forward and not m.track_running_stats:
            return m.num_features, m.eps, m.weight, m.bias
        return None
    if node.op == "call_function" and node.target is F.group_norm:
        a = bind_args(
            node,
            ("input", "num_groups", "weight", "bias", "eps"),
            {"weight": None, "bias": None, "eps": 1e-5},
        )
        return a["num_groups"], a["eps"], a["weight"], a["bias"]
    return None
