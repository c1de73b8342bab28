"""What patch propagation records on each node (``node.meta["kfx_patch"]``) and what its rules are
given: the node's state and role, its changed box, and the small questions every rule asks
(kfx.passes.patch_prop holds the rules themselves, docs/design.md §3.3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import fx, nn

from kfx.passes.boxes import AxisBoxes
from kfx.passes.layout import constant_over, spatial_dims
from kfx.passes.local import LocalSpec
from kfx.passes.ops import SHAPE_ATTRIBUTES, SHAPE_METHODS
from kfx.passes.resample import ResampleSpec
from kfx.passes.transposed import TransposedSpec

__all__ = [
    "META_KEY",
    "SHAPE_ROLES",
    "CONCAT_RULES",
    "GLOBAL_CONTEXT_MODES",
    "State",
    "AxisBoxes",
    "NodePatch",
    "ClassifyContext",
    "spatial_size",
    "input_axes",
    "shape_of",
    "broadcasts_over_space",
    "map_spatial",
    "channels_first",
    "dense",
    "describe",
    "is_shape_query",
    "classify_context",
    "changes_first_arg",
]

META_KEY = "kfx_patch"


class State(enum.Enum):
    CONST = "const"  # does not depend on the image (weights, shapes of constants)
    PATCH = "patch"  # differs from the base activation only inside a changed box
    DENSE = "dense"  # recomputed in full for every position


Box = tuple[
    AxisBoxes, ...
]  # one per spatial axis: (height, width) for images, (depth, height, width) for volumes


@dataclass(frozen=True)
class NodePatch:
    """What patch propagation knows about one node."""

    state: State
    role: (
        str  # const | input | pointwise | gate | norm | local | resample | merge | channel | mean_delta
        # | shape | shape_arith | dense
    )
    box: Box | None = None  # changed box (PATCH nodes)
    read: Box | None = None  # read-in window (local and resample nodes)
    local: LocalSpec | None = None
    resample: ResampleSpec | None = None
    transposed: TransposedSpec | None = None
    spatial: tuple[int, ...] | None = None  # the spatial dims of a channels-last map; None: the last ones
    batch_free: bool = False  # shape roles: the value does not involve the batch size (x.dtype, x.shape[1])
    reason: str = ""  # dense nodes fed by incremental ones: why the incremental path stops here


def spatial_size(node: fx.Node, axes: int = 2) -> tuple[int, ...] | None:
    """The spatial size of a node whose value is a single-input map [1, C, *S] with ``axes``
    spatial axes ((H, W) for images, (L,) for signals, (D, H, W) for volumes), else None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != axes + 2 or shape[0] != 1:
        return None
    return tuple(int(v) for v in shape[2:])


def input_axes(gm: fx.GraphModule) -> int:
    """How many spatial axes the annotated graph's input has (the length of its changed box)."""
    return next(len(n.meta[META_KEY].box) for n in gm.graph.nodes if n.op == "placeholder")


def shape_of(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(getattr(meta, "shape", ())) if meta is not None and hasattr(meta, "shape") else None


def broadcasts_over_space(node: fx.Node, axes: int) -> bool:
    """A constant operand that is the same at every spatial position of a [1, C, *S] map (e.g. a
    [C, 1, 1] scale): kfx.passes.layout's rule, for the usual layout."""
    shape = shape_of(node)
    return shape is not None and constant_over(shape, tuple(range(2, axes + 2)), axes + 2)


def map_spatial(node: fx.Node, axes: int) -> tuple[int, ...] | None:
    """The spatial dims of a changed map [1, *channel dims, *S] (or channels-last [1, H, W, C]), in
    its own layout; None if the node's value is not such a map."""
    shape = shape_of(node)
    if shape is None or len(shape) < axes + 2 or shape[0] != 1:
        return None
    return spatial_dims(node.meta[META_KEY].spatial, len(shape), axes)


def channels_first(node: fx.Node) -> bool:
    return node.meta[META_KEY].spatial is None


def dense(reason: str = "") -> NodePatch:
    return NodePatch(State.DENSE, "dense", reason=reason)


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f".{node.target}()"


def is_shape_query(node: fx.Node) -> bool:
    """A question about a tensor's metadata (x.size(), x.shape, x.ndim, x.dtype, ...), never its values."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRIBUTES


SHAPE_ROLES = ("shape", "shape_arith")

CONCAT_RULES = ("union", "last")
GLOBAL_CONTEXT_MODES = ("exact", "local")


@dataclass(frozen=True)
class ClassifyContext:
    """What a classification rule knows besides the node: the pass's options, and the node's operands
    sorted by state (the graph is walked in order, so every operand is classified already)."""

    modules: dict[str, nn.Module]
    tau: float
    concat: str
    global_context: str  # one of GLOBAL_CONTEXT_MODES
    axes: int  # spatial axes of the model's input (and of every map kfx tracks)
    inputs: list[fx.Node]  # every node this one reads
    data: list[fx.Node]  # the inputs that are data: values derived from x.size() are metadata
    states: frozenset[State]  # the states of the data inputs
    changed: list[fx.Node]  # the data inputs that are PATCH
    others: list[fx.Node]  # the data inputs that are CONST


def classify_context(
    node: fx.Node, modules: dict[str, nn.Module], tau: float, concat: str, global_context: str, axes: int
) -> ClassifyContext:
    inputs = node.all_input_nodes
    data = [n for n in inputs if n.meta[META_KEY].role not in SHAPE_ROLES]
    return ClassifyContext(
        modules=modules,
        tau=tau,
        concat=concat,
        global_context=global_context,
        axes=axes,
        inputs=inputs,
        data=data,
        states=frozenset(n.meta[META_KEY].state for n in data),
        changed=[n for n in data if n.meta[META_KEY].state is State.PATCH],
        others=[n for n in data if n.meta[META_KEY].state is State.CONST],
    )


def changes_first_arg(node: fx.Node, ctx: ClassifyContext) -> bool:
    """The node's first argument is its one changed operand (the map a unary op transforms)."""
    return len(ctx.changed) == 1 and bool(node.args) and node.args[0] is ctx.changed[0]
