"""Pass 3: rewrite the annotated graph into the incremental program.

Requires: ``node.meta["kfx_patch"]`` on every node (kfx.passes.patch_prop).
Ensures: a GraphModule ``program(positions, *bases)`` that returns the model's outputs for the
occluded images at ``positions`` [N, 2]; ``bases`` are the unoccluded image's activations, prepared
as :class:`BaseSlot` says (padded once per image). Incremental nodes carry a :class:`Patches`
(changed values + where they sit); a projection to full is inserted before the first node that
runs densely. The steps (kfx.passes.steps) only place data; what each computes lives in kfx.kernels.

Each node becomes one step, chosen by the first matching rule of ``STEP_RULES`` (the table at the
end of the file): input -> InputStep, shape -> ShapeStep, mean_delta -> MeanDeltaStep,
shape_arith, const and dense -> the original op copied, channel -> ChannelStep, pointwise ->
PointwiseStep, local -> LocalStep, resample -> ResampleStep, merge -> MergeStep; a PATCH value read by a dense node or the
output -> ProjectStep. ``build_base_program`` builds the base program beside it: the model plus
the base activations the incremental program reads.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from kfx import kernels
from kfx.errors import TraceError
from kfx.geometry import read_in_span
from kfx.passes.layout import reduction
from kfx.passes.local import local_spec
from kfx.passes.ops import group_norm_args
from kfx.passes.patch_prop import META_KEY, NodePatch, State, spatial_size
from kfx.passes.slots import BaseSlot, composed_slots, shared_slots, unpadded
from kfx.passes.steps import (
    ChannelStep,
    CoveredLocalStep,
    DensePoolStep,
    GroupNormStep,
    InputStep,
    LocalStep,
    MeanDeltaStep,
    MergeStep,
    Patches,
    PointwiseStep,
    ProjectStep,
    ResampleStep,
    ShapeStep,
    TransposedStep,
    always_inside,
    call_target,
)

__all__ = [
    "Patches",
    "BaseSlot",
    "Program",
    "Step",
    "RewriteContext",
    "STEP_RULES",
    "build_program",
    "build_base_program",
]


@dataclass
class Program:
    module: fx.GraphModule
    slots: list[BaseSlot]


def _meta(node: fx.Node) -> NodePatch:
    return node.meta[META_KEY]


def _local_margins(meta: NodePatch, in_size: tuple[int, ...]) -> tuple[int, ...]:
    """How far the read-in windows overhang the input, (before, after) per axis."""
    margins = []
    for read, size in zip(meta.read, in_size):
        margins += [max(0, -min(read.starts)), max(0, max(read.starts) + read.width - size)]
    return tuple(margins) if any(margins) else ()  # no overhang: the same slot as the base as it is


def _windowed_inputs(node: fx.Node) -> list[fx.Node]:
    """Operands of a merge that vary over space and so are read through windows."""
    axes = len(_meta(node).box)
    size = spatial_size(node, axes)
    return [n for n in node.all_input_nodes if spatial_size(n, axes) == size]


def _changed_inputs(node: fx.Node) -> tuple[BaseSlot, ...]:
    """The base activations of the node's incremental operands, which it needs projected to full."""
    return tuple(unpadded(n) for n in node.all_input_nodes if _meta(n).state is State.PATCH)


