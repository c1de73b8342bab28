"""Where a changed map's spatial dims are: ops that move channels only (shuffles, splits, slices),
permutes to channels-last and back, and the per-position layer ops that may run there
(docs/design.md §2.2, §2.9).

ConvNeXt-style blocks permute NCHW to NHWC (or NCL to NLC, NCDHW to NDHWC; by ``permute``,
``transpose`` or ``.mT``), normalise over channels (``LayerNorm``), apply ``Linear`` layers to the
channel dim, and permute back. Each of those ops acts on one spatial position at a time, so the
changed box stays where it is; only the dims that hold the spatial axes move. A node's ``spatial``
is that tuple of dims in its own tensor; ``None`` means the usual last ones.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from kfx.passes.ops import bind_args

__all__ = [
    "channel_op_kind",
    "spatial_dims",
    "permuted_spatial",
    "acting_dims",
    "layer_operands",
    "constant_over",
    "reduction",
]

PERMUTE_FUNCTIONS = (torch.permute,)
TRANSPOSE_FUNCTIONS = (torch.transpose, torch.swapaxes, torch.swapdims)
TRANSPOSE_METHODS = ("transpose", "swapaxes", "swapdims")
_TRANSPOSE_KEYWORDS = ("dim0", "dim1", "axis0", "axis1")  # transpose/swapdims, swapaxes


def spatial_dims(spatial: tuple[int, ...] | None, rank: int, axes: int = 2) -> tuple[int, ...]:
    """The spatial dims of a rank-``rank`` map with ``axes`` spatial axes whose layout is
    ``spatial`` (None: the last ``axes`` dims, the usual channels-first layout)."""
    return tuple(range(rank - axes, rank)) if spatial is None else spatial


def _permutation(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The dims of a permute, or of a transpose of two dims (``transpose``/``swapaxes``/``.mT``), as
    one permutation of ``range(rank)``; None for any other node or non-constant dims."""
    if node.op == "call_method" and node.target == "permute":
        args = node.args[1:]
        dims = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
    elif node.op == "call_function" and node.target in PERMUTE_FUNCTIONS:
        dims = tuple(node.args[1] if len(node.args) > 1 else node.kwargs.get("dims", ()))
    elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        dims = (*range(rank - 2), rank - 1, rank - 2)
    else:
        transposes = (node.op == "call_method" and node.target in TRANSPOSE_METHODS) or (
            node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS
        )
        if not transposes:
            return None
        pair = (*node.args[1:], *(node.kwargs[k] for k in _TRANSPOSE_KEYWORDS if k in node.kwargs))
        if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
            return None
        a, b = (d % rank for d in pair)
        dims = list(range(rank))
        dims[a], dims[b] = b, a
        dims = tuple(dims)
    if len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    dims = tuple(d % rank for d in dims)
    return dims if sorted(dims) == list(range(rank)) else None


def permuted_spatial(node: fx.Node, spatial: tuple[int, ...] | None, rank: int, axes: int = 2):
    """For a permute or transpose that keeps the batch dim first: the dims that now hold the
    ``axes`` spatial axes (in order), or None for the usual last ones. ``False`` if the node is not
    such a permute."""
    dims = _permutation(node, rank)
    if dims is None or dims[0] != 0:
        return False
    moved = tuple(dims.index(d) for d in spatial_dims(spatial, rank, axes))
    return None if moved == tuple(range(rank - axes, rank)) else moved


