"""Pass 3: rewrite the annotated graph into the incremental program.

Requires: ``node.meta["kfx_patch"]`` on every node (kfx.passes.patch_prop).
Ensures: a GraphModule ``program(positions, *bases)`` that returns the model's outputs for the
occluded images at ``positions`` [N, 2]; ``bases`` are the unoccluded image's activations, prepared
as :class:`BaseSlot` says (padded once per image). Incremental nodes carry a :class:`Patches`
(changed values + where they sit); a projection to full is inserted before the first node that
runs densely. The steps only place data; what each computes lives in kfx.kernels.

Table of contents (node role -> step): input -> InputStep, pointwise -> PointwiseStep,
local -> LocalStep, merge -> MergeStep, channel -> ChannelStep, shape -> ShapeStep,
mean_delta -> MeanDeltaStep, shape_arith -> copy,
PATCH value used densely -> ProjectStep,
const/dense -> copy.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from kfx import kernels
from kfx.passes.patch_prop import META_KEY, SHAPE_ROLES, AxisBoxes, NodePatch, State, spatial_size

__all__ = ["Patches", "BaseSlot", "Program", "build_program"]


class Patches:
    """A batch of changed boxes: ``values`` [N, C, h, w] at ``origin`` [N, 2] (y, x) in the node's
    tensor, for the patch positions ``positions`` [N, 2] in the image."""

    __slots__ = ("values", "positions", "origin")

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, origin: torch.Tensor):
        self.values, self.positions, self.origin = values, positions, origin


@dataclass(frozen=True)
class BaseSlot:
    """One prepared base activation the program reads: ``source`` node's value, padded by
    ``margins`` (top, bottom, left, right) with ``pad_value``, as [C, H', W']."""

    source: str
    margins: tuple[int, int, int, int]
    pad_value: float


@dataclass
class Program:
    module: fx.GraphModule
    slots: list[BaseSlot]


def _tables(box: tuple[AxisBoxes, AxisBoxes], device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(b.starts, dtype=torch.long, device=device) for b in box)


class _BoxedStep(nn.Module):
    """A step that knows its output box for every patch position."""

    def __init__(self, box: tuple[AxisBoxes, AxisBoxes], device):
        super().__init__()
        h, w = _tables(box, device)
        self.register_buffer("starts_h", h, persistent=False)
        self.register_buffer("starts_w", w, persistent=False)
        self.size = (box[0].width, box[1].width)

    def origin(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.stack((self.starts_h[positions[:, 0]], self.starts_w[positions[:, 1]]), dim=1)


def _call_target(node: fx.Node, modules: dict[str, nn.Module]):
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_method":
        name = node.target
        return lambda self_arg, *args, **kwargs: getattr(self_arg, name)(*args, **kwargs)
    return node.target


class InputStep(nn.Module):
    """The occluded image as a change: the patch's fill at each position."""

    def __init__(self, fill: torch.Tensor):
        super().__init__()
        self.register_buffer("fill", fill, persistent=False)

    def forward(self, positions: torch.Tensor) -> Patches:
        return Patches(self.fill.expand(positions.shape[0], *self.fill.shape), positions, positions)