class RewriteContext:
    """The program being built, shared by the step rules: the new graph, its base-activation
    placeholders, and the value each original node has in it so far (``env``)."""

    def __init__(self, gm: fx.GraphModule, fill, size: tuple[int, ...], backend: str, dtype, device):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.fill, self.size, self.backend = fill, size, backend
        self.device, self.dtype = device, dtype
        self.graph = fx.Graph()
        self.positions = self.graph.placeholder("positions")
        self.bases: dict[BaseSlot, fx.Node] = {}
        self.shared: dict[BaseSlot, BaseSlot] = {}  # an unpadded slot -> the padded copy serving it
        self.composed: dict[BaseSlot, tuple[BaseSlot, ...]] = {}  # a concat's slot -> its pieces' slots
        self.env: dict[fx.Node, fx.Node] = {}
        self._projected: dict[fx.Node, fx.Node] = {}

    def pieces(self, slot: BaseSlot) -> tuple[BaseSlot, ...]:
        """The slots whose windows, stacked along channels, are ``slot``'s (itself, or a concat's pieces)."""
        return self.composed.get(slot, (slot,))

    def add_base(self, slot: BaseSlot) -> None:
        for piece in self.pieces(slot):
            piece = self.shared.get(piece, piece)
            if piece not in self.bases:
                self.bases[piece] = self.graph.placeholder(f"base_{len(self.bases)}")

    def base(self, slot: BaseSlot) -> fx.Node | tuple[fx.Node, ...]:
        """The placeholder that holds ``slot``'s base activation (a shared padded copy, maybe), or
        for a concat read as its pieces (passes/slots.py) a tuple of theirs."""
        if slot in self.composed:
            return tuple(self.base(piece) for piece in self.composed[slot])
        return self.bases[self.shared.get(slot, slot)]

    def base_offset(self, slot: BaseSlot) -> tuple[int, ...]:
        """Where ``slot``'s value starts in the tensor :meth:`base` holds, per axis."""
        shared = self.shared.get(slot)
        return () if shared is None else shared.margins[0::2]

    def add_step(self, name: str, step: nn.Module, args, kwargs=None) -> fx.Node:
        qualified = f"kfx_{name}"
        self.gm.add_submodule(qualified, step)
        return self.graph.call_module(qualified, args, kwargs or {})

    def dense_value(self, n: fx.Node) -> fx.Node:
        """``n``'s value in full: an incremental one is projected (once, at its first dense use)."""
        if _meta(n).state is not State.PATCH:
            return self.env[n]
        if n not in self._projected:
            step = ProjectStep(self.backend, _meta(n).spatial)
            self._projected[n] = self.add_step(
                f"project_{n.name}", step, (self.bases[unpadded(n)], self.env[n])
            )
        return self._projected[n]

    def mapped(self, node: fx.Node) -> tuple[tuple, dict]:
        """The node's (args, kwargs) with every node replaced by its value in the program."""
        return fx.node.map_arg((node.args, node.kwargs), self.env.__getitem__)


@dataclass(frozen=True)
class Step:
    """What a rewrite rule makes of one node: the base activations it reads (placeholders of the
    program, made before any step), and ``emit(ctx, *bases)``, which adds the node's value to the
    program given those placeholders and returns it. Steps that project their operands to full
    reach the bases through ``ctx.dense_value``, which projects each value once for all its users."""

    reads: tuple[BaseSlot, ...]
    emit: Callable[..., fx.Node]
    # the step reads its bases only through window origins, so a padded copy of the same value
    # serves it at an offset (RewriteContext.base_offset)
    reads_at_offset: bool = False


# -- rewrite rules: rule(node) -> Step, or None if the rule does not apply --------------------------


def input_step(node: fx.Node) -> Step | None:
    """The image: InputStep turns each position into the patch's content placed there (it reads
    the unoccluded image, from which a position-dependent fill computes the content)."""
    if node.op != "placeholder":
        return None

    def emit(ctx: RewriteContext, image: fx.Node) -> fx.Node:
        return ctx.add_step(f"input_{node.name}", InputStep(ctx.fill, ctx.size), (ctx.positions, image))

    return Step((unpadded(node),), emit)


def graph_output(node: fx.Node) -> Step | None:
    """The model's outputs, in full: incremental ones are projected (docs/design.md §2.6)."""
    if node.op != "output":
        return None
    return Step(
        _changed_inputs(node),
        lambda ctx, *_: ctx.graph.output(fx.node.map_arg(node.args[0], ctx.dense_value)),
    )