def acting_dims(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, ...] | None:
    """The trailing dims a per-position layer op mixes (``Linear``: the last; ``LayerNorm``: its
    normalised dims), as negative indices; None for any other op."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            return (-1,)
        if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
            return tuple(range(-len(module.normalized_shape), 0))
        return None
    if node.op != "call_function":
        return None
    if node.target is F.linear:
        return (-1,)
    if node.target is F.layer_norm:
        shape = bind_args(node, ("input", "normalized_shape"), {})["normalized_shape"]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return tuple(range(-len(shape), 0))
    return None


def layer_operands(node: fx.Node) -> list[fx.Node]:
    """The weight and bias a functional ``linear``/``layer_norm`` applies along its acting dims."""
    if node.op != "call_function" or node.target not in (F.linear, F.layer_norm):
        return []
    names = (
        ("input", "weight", "bias")
        if node.target is F.linear
        else ("input", "normalized_shape", "weight", "bias")
    )
    bound = bind_args(node, names, {})
    return [bound[name] for name in ("weight", "bias") if isinstance(bound.get(name), fx.Node)]


def constant_over(shape: tuple[int, ...], dims: tuple[int, ...], rank: int) -> bool:
    """True if a tensor of ``shape``, broadcast against a rank-``rank`` map, is the same along
    every dim in ``dims`` (size 1 there, or no such dim after right-alignment)."""
    return all(shape[len(shape) - (rank - d)] == 1 for d in dims if rank - d <= len(shape))


_CHANNEL_METHODS = {
    "view": "reshape",
    "reshape": "reshape",
    "transpose": "transpose",
    "chunk": "split",
    "split": "split",
}
_CHANNEL_FUNCTIONS = {
    torch.reshape: "reshape",
    torch.transpose: "transpose",
    torch.chunk: "split",
    torch.split: "split",
}


def _is_channel_slice(index, source: tuple | None, out: tuple | None, axes: int) -> bool:
    """``x[:, a:b]`` (or ``x[:, a:b, :, :]``) of a [1, C, ..., *S] map: slices of the channel dims,
    the batch and the ``axes`` spatial dims taken whole (GhostNet, ReXNet, DPN)."""
    items = index if isinstance(index, tuple) else (index,)
    if source is None or out is None or len(source) < axes + 2 or len(items) > len(source):
        return False
    whole = slice(None)
    spatial = [i for i in range(len(items)) if i >= len(source) - axes]
    return (
        all(isinstance(item, slice) for item in items)
        and items[0] == whole
        and all(items[i] == whole for i in spatial)
        and out[-axes:] == source[-axes:]
        and len(out) == len(source)
    )


def channel_op_kind(
    node: fx.Node, src: tuple | None, out: tuple | None, piece_of_split: bool, axes: int = 2
) -> str | None:
    """The kind of a reshape/transpose/chunk/split/slice that moves channels only, keeping the last
    ``axes`` (spatial) dims where they are (channel shuffle, branch splits), or None. ``src`` and
    ``out`` are the shapes of the node's first operand and of the node (None if not tensors);
    ``piece_of_split``: the operand is the tuple a channel split made. (Permutes: any that keeps
    the batch dim first, :func:`permuted_spatial`.)"""
    if node.op == "call_function" and node.target is operator.getitem:
        if piece_of_split:
            return "getitem"  # one piece of a split
        return "slice" if _is_channel_slice(node.args[1], src, out, axes) else None
    kind = (
        _CHANNEL_METHODS.get(node.target)
        if node.op == "call_method"
        else _CHANNEL_FUNCTIONS.get(node.target)
        if node.op == "call_function"
        else None
    )
    if kind is None or src is None or len(src) < axes + 2 or src[0] != 1:
        return None
    rank = len(src)
    inner = lambda d: isinstance(d, int) and 1 <= d % rank <= rank - axes - 1  # neither batch nor spatial
    args = node.args[1:]
    if kind == "reshape":
        keeps_space = out is not None and len(out) >= axes + 1 and out[-axes:] == src[-axes:]
        return kind if keeps_space and out[0] == 1 else None
    if kind == "transpose":
        return kind if len(args) == 2 and all(inner(d) for d in args) else None
    dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
    only_getitem = all(u.op == "call_function" and u.target is operator.getitem for u in node.users)
    return kind if inner(dim) and only_getitem else None


# Reductions along given dims, method and function spellings: a sum, mean, max or min over the
# channels (ResNeSt's radix sum, CBAM's channel pooling) or a softmax across them acts on each
# spatial position alone; an L2 norm over the spatial dims (ConvNeXt-V2's GRN) is a global statistic.
_REDUCTIONS = {
    "sum": "sum",
    "mean": "mean",
    "amax": "max",
    "amin": "min",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "norm": "norm",
}
_REDUCTION_FUNCTIONS = {
    torch.sum: "sum",
    torch.mean: "mean",
    torch.amax: "max",
    torch.amin: "min",
    torch.softmax: "softmax",
    torch.log_softmax: "softmax",
    F.softmax: "softmax",
    F.log_softmax: "softmax",
    torch.norm: "norm",
}


def reduction(node: fx.Node) -> tuple[str, tuple[int, ...], bool] | None:
    """``(kind, dims, keepdim)`` of a reduction over explicit dims of its first operand (kind: sum,
    mean, max, min, softmax (keeps the shape) or norm (the L2 norm only)), dims made non-negative;
    None for anything else, or a reduction over every dim, or one that casts."""
    if node.op == "call_method":
        kind = _REDUCTIONS.get(node.target)
    elif node.op == "call_function":
        kind = _REDUCTION_FUNCTIONS.get(node.target)
    else:
        kind = None
    shape = getattr(
        getattr(node.args[0], "meta", {}).get("tensor_meta") if node.args else None, "shape", None
    )
    if kind is None or shape is None or "dtype" in node.kwargs:
        return None
    names = {"norm": ("input", "p", "dim", "keepdim"), "softmax": ("input", "dim")}.get(
        kind, ("input", "dim", "keepdim")
    )
    bound = bind_args(node, names, {"p": "fro", "dim": None, "keepdim": False})
    if kind == "norm" and bound["p"] not in (2, 2.0, "fro"):
        return None
    dims = bound["dim"]
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    positional = 3 if node.target in (F.softmax, F.log_softmax) else len(names)  # F's _stacklevel
    if any(a is not None for a in node.args[positional:]):
        return None  # a dtype passed positionally
    rank = len(shape)
    keepdim = bound["keepdim"] is True or kind == "softmax"
    return kind, tuple(sorted(d % rank for d in dims)), keepdim