class PointwiseStep(nn.Module):
    """Apply a point-wise op to the changed values only; the box stays where it is."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, *args, **kwargs) -> Patches:
        leaves, _ = tree_flatten((args, kwargs))
        patches = next(leaf for leaf in leaves if isinstance(leaf, Patches))
        args, kwargs = tree_map(lambda a: a.values if isinstance(a, Patches) else a, (args, kwargs))
        return Patches(self.target(*args, **kwargs), patches.positions, patches.origin)


def _always_inside(patch: tuple[AxisBoxes, AxisBoxes], window: tuple[AxisBoxes, AxisBoxes]) -> bool:
    """True if, at every position, the changed box lies wholly inside the window (paste can scatter)."""
    return all(
        w <= p and p + pa.width <= w + wa.width
        for pa, wa in zip(patch, window)
        for p, w in zip(pa.starts, wa.starts)
    )


class LocalStep(_BoxedStep):
    """Conv/pool/pad on read-in windows: gather from the padded base, paste the change, run the op."""

    def __init__(self, meta: NodePatch, in_meta: NodePatch, offset: tuple[int, int], module, device, dtype,
                 backend: str = "torch"):
        super().__init__(meta.box, device)
        self.spec = meta.local
        self.backend = backend
        self.op = module  # registers a conv's parameters with the program (None for functional ops)
        read_h, read_w = _tables(meta.read, device)
        self.register_buffer("read_h", read_h, persistent=False)
        self.register_buffer("read_w", read_w, persistent=False)
        self.read_size = (meta.read[0].width, meta.read[1].width)
        self.offset = offset
        self.inside = _always_inside(in_meta.box, meta.read)
        divisor = meta.local.divisor
        self.register_buffer(
            "divisor",
            None if divisor is None else divisor.to(device=device, dtype=dtype)[None],
            persistent=False,
        )

    def forward(self, padded_base: torch.Tensor, patches: Patches, *consts) -> Patches:
        positions = patches.positions
        read = torch.stack((self.read_h[positions[:, 0]], self.read_w[positions[:, 1]]), dim=1)
        offset = torch.tensor(self.offset, device=read.device)
        window_args = (padded_base, read + offset, self.read_size, patches.values, patches.origin - read)
        if self.spec.conv_args is not None and self.backend == "triton":
            weight, bias = (self.op.weight, self.op.bias) if self.op is not None else (consts + (None,))[:2]
            out = kernels.incremental_conv(self.backend, *window_args, weight, bias, *self.spec.conv_args)
        else:
            windows = kernels.read_windows(
                self.backend, *window_args, inside=self.inside, pad_value=self.spec.pad_value
            )
            out = self.spec.apply(windows, *consts)
        origin = self.origin(positions)
        if self.divisor is not None:
            out = out / kernels.gather_windows(self.divisor, origin, self.size)
        return Patches(out, positions, origin)


class MergeStep(_BoxedStep):
    """Element-wise op or channel concat over the union box: window each spatial operand."""

    def __init__(self, meta: NodePatch, target, windowed: dict[int, int], inside: bool, device, backend="torch"):
        super().__init__(meta.box, device)
        self.target = target
        self.windowed = windowed  # flat leaf index in (args, kwargs) -> index into bases
        self.inside = inside
        self.backend = backend

    def forward(self, bases: tuple[torch.Tensor, ...], *args, **kwargs) -> Patches:
        leaves, spec = tree_flatten((args, kwargs))
        positions = next(leaf.positions for leaf in leaves if isinstance(leaf, Patches))
        origin = self.origin(positions)
        for leaf_index, base_index in self.windowed.items():
            leaf = leaves[leaf_index]
            if isinstance(leaf, Patches):
                window = kernels.read_windows(
                    self.backend, bases[base_index], origin, self.size, leaf.values, leaf.origin - origin,
                    inside=self.inside,
                )
            else:  # a constant spatial operand: its window, unchanged
                window = kernels.gather_windows(bases[base_index], origin, self.size)
            leaves[leaf_index] = window
        args, kwargs = tree_unflatten(leaves, spec)
        return Patches(self.target(*args, **kwargs), positions, origin)


class ChannelStep(nn.Module):
    """A reshape/transpose/permute/chunk/split over channels: run it on the changed values.

    Reshapes take their full output shape with the batch and spatial dims of the patch, so the
    shape arguments traced from ``x.size()`` are not needed.
    """

    def __init__(self, target, reshape_to: tuple[int, ...] | None):
        super().__init__()
        self.target = target
        self.reshape_to = reshape_to

    def forward(self, patches: Patches, *args, **kwargs):
        values = patches.values
        if self.reshape_to is not None:
            out = values.reshape(values.shape[0], *self.reshape_to[1:-2], *values.shape[-2:])
        else:
            out = self.target(values, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return Patches(out, patches.positions, patches.origin)
        return tuple(Patches(v, patches.positions, patches.origin) for v in out)


class ShapeStep(nn.Module):
    """``x.size()``, ``x.shape`` or ``x.dim()`` of an incremental value: the full tensor's answer."""

    def __init__(self, target, full_shape: tuple[int, ...]):
        super().__init__()
        self.target = target
        self.full_shape = full_shape

    def forward(self, patches: Patches, *args):
        shape = torch.Size((patches.values.shape[0], *self.full_shape[1:]))
        if self.target == "shape":
            return shape
        if self.target == "dim":
            return len(shape)
        return shape[args[0]] if args else shape