def shape_step(node: fx.Node) -> Step | None:
    """x.size(), x.shape, x.ndim, x.dtype, ... of an incremental value: ShapeStep answers from the
    full shape (with the batch of positions); size(dim) keeps its dim argument."""
    if _meta(node).role != "shape":
        return None

    def emit(ctx: RewriteContext) -> fx.Node:
        source = node.args[0]
        attribute = node.op == "call_function"  # getattr(x, "ndim"), else a method: x.size(1)
        target = node.args[1] if attribute else node.target
        step = ShapeStep(target, tuple(source.meta["tensor_meta"].shape))
        extra = node.args[2:] if attribute else node.args[1:]
        args, kwargs = fx.node.map_arg((extra, dict(node.kwargs)), ctx.env.__getitem__)
        return ctx.add_step(node.name, step, (ctx.env[source], *args), kwargs)

    return Step((), emit)


def mean_delta_step(node: fx.Node) -> Step | None:
    """Global average pooling: MeanDeltaStep corrects the base mean by the box's change, reading the
    base input and the base mean (docs/design.md §2.6)."""
    if _meta(node).role != "mean_delta":
        return None

    def emit(ctx: RewriteContext, base_in: fx.Node, base_out: fx.Node) -> fx.Node:
        source = node.args[0]
        axes, spatial = len(_meta(source).box), _meta(source).spatial
        shape = tuple(source.meta["tensor_meta"].shape)
        in_size = tuple(shape[d] for d in spatial) if spatial else tuple(shape[-axes:])
        found = reduction(node)
        kind = "norm" if found is not None and found[0] == "norm" else "mean"
        step = MeanDeltaStep(in_size, tuple(node.meta["tensor_meta"].shape), kind, spatial)
        return ctx.add_step(node.name, step, (base_in, base_out, ctx.env[source]))

    return Step((unpadded(node.args[0]), unpadded(node)), emit)


def norm_step(node: fx.Node) -> Step | None:
    """GroupNorm/InstanceNorm in the local mode: GroupNormStep reads the base input's statistics
    and the box's change (docs/design.md §4.4)."""
    if _meta(node).role != "norm":
        return None
    source = node.args[0]

    def emit(ctx: RewriteContext, base_in: fx.Node) -> fx.Node:
        groups, eps, weight, bias = group_norm_args(node, ctx.modules)
        module = ctx.modules[node.target] if node.op == "call_module" else None
        step = GroupNormStep(groups, eps, module)
        affine = () if module is not None else fx.node.map_arg((weight, bias), ctx.env.__getitem__)
        return ctx.add_step(node.name, step, (base_in, ctx.env[source], *affine))

    return Step((unpadded(source),), emit)


def shape_arith_copy(node: fx.Node) -> Step | None:
    """Arithmetic on shapes: the original op, on the shapes the program computes."""
    if _meta(node).role != "shape_arith":
        return None
    return Step((), lambda ctx: ctx.graph.node_copy(node, ctx.env.__getitem__))


def hoisted_constant(node: fx.Node) -> Step | None:
    """A constant computed from the weights (StdConv's standardised weight, a reshaped layer scale)
    that a non-constant node reads: computed once per image by the base program, with the base
    activations, not once per batch. Recomputed whenever the base is (new image or new weights)."""
    meta = _meta(node)
    if meta.state is not State.CONST or node.op not in ("call_function", "call_method", "call_module"):
        return None
    if not hasattr(node.meta.get("tensor_meta"), "shape") or all(
        _meta(user).state is State.CONST for user in node.users
    ):
        return None
    return Step((BaseSlot(node.name, (), 0.0, whole=True),), lambda ctx, value: value)


def dense_copy(node: fx.Node) -> Step | None:
    """A constant or dense node: the original op, on full values (an incremental operand is
    projected to full first, so the node reads its base activation); a pool on CPU runs as
    :func:`_dense_pool`."""
    if _meta(node).state is State.PATCH:
        return None
    return Step(
        _changed_inputs(node),
        lambda ctx, *_: _dense_pool(ctx, node) or ctx.graph.node_copy(node, ctx.dense_value),
    )


