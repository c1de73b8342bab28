"""Pass 2: patch propagation. Annotate each node with its layer class and changed boxes.

Requires: a traced, functional graph with ``tensor_meta`` on its nodes (kfx.passes.trace).
Ensures: every node carries ``node.meta["kfx_patch"]``, a :class:`NodePatch` saying whether its
value is constant (independent of the image), incremental (a changed box per patch position,
one spatial axis at a time: 1, 2 or 3 of them) or dense (recomputed in full after a projection), and for local ops
the read-in window (docs/design.md §2.3). Boxes are tabulated for every patch coordinate along each axis, so
any position (not only the heat-map grid) can be looked up at run time with one index. Each call
node is classified by the first matching rule of ``CLASSIFY_RULES`` (the table at the end of the file).

With projective-field thresholding (tau < 1, docs/design.md §4.1) every conv and pool caps its changed box
at round(tau * W_out) ([TR] Eqs. 21-27, kfx.geometry.thresholded_output_span): the steps then
recompute that box only, so changes outside it are dropped (the output there is the base value).
Merges take the union of their inputs' (capped) boxes and drop nothing; the next conv or pool caps
again. At tau = 1 no box is capped and the tables are the exact ones, by the same code.

``global_context="local"`` (opt-in, approximate, docs/design.md §4.4) keeps a squeeze-excitation
gate incremental: ``x * gate`` where the gate is one value per channel computed from the whole map
(densely, exactly) is recomputed inside x's changed box only; outside it the base value stays. The
default ``"exact"`` turns such a product dense, like any op that reads global context.

``concat="last"`` is for the cost model only, never for an engine: a channel concatenation then
takes the box of its last input instead of the union. That is not exact (changes in the other
branches outside that box are lost), but it is the accounting that reproduces the paper's published
Inception3 speedups ([TR] Fig. 3 and 7a; see kfx.paper_cost and tests/test_cost.py).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
from torch import fx

from kfx.errors import TraceError
from kfx.passes.annotation import (
    CONCAT_RULES,
    GLOBAL_CONTEXT_MODES,
    META_KEY,
    SHAPE_ROLES,
    AxisBoxes,
    ClassifyContext,
    NodePatch,
    State,
    broadcasts_over_space,
    changes_first_arg,
    channels_first,
    classify_context,
    dense,
    describe,
    input_axes,
    is_shape_query,
    map_spatial,
    shape_of,
    spatial_size,
)
from kfx.passes.boxes import local_axis, merge_axis, resample_axis, transposed_axis
from kfx.passes.layout import (
    acting_dims,
    channel_op_kind,
    constant_over,
    layer_operands,
    permuted_spatial,
    reduction,
    spatial_dims,
)
from kfx.passes.local import local_spec
from kfx.passes.ops import (
    acts_per_channel,
    forward_hooks,
    group_norm_args,
    is_gate_product,
    is_global_mean,
    is_merge,
    is_pointwise,
    per_channel_operands,
    static_value,
)
from kfx.passes.resample import resample_spec
from kfx.passes.transposed import transposed_spec

__all__ = [
    "META_KEY",
    "SHAPE_ROLES",
    "State",
    "AxisBoxes",
    "NodePatch",
    "ClassifyContext",
    "CLASSIFY_RULES",
    "propagate_patches",
    "spatial_size",
    "input_axes",
]

# -- classification rules: rule(node, ctx) -> NodePatch, or None if the rule does not apply ---------


def shape_arithmetic(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A value computed from x.size() and constants only. Shapes are metadata, not data, so it never
    forces a projection: ints and tuples (role shape_arith) are copied into the program as they are,
    a tensor built from them (torch.zeros(x.shape)) runs densely."""
    if len(ctx.data) == len(ctx.inputs) or State.PATCH in ctx.states or State.DENSE in ctx.states:
        return None
    metadata = [n for n in ctx.inputs if n not in ctx.data]
    free = all(n.meta[META_KEY].batch_free for n in metadata) or _drops_the_batch(node)
    if "tensor_meta" not in node.meta:
        return NodePatch(State.DENSE, "shape_arith", batch_free=free)
    # A tensor built from constants and batch-free metadata (timm's BlurPool: filt.to(x.dtype),
    # filt.expand(x.shape[1], ...)) is the same for any batch: a constant. One built from the batch
    # size (torch.zeros(x.shape)) has the program's batch: it runs densely.
    return NodePatch(State.CONST, "const") if free else dense()