class MeanDeltaStep(nn.Module):
    """Global average pooling from the base mean and the box's change (exact, docs/design.md §2.6)."""

    def __init__(self, in_hw: tuple[int, int], out_shape: tuple[int, ...]):
        super().__init__()
        self.area = in_hw[0] * in_hw[1]
        self.out_shape = out_shape

    def forward(self, base_in: torch.Tensor, base_out: torch.Tensor, patches: Patches) -> torch.Tensor:
        n, c, h, w = patches.values.shape
        old = kernels.gather_windows(base_in, patches.origin, (h, w))
        delta = (patches.values - old).sum(dim=(2, 3)) / self.area
        return (base_out.reshape(1, c) + delta).view(n, *self.out_shape[1:])


class ProjectStep(nn.Module):
    """Projection to full: paint the changes into N copies of the base (docs/design.md §2.6)."""

    def __init__(self, backend: str = "torch"):
        super().__init__()
        self.backend = backend

    def forward(self, base: torch.Tensor, patches: Patches) -> torch.Tensor:
        values = patches.values  # [N, *channel dims, h, w]: channel dims flatten to one for the kernel
        full = kernels.project_to_full(
            self.backend, base.reshape(-1, *base.shape[-2:]), values.reshape(values.shape[0], -1, *values.shape[-2:]),
            patches.origin,
        )
        return full.view(values.shape[0], *base.shape)


def _meta(node: fx.Node) -> NodePatch:
    return node.meta[META_KEY]