def _dense_pool(ctx: RewriteContext, node: fx.Node) -> fx.Node | None:
    """A dense max- or average-pool (one divisor everywhere) on CPU as a :class:`DensePoolStep`, else
    None. The padding after each axis is what the traced output size needs (ceil_mode included)."""
    source = node.args[0] if node.args else None
    if ctx.device.type != "cpu" or not isinstance(source, fx.Node):
        return None
    axes = len(ctx.size)
    in_hw, out_hw = spatial_size(source, axes), spatial_size(node, axes)
    try:
        spec = local_spec(node, ctx.modules, in_hw) if out_hw else None
    except TraceError:  # pool settings computed at run time: torch's op, as traced
        return None
    if spec is None or spec.kind not in ("max_pool", "avg_pool") or spec.divisor is not None:
        return None
    pads: list[int] = []
    for length, out, extent, stride, before in reversed(
        list(zip(in_hw, out_hw, spec.kernel, spec.stride, spec.padding))
    ):
        read = read_in_span(0, out, kernel=extent, stride=stride, padding=before)  # every output's window
        pads += [before, read.start + read.width - length]
    step = DensePoolStep(spec, tuple(pads))
    return ctx.add_step(f"dense_{node.name}", step, (ctx.dense_value(source),))


def channel_getitem(node: fx.Node) -> Step | None:
    """One piece of a channel split: the getitem, copied, picks a Patches out of the tuple. (A slice
    of a tensor's channels, ``x[:, a:b]``, is a ChannelStep.)"""
    if _meta(node).role != "channel" or node.target is not operator.getitem:
        return None
    if "tensor_meta" in node.args[0].meta and hasattr(node.args[0].meta["tensor_meta"], "shape"):
        return None
    return Step((), lambda ctx: ctx.graph.node_copy(node, ctx.env.__getitem__))


def channel_step(node: fx.Node) -> Step | None:
    """A channel reshape/transpose/permute/chunk/split: ChannelStep runs it on the changed values;
    a reshape takes its traced output shape, so the x.size() arguments it was given are not needed."""
    if _meta(node).role != "channel":
        return None

    def emit(ctx: RewriteContext) -> fx.Node:
        reshape = node.target in ("view", "reshape", torch.reshape)
        reshape_to = tuple(node.meta["tensor_meta"].shape) if reshape else None
        step = ChannelStep(call_target(node, ctx.modules), reshape_to, len(_meta(node).box))
        return ctx.add_step(node.name, step, *ctx.mapped(node))

    return Step((), emit)


def pointwise_step(node: fx.Node) -> Step | None:
    """A point-wise op: PointwiseStep applies it to the changed values only. A gate (global_context=
    "local") is one too: the changed values times each position's own gate, [N, C, 1, 1]."""
    if _meta(node).role not in ("pointwise", "gate"):
        return None

    def emit(ctx: RewriteContext) -> fx.Node:
        return ctx.add_step(node.name, PointwiseStep(call_target(node, ctx.modules)), *ctx.mapped(node))

    return Step((), emit)


def local_step(node: fx.Node) -> Step | None:
    """A conv/pool/pad: LocalStep gathers read-in windows from its input's base activation, padded
    once by as much as any window overhangs the map (docs/design.md §2.4). Where each window is the
    input's changed box itself, CoveredLocalStep runs the op on the change and reads no base."""
    meta = _meta(node)
    if meta.role != "local":
        return None
    source = node.args[0]
    in_size = spatial_size(source, len(meta.box))

    def module_of(ctx: RewriteContext):
        return ctx.modules[node.target] if node.op == "call_module" else None

    def consts(ctx: RewriteContext) -> tuple[fx.Node, ...]:
        return tuple(ctx.env[n] for n in meta.local.const_nodes)

    if tuple(_meta(source).box) == tuple(meta.read):

        def emit_covered(ctx: RewriteContext) -> fx.Node:
            offset = (0,) * len(meta.box)
            step = CoveredLocalStep(meta, _meta(source), offset, module_of(ctx), ctx.device, ctx.dtype)
            return ctx.add_step(node.name, step, (ctx.env[source], *consts(ctx)))

        return Step((), emit_covered)

    slot = BaseSlot(source.name, _local_margins(meta, in_size), meta.local.pad_value)

    def emit(ctx: RewriteContext, padded_base: fx.Node) -> fx.Node:
        offset = slot.margins[0::2] or (0,) * len(meta.box)  # the margin before each axis
        step = LocalStep(meta, _meta(source), offset, module_of(ctx), ctx.device, ctx.dtype, ctx.backend)
        return ctx.add_step(node.name, step, (padded_base, ctx.env[source], *consts(ctx)))

    return Step((slot,), emit)