def _drops_the_batch(node: fx.Node) -> bool:
    """``shape[i]`` with i not the batch dim, or ``shape[a:]`` with a past it, of a full shape."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source, index = node.args
    value = static_value(source)
    if not isinstance(value, (tuple, torch.Size)) or not value:
        return False
    rank = len(value)
    if isinstance(index, int):
        return index % rank != 0
    return isinstance(index, slice) and isinstance(index.start, int) and 0 < index.start % rank


def gate(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """``x * g``: one changed map times a gate computed from global context (squeeze-excitation and
    its kin: one value per channel, the same at every spatial position). Exact: every output cell
    changes, so it is dense, and the report says the local mode would lift it. ``global_context=
    "local"``: the product is recomputed inside x's box only (approximate, docs/design.md §4.4)."""
    if not (State.DENSE in ctx.states and len(ctx.changed) == 1 and is_gate_product(node)):
        return None
    source = ctx.changed[0]
    spatial, rank = map_spatial(source, ctx.axes), len(shape_of(source) or ())
    if not (
        spatial is not None
        and shape_of(node) == shape_of(source)
        and all(
            constant_over(shape_of(n), spatial, rank)
            for n in ctx.data
            if n is not source and shape_of(n) is not None
        )
    ):
        return None
    if ctx.global_context == "local":
        meta = source.meta[META_KEY]
        return NodePatch(State.PATCH, "gate", box=meta.box, spatial=meta.spatial)
    return dense(
        f"{describe(node, ctx.modules)} applies a gate computed from global context (squeeze-excitation "
        "or kin), which changes every cell; global_context='local' would keep it incremental (approximate)"
    )