def _local_margins(meta: NodePatch, in_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    (rh, rw) = meta.read
    top = max(0, -min(rh.starts))
    bottom = max(0, max(rh.starts) + rh.width - in_hw[0])
    left = max(0, -min(rw.starts))
    right = max(0, max(rw.starts) + rw.width - in_hw[1])
    return (top, bottom, left, right)


def _windowed_inputs(node: fx.Node) -> list[fx.Node]:
    """Operands of a merge that vary over space and so are read through windows."""
    size = spatial_size(node)
    return [n for n in node.all_input_nodes if spatial_size(n) == size]


def build_program(gm: fx.GraphModule, fill: torch.Tensor, backend: str = "torch") -> Program:
    """Rewrite annotated ``gm`` into the incremental :class:`Program` (fill: the patch, [C, h, w]).

    ``backend`` ("torch" or "triton") selects the kernels the steps call (kfx.kernels).
    """
    modules = dict(gm.named_modules())
    device, dtype = fill.device, fill.dtype
    graph = fx.Graph()
    positions = graph.placeholder("positions")
    slots: dict[BaseSlot, fx.Node] = {}

    unpadded = lambda n: BaseSlot(n.name, (0, 0, 0, 0), 0.0)

    def needs(node: fx.Node) -> list[BaseSlot]:
        meta = _meta(node)
        if meta.role == "local":
            source = node.args[0]
            return [BaseSlot(source.name, _local_margins(meta, spatial_size(source)), meta.local.pad_value)]
        if meta.role == "merge":
            return [unpadded(n) for n in _windowed_inputs(node)]
        if meta.role == "mean_delta":
            return [unpadded(node.args[0]), unpadded(node)]
        if (meta.state is State.DENSE and meta.role not in SHAPE_ROLES) or node.op == "output":
            return [unpadded(n) for n in node.all_input_nodes if _meta(n).state is State.PATCH]
        return []

    for node in gm.graph.nodes:
        for slot in needs(node):
            if slot not in slots:
                slots[slot] = graph.placeholder(f"base_{len(slots)}")

    env: dict[fx.Node, fx.Node] = {}
    projected: dict[fx.Node, fx.Node] = {}

    def add_step(name: str, step: nn.Module, args, kwargs=None) -> fx.Node:
        qualified = f"kfx_{name}"
        gm.add_submodule(qualified, step)
        return graph.call_module(qualified, args, kwargs or {})

    def dense_value(n: fx.Node) -> fx.Node:
        if _meta(n).state is not State.PATCH:
            return env[n]
        if n not in projected:
            projected[n] = add_step(f"project_{n.name}", ProjectStep(backend), (slots[unpadded(n)], env[n]))
        return projected[n]

    for node in gm.graph.nodes:
        meta = _meta(node)
        if node.op == "placeholder":
            env[node] = add_step(f"input_{node.name}", InputStep(fill), (positions,))
        elif node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], dense_value))
        elif meta.role == "shape":
            source = node.args[0]
            target = "shape" if node.op == "call_function" else node.target
            step = ShapeStep(target, tuple(source.meta["tensor_meta"].shape))
            extra = node.args[2:] if target == "shape" else node.args[1:]  # size(dim) keeps its dim
            env[node] = add_step(node.name, step, (env[source], *fx.node.map_arg(extra, env.__getitem__)))
        elif meta.role == "mean_delta":
            source = node.args[0]
            step = MeanDeltaStep(spatial_size(source), tuple(node.meta["tensor_meta"].shape))
            base_in, base_out = (slots[slot] for slot in needs(node))
            env[node] = add_step(node.name, step, (base_in, base_out, env[source]))
        elif meta.role == "shape_arith":
            env[node] = graph.node_copy(node, env.__getitem__)
        elif meta.state is not State.PATCH:
            env[node] = graph.node_copy(node, dense_value)
        elif meta.role == "channel" and node.target is operator.getitem:
            env[node] = graph.node_copy(node, env.__getitem__)  # picks a Patches out of the tuple
        elif meta.role == "channel":
            reshape_to = tuple(node.meta["tensor_meta"].shape) if node.target in ("view", "reshape", torch.reshape) else None
            step = ChannelStep(_call_target(node, modules), reshape_to)
            env[node] = add_step(node.name, step, *fx.node.map_arg((node.args, node.kwargs), env.__getitem__))
        elif meta.role == "pointwise":
            step = PointwiseStep(_call_target(node, modules))
            env[node] = add_step(node.name, step, *fx.node.map_arg((node.args, node.kwargs), env.__getitem__))
        elif meta.role == "local":
            source = node.args[0]
            slot = needs(node)[0]
            module = modules[node.target] if node.op == "call_module" else None
            offset = (slot.margins[0], slot.margins[2])
            step = LocalStep(meta, _meta(source), offset, module, device, dtype, backend)
            consts = tuple(env[n] for n in meta.local.const_nodes)
            env[node] = add_step(node.name, step, (slots[slot], env[source], *consts))
        elif meta.role == "merge":
            leaves, _ = tree_flatten((node.args, node.kwargs))
            windowed_nodes = _windowed_inputs(node)
            bases = tuple(slots[unpadded(n)] for n in windowed_nodes)
            windowed = {
                i: windowed_nodes.index(leaf) for i, leaf in enumerate(leaves) if leaf in windowed_nodes
            }
            changed = [_meta(n).box for n in windowed_nodes if _meta(n).state is State.PATCH]
            inside = all(_always_inside(box, meta.box) for box in changed)  # true by Eq. 20's construction
            step = MergeStep(meta, _call_target(node, modules), windowed, inside, device, backend)
            mapped_args, mapped_kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = add_step(node.name, step, (bases, *mapped_args), mapped_kwargs)
        else:  # pragma: no cover - patch_prop only emits the roles above for PATCH nodes
            raise AssertionError(f"unexpected role {meta.role!r} at {node.format_node()}")

    graph.lint()
    return Program(fx.GraphModule(gm, graph, class_name="IncrementalProgram"), list(slots))