def resample_step(node: fx.Node) -> Step | None:
    """An interpolation: ResampleStep reads windows of its input's base activation (inside the map:
    resampling reads no padding) and applies the op's matrices (docs/design.md §2.8)."""
    meta = _meta(node)
    if meta.role != "resample":
        return None
    source = node.args[0]

    def emit(ctx: RewriteContext, base: fx.Node) -> fx.Node:
        step = ResampleStep(meta, _meta(source), ctx.device, ctx.dtype, ctx.backend)
        return ctx.add_step(node.name, step, (base, ctx.env[source]))

    return Step((unpadded(source),), emit)


def transposed_step(node: fx.Node) -> Step | None:
    """A transposed conv: TransposedStep reads windows of its input's base activation (inside the
    map: the op's padding only crops its output) and crops each box from its result (§2.10)."""
    meta = _meta(node)
    if meta.role != "transposed":
        return None
    source = node.args[0]

    def emit(ctx: RewriteContext, base: fx.Node) -> fx.Node:
        module = ctx.modules[node.target] if node.op == "call_module" else None
        step = TransposedStep(meta, _meta(source), module, ctx.device, ctx.backend)
        consts = tuple(ctx.env[n] for n in meta.transposed.const_nodes)
        return ctx.add_step(node.name, step, (base, ctx.env[source], *consts))

    return Step((unpadded(source),), emit)


def merge_step(node: fx.Node) -> Step | None:
    """An element-wise op of maps or a channel concat: MergeStep runs it on windows over the union
    box, one per spatial operand, read from that operand's base activation (docs/design.md §2.5).
    An operand whose changed box is the union box at every position is its own window: its base is
    not read (a residual branch that grew the box, DenseNet's new features)."""
    meta = _meta(node)
    if meta.role != "merge":
        return None
    windowed_nodes = _windowed_inputs(node)
    covered = {
        n for n in windowed_nodes if _meta(n).state is State.PATCH and tuple(_meta(n).box) == tuple(meta.box)
    }
    read = [n for n in windowed_nodes if n not in covered]

    def emit(ctx: RewriteContext, *bases: fx.Node) -> fx.Node:
        leaves, _ = tree_flatten((node.args, node.kwargs))
        windowed = {
            i: None if leaf in covered else read.index(leaf)
            for i, leaf in enumerate(leaves)
            if leaf in windowed_nodes
        }
        changed = [_meta(n).box for n in windowed_nodes if _meta(n).state is State.PATCH]
        inside = all(always_inside(box, meta.box) for box in changed)  # true by Eq. 20's construction
        offsets = tuple(tuple(ctx.base_offset(p) for p in ctx.pieces(unpadded(n))) for n in read)
        target = call_target(node, ctx.modules)
        step = MergeStep(meta, target, windowed, inside, ctx.device, ctx.backend, offsets)
        args, kwargs = ctx.mapped(node)
        return ctx.add_step(node.name, step, (bases, *args), kwargs)

    return Step(tuple(unpadded(n) for n in read), emit, reads_at_offset=True)


def _step(node: fx.Node) -> Step:
    for rule in STEP_RULES:
        step = rule(node)
        if step is not None:
            return step
    # patch_prop gives PATCH nodes only the roles above
    raise AssertionError(f"unexpected role {_meta(node).role!r} at {node.format_node()}")  # pragma: no cover