def downstream_of_dense(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A node that reads a densely computed value is dense. If it also reads an incremental value,
    that change is projected to full here, which is worth reporting; further down it is not."""
    if State.DENSE not in ctx.states:
        return None
    if State.PATCH in ctx.states:
        return dense(
            f"{describe(node, ctx.modules)} combines a densely computed value with an incremental one"
        )
    return dense()


def constant(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """No operand depends on the image (weights, constants): the value is the same at every position."""
    return NodePatch(State.CONST, "const") if State.PATCH not in ctx.states else None


def hooked_module(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A module with forward hooks or pre-hooks (its own or global ones) runs densely: a hook may
    change the module's input or output, and the incremental steps run the op itself (or on boxes),
    where no hook would see the full tensor it expects."""
    if node.op != "call_module" or not forward_hooks(ctx.modules[node.target]):
        return None
    return dense(
        f"{describe(node, ctx.modules)} has forward hooks, which may change what it computes: it runs "
        "densely (exact); remove the hooks before kfx.compile to keep it incremental"
    )


def shape_query(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """x.size(), x.shape, x.dim() of a changed value: answered from the full shape, no projection."""
    if not is_shape_query(node):
        return None
    return NodePatch(State.DENSE, "shape", batch_free=_query_is_batch_free(node))


def _query_is_batch_free(node: fx.Node) -> bool:
    """x.ndim, x.dtype, x.device, x.dim(), x.size(i) for i not the batch dim: the same for any batch."""
    if node.op == "call_function":  # getattr(x, name)
        return node.args[1] in ("ndim", "dtype", "device", "is_cuda")
    if node.target == "dim":
        return True
    rank = len(getattr(node.args[0].meta.get("tensor_meta"), "shape", ()))
    index = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return node.target == "size" and isinstance(index, int) and rank > 0 and index % rank != 0


def channel_op(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A reshape/transpose/chunk/split that moves channels only (channel shuffle, branch splits), a
    getitem picking one of its pieces, or a permute or transpose keeping the batch first (to
    channels-last and back, any rank, §2.9): the spatial box is unchanged, though a permute moves the
    dims that hold it."""
    if not changes_first_arg(node, ctx):
        return None
    source = ctx.changed[0]
    meta, shape = source.meta[META_KEY], shape_of(source)
    if shape is not None and len(shape) >= ctx.axes + 2 and shape[0] == 1:
        moved = permuted_spatial(node, meta.spatial, len(shape), ctx.axes)
        if moved is not False:
            return NodePatch(State.PATCH, "channel", box=meta.box, spatial=moved)
    piece_of_split = meta.role == "channel" and shape is None
    kind = channel_op_kind(node, shape, shape_of(node), piece_of_split, ctx.axes)
    if meta.spatial is None and kind is not None:
        return NodePatch(State.PATCH, "channel", box=meta.box)
    return None


def global_mean(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """Global average pooling of the changed map. mean_new = mean_base + (sum(new box) - sum(old
    box)) / (H * W) is exact and needs no projection (docs/design.md §2.6). The L2 norm over every
    spatial dim (ConvNeXt-V2's GRN) likewise: norm_new^2 = norm_base^2 + sum(new^2 - old^2) over the
    box; both in either layout."""
    if not changes_first_arg(node, ctx):
        return None
    source = ctx.changed[0]
    if (
        channels_first(source)
        and spatial_size(source, ctx.axes) is not None  # every dim after the channels is spatial
        and is_global_mean(node, ctx.modules)
    ):
        return NodePatch(State.DENSE, "mean_delta")
    found, spatial = reduction(node), map_spatial(source, ctx.axes)
    if found is not None and spatial is not None and found[0] in ("mean", "norm") and found[1] == spatial:
        return NodePatch(State.DENSE, "mean_delta")
    return None


def channel_reduction(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A sum, mean, max or min over channel dims (ResNeSt's radix sum, CBAM's channel pooling), or a
    softmax across them: each spatial position alone, so the box stays put. A reduction that drops
    dims must leave a [1, C, *S] map in the usual layout."""
    found = reduction(node) if changes_first_arg(node, ctx) else None
    source = ctx.changed[0] if found else None
    spatial = map_spatial(source, ctx.axes) if found else None
    if spatial is None or found[0] == "norm" or set(found[1]) & {0, *spatial}:
        return None
    meta, out = source.meta[META_KEY], shape_of(node)
    if not found[2] and (meta.spatial is not None or out is None or len(out) < ctx.axes + 2):
        return None
    return NodePatch(State.PATCH, "pointwise", box=meta.box, spatial=meta.spatial)


def normalization(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """GroupNorm or InstanceNorm of the changed map: statistics of the whole map per group of
    channels. Exact: every cell changes, so it is dense, and the report says the local mode would
    lift it. ``global_context="local"``: each position's statistics are computed exactly (from the
    base's and the box's change) and applied inside the box only (approximate, §4.4)."""
    if not (
        changes_first_arg(node, ctx)
        and channels_first(ctx.changed[0])
        and spatial_size(ctx.changed[0], ctx.axes) is not None
        and group_norm_args(node, ctx.modules) is not None
    ):
        return None
    if ctx.global_context == "local":
        return NodePatch(State.PATCH, "norm", box=ctx.changed[0].meta[META_KEY].box)
    return dense(
        f"{describe(node, ctx.modules)} normalises with statistics of the whole map (global context), "
        "which changes every cell: the change is projected to full here and the rest runs densely "
        "(exact); global_context='local' would keep it incremental (approximate)"
    )


def same_box_merge(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """An element-wise op or channel concat whose changed operands share one box and layout (a
    residual add inside a block that did not grow the box, GRN's ``x + f(x)``): it acts on each
    position alone, so it runs on the changed values as they are, with no windows, in any layout."""
    if not ctx.changed or not is_merge(node):
        return None
    first = ctx.changed[0].meta[META_KEY]
    out, spatial = shape_of(node), map_spatial(ctx.changed[0], ctx.axes)
    if (
        spatial is None
        or out is None
        or any(
            n.meta[META_KEY].box != first.box
            or n.meta[META_KEY].spatial != first.spatial
            or len(shape_of(n) or ()) != len(out)
            or any(shape_of(n)[d] != out[d] for d in spatial)
            for n in ctx.changed
        )
    ):
        return None
    if all(constant_over(shape_of(n), spatial, len(out)) for n in ctx.others if shape_of(n) is not None):
        return NodePatch(State.PATCH, "pointwise", box=first.box, spatial=first.spatial)
    return None


def pointwise(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """An op of one changed map that acts on each spatial position alone: element-wise (activations,
    eval BatchNorm, functional too), or a layer over non-spatial trailing dims (Linear, LayerNorm
    on a channels-last map, §2.9), with constants that are the same at every spatial position. It
    runs on the changed values alone, and the box stays put."""
    if len(ctx.changed) != 1:
        return None
    source = ctx.changed[0]
    meta, src, out = source.meta[META_KEY], shape_of(source), shape_of(node)
    if src is None or out is None or len(src) != len(out) or len(src) < 3:
        return None
    rank = len(src)
    spatial = spatial_dims(meta.spatial, rank, ctx.axes)
    acting = acting_dims(node, ctx.modules)
    if acting is not None:
        mixed = {d % rank for d in acting}
        if mixed & {0, *spatial} or any(out[d] != src[d] for d in range(rank) if d not in mixed):
            return None
        allowed = layer_operands(node)
    elif is_pointwise(node, ctx.modules) and out == src:
        if 1 in spatial and acts_per_channel(node, ctx.modules):
            return None  # its per-channel parameters would act on a spatial dim of this layout
        allowed = per_channel_operands(node)  # batch_norm's [C] statistics act on dim 1
    else:
        return None
    if all(
        constant_over(shape_of(n), spatial, rank) or n in allowed
        for n in ctx.others
        if shape_of(n) is not None
    ):
        return NodePatch(State.PATCH, "pointwise", box=meta.box, spatial=meta.spatial)
    return None


def channels_last(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """Any other op of a channels-last map (its spatial dims permuted away from the end) runs
    densely: the rules below assume [1, C, H, W]."""
    if all(channels_first(n) for n in ctx.changed):
        return None
    return dense(
        f"{describe(node, ctx.modules)} reads a channels-last map; there kfx runs only per-position ops "
        "(activations, LayerNorm and Linear over channels) and permutes back"
    )


def global_context(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """Anything left whose output is not a [1, C, H, W] map (flatten, linear, a spatial reduction)
    needs its whole input: the change is projected to full here. Later rules may assume a map."""
    if spatial_size(node, ctx.axes) is not None:
        return None
    return dense(
        f"{describe(node, ctx.modules)} is global context (its output is not a [1, C, *spatial] map)"
    )


def local(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A conv, pool or constant pad of the changed map: its box and read-in window along each axis
    ([TR] Eqs. 13-16, docs/design.md §2.3), conv and pool boxes capped at tau (§4.1)."""
    if not changes_first_arg(node, ctx):
        return None
    source = ctx.changed[0]
    spec = local_spec(node, ctx.modules, spatial_size(source, ctx.axes))
    if spec is None:
        return None
    size = spatial_size(node, ctx.axes)
    box, read = zip(
        *(local_axis(source.meta[META_KEY].box[a], spec, a, size[a], ctx.tau) for a in range(ctx.axes))
    )
    return NodePatch(State.PATCH, "local", box=tuple(box), read=tuple(read), local=spec)


def resample(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """Nearest/bilinear/bicubic interpolation of the changed map (F.interpolate, nn.Upsample): a fixed
    matrix per axis, read off the op; its nonzero pattern gives the box and read-in window (§2.8)."""
    if not changes_first_arg(node, ctx):
        return None
    source = ctx.changed[0]
    in_hw, out_hw = spatial_size(source, ctx.axes), spatial_size(node, ctx.axes)
    spec = resample_spec(node, ctx.modules, in_hw, out_hw, source.meta["tensor_meta"].dtype)
    if spec is None:
        return None
    box, read = zip(
        *(resample_axis(source.meta[META_KEY].box[a], spec, a, in_hw[a]) for a in range(ctx.axes))
    )
    return NodePatch(State.PATCH, "resample", box=tuple(box), read=tuple(read), resample=spec)


def transposed(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """A transposed conv of the changed map: the outputs the changed inputs reach, recomputed from a
    window of inputs (docs/design.md §2.10)."""
    if not changes_first_arg(node, ctx):
        return None
    spec = transposed_spec(node, ctx.modules)
    source = ctx.changed[0]
    in_hw, out_hw = spatial_size(source, ctx.axes), spatial_size(node, ctx.axes)
    if spec is None or in_hw is None or out_hw is None or len(spec.kernel) != ctx.axes:
        return None
    box = source.meta[META_KEY].box
    axes = [transposed_axis(box[a], spec, a, in_hw[a], out_hw[a]) for a in range(ctx.axes)]
    if None in axes:
        return None
    boxes, reads = zip(*axes)
    return NodePatch(State.PATCH, "transposed", box=tuple(boxes), read=tuple(reads), transposed=spec)


def merge(node: fx.Node, ctx: ClassifyContext) -> NodePatch | None:
    """An element-wise op of maps or a channel concat: the union of the changed boxes ([TR] Eq. 20).
    Its operands must share its spatial size (or be constants the same at every position); else the
    op mixes scales, and the change is projected to full here."""
    if not is_merge(node):
        return None
    size = spatial_size(node, ctx.axes)
    tensors = [n for n in ctx.inputs if shape_of(n) is not None]
    if not all(
        spatial_size(n, ctx.axes) == size or (n in ctx.others and broadcasts_over_space(n, ctx.axes))
        for n in tensors
    ):
        return dense(f"{describe(node, ctx.modules)} mixes tensors of different spatial sizes")
    boxes = [n.meta[META_KEY].box for n in ctx.changed]
    if ctx.concat == "last" and node.target is torch.cat:
        boxes = boxes[-1:]
    box = tuple(merge_axis([b[a] for b in boxes], size[a]) for a in range(ctx.axes))
    return NodePatch(State.PATCH, "merge", box=box)


def unknown_op(node: fx.Node, ctx: ClassifyContext) -> NodePatch:
    """The last rule, matching every node: an op kfx does not run incrementally runs densely from
    here on, which is exact, and the node is reported. Nothing unknown runs incrementally."""
    return dense(
        f"{describe(node, ctx.modules)} is global context or an op kfx does not run incrementally: the "
        "change is projected to full here and the rest runs densely (exact)"
    )


def _classify(node: fx.Node, ctx: ClassifyContext) -> NodePatch:
    for rule in CLASSIFY_RULES:
        patch = rule(node, ctx)
        if patch is not None:
            return patch
    raise AssertionError("unknown_op, the last rule, matches every node")  # pragma: no cover


def propagate_patches(
    gm: fx.GraphModule,
    image_size: tuple[int, ...],
    patch_size: tuple[int, ...],
    tau: float = 1.0,
    *,
    concat: str = "union",
    global_context: str = "exact",
    force_dense: Mapping[str, str] | None = None,
) -> None:
    """Annotate every node of ``gm`` with its :class:`NodePatch` under ``node.meta["kfx_patch"]``.

    ``image_size`` and ``patch_size`` have one entry per spatial axis of the model's input (1 to 3).

    ``tau`` in (0, 1] is the projective-field threshold (docs/design.md §4.1); 1 keeps every box exact.
    ``concat``: "union" ([TR] Eq. 20, exact) or "last" (the paper's published accounting, for the
    cost model only: see the module docstring). ``global_context``: "exact" or "local" (squeeze-
    excitation gates applied inside the changed box only; approximate). Each call node gets the first answer of
    :data:`CLASSIFY_RULES`. ``force_dense`` (kfx.passes.plan) maps node names to a reason: such a node
    that would run incrementally runs densely instead (exact; its changed operands are projected).
    """
    if concat not in CONCAT_RULES:
        raise ValueError(f"concat must be one of {CONCAT_RULES}, got {concat!r}")
    if global_context not in GLOBAL_CONTEXT_MODES:
        raise ValueError(f"global_context must be one of {GLOBAL_CONTEXT_MODES}, got {global_context!r}")
    modules = dict(gm.named_modules())
    axes = len(image_size)
    # A node's answer depends only on the node, its inputs' answers and these settings, so after a
    # propagation with the same settings and nothing forced (annotate's), forcing nodes dense changes
    # only them and what they feed: the rest keeps its answer (the plan's second pass, compile time).
    # A cheap guard that it is the same graph (kfx edits no graph between its two propagations).
    graph = (id(gm.graph), len(gm.graph.nodes))
    settings = (*graph, tuple(image_size), tuple(patch_size), tau, concat, global_context)
    reuse = bool(force_dense) and gm.meta.get(_PROPAGATED_KEY) == settings
    redone: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if reuse and META_KEY in node.meta and node.name not in force_dense:
            if redone.isdisjoint(node.all_input_nodes):
                continue
        redone.add(node)
        if node.op == "placeholder":
            box = tuple(
                AxisBoxes(patch_size[a], tuple(range(image_size[a] - patch_size[a] + 1))) for a in range(axes)
            )
            node.meta[META_KEY] = NodePatch(State.PATCH, "input", box=box)
        elif node.op in ("get_attr", "output"):
            node.meta[META_KEY] = NodePatch(State.CONST, "const")
        else:
            try:
                context = classify_context(node, modules, tau, concat, global_context, axes)
                node.meta[META_KEY] = _classify(node, context)
                if force_dense and node.name in force_dense and node.meta[META_KEY].state is State.PATCH:
                    node.meta[META_KEY] = dense(force_dense[node.name])
            except Exception as exc:  # name the node, as torch.fx's own passes do
                raise TraceError(
                    f"kfx cannot analyse node {node.format_node()} ({type(exc).__name__}: {exc}); please report "
                    "it with the model, and meanwhile compute that op out of the model's forward"
                ) from exc
    gm.meta[_PROPAGATED_KEY] = None if force_dense else settings


# gm.meta: the settings of the last propagation that forced nothing dense (see propagate_patches).
_PROPAGATED_KEY = "kfx_patches_propagated_with"


# The pass's table of contents: how a call node is classified, first match wins. The order matters:
# the first rules settle what does not depend on a changed operand or reads a dense one (so every
# later rule sees at least one PATCH operand and no DENSE one; a gate reads a dense value, so it
# comes before downstream_of_dense), global_context comes before the rules that need a
# [1, C, H, W] output, and unknown_op catches the rest. Adding an op kfx runs incrementally is
# adding a row (or teaching kfx.passes.ops' taxonomy, which these rules ask).
CLASSIFY_RULES: tuple[Callable[[fx.Node, ClassifyContext], NodePatch | None], ...] = (
    shape_arithmetic,
    gate,
    downstream_of_dense,
    constant,
    hooked_module,
    shape_query,
    channel_op,
    global_mean,
    pointwise,
    channel_reduction,
    normalization,
    same_box_merge,
    channels_last,
    global_context,
    local,
    resample,
    transposed,
    merge,
    unknown_op,
)