def build_program(gm: fx.GraphModule, patch, channels: int, dtype, device, backend: str = "torch") -> Program:
    """Rewrite annotated ``gm`` into the incremental :class:`Program` for ``patch`` (a kfx.Patch whose
    fill is a constant, made a [C, *size] tensor here, or position-dependent) on ``channels``.

    ``backend`` ("torch" or "triton") selects the kernels the steps call (kfx.kernels). Each node
    becomes the :class:`Step` of the first rule of :data:`STEP_RULES` that takes it.
    """
    fill = patch.fill if patch.positional else patch.fill_tensor(channels, dtype, device)
    ctx = RewriteContext(gm, fill, patch.size, backend, dtype, device)
    steps = [(node, _step(node)) for node in gm.graph.nodes]
    reads = [(slot, step.reads_at_offset) for _, step in steps for slot in step.reads]
    ctx.composed = composed_slots(gm.graph, reads, len(patch.size))
    ctx.shared = shared_slots((piece, at) for slot, at in reads for piece in ctx.pieces(slot))
    for _, step in steps:
        for slot in step.reads:
            ctx.add_base(slot)
    for node, step in steps:
        ctx.env[node] = step.emit(ctx, *(ctx.base(slot) for slot in step.reads))
    ctx.graph.lint()
    # Dead code (e.g. the weight arithmetic behind a constant the base computes) goes before the
    # module is built, which generates its Python code once; the steps' purity is looked up in gm,
    # where add_step registered them.
    ctx.graph.owning_module = gm
    ctx.graph.eliminate_dead_code()
    return Program(fx.GraphModule(gm, ctx.graph, class_name="IncrementalProgram"), list(ctx.bases))


def build_base_program(
    gm: fx.GraphModule, slots: Sequence[BaseSlot], channels_last: bool = False
) -> fx.GraphModule:
    """The base program: a copy of the model that also returns the base activations the incremental
    program reads (``program.slots``), prepared as each slot says: ``(model outputs, tuple of them)``.
    Each is padded right where the model computes it, so the unpadded value is freed after its last
    use in the model instead of living to the end of the run beside its padded copy: the base run
    holds at most the model's own live values plus the padded copies (docs/design.md §3.7).
    ``channels_last``: the image is made channels-last first, so every activation the model computes,
    and so every base activation and everything the program computes from them, is (§3.6)."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    waiting: dict[str, list[int]] = {}
    for index, slot in enumerate(slots):
        waiting.setdefault(slot.source, []).append(index)
    prepared: list[fx.Node | None] = [None] * len(slots)
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output((fx.map_arg(node.args[0], value_map.__getitem__), tuple(prepared)))
            break
        value = graph.node_copy(node, value_map.__getitem__)
        if node.op == "placeholder" and channels_last:
            value = graph.call_method("contiguous", (value,), {"memory_format": torch.channels_last})
        value_map[node] = value
        for index in waiting.get(node.name, ()):
            slot = slots[index]
            prepared[index] = (
                value
                if slot.whole
                else graph.call_function(kernels.pad_base, (value, slot.margins, slot.pad_value))
            )
    return fx.GraphModule(gm, graph, class_name="BaseProgram")


# The pass's table of contents: the step each node becomes, first match wins. The order matters:
# the graph's input and output come first, then the DENSE roles that have steps of their own
# (shape, mean_delta) or copy shapes as they are (shape_arith), then every other non-PATCH node is
# copied densely, and channel_getitem must precede channel_step. Adding a step is adding a row.
STEP_RULES: tuple[Callable[[fx.Node], Step | None], ...] = (
    input_step,
    graph_output,
    shape_step,
    mean_delta_step,
    shape_arith_copy,
    hoisted_constant,
    dense_copy,
    channel_getitem,
    channel_step,
    pointwise_step,
    norm_step,
    local_step,
    resample_step,
    transposed_step,
    merge_step,
)
