"""What each incremental node computes, as small modules: the steps the rewrite pass places.

Keeping the math apart from the graph surgery (passes/rewrite.py only matches nodes and inserts
these): each step takes a :class:`Patches` (changed values and where they sit) or plain tensors and
the prepared base activations, and calls kfx.kernels for gather, paste, windowed ops and projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from kfx import kernels
from kfx.passes.patch_prop import AxisBoxes, NodePatch
from kfx.passes.resample import apply_per_axis

__all__ = [
    "Patches",
    "InputStep",
    "PointwiseStep",
    "LocalStep",
    "CoveredLocalStep",
    "ResampleStep",
    "TransposedStep",
    "MergeStep",
    "ChannelStep",
    "ShapeStep",
    "MeanDeltaStep",
    "GroupNormStep",
    "ProjectStep",
    "DensePoolStep",
]


class Patches:
    """A batch of changed boxes: ``values`` [N, C, *box] at ``origin`` [N, axes] (one coordinate per
    spatial axis: (y, x) for images) in the node's tensor, for the patch positions ``positions``
    [N, axes] in the image."""

    __slots__ = ("values", "positions", "origin")

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, origin: torch.Tensor):
        self.values, self.positions, self.origin = values, positions, origin


def _table(box: tuple[AxisBoxes, ...], device) -> torch.Tensor:
    """The boxes' starts as one long tensor [axes, longest]: row a, column x is the start along axis
    a for a patch at coordinate x (rows are padded; positions never index the padding)."""
    longest = max(len(b.starts) for b in box)
    rows = [list(b.starts) + [0] * (longest - len(b.starts)) for b in box]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _look_up(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each position's starts [N, axes] from a :func:`_table`: one index, every axis at once."""
    return table[torch.arange(table.shape[0], device=table.device), positions]


class _BoxedStep(nn.Module):
    """A step that knows its output box for every patch position."""

    def __init__(self, box: tuple[AxisBoxes, ...], device):
        super().__init__()
        self.register_buffer("starts", _table(box, device), persistent=False)
        self.size = tuple(b.width for b in box)

    def origin(self, positions: torch.Tensor) -> torch.Tensor:
        return _look_up(self.starts, positions)


def call_target(node: fx.Node, modules: dict[str, nn.Module]):
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_method":
        name = node.target
        return lambda self_arg, *args, **kwargs: getattr(self_arg, name)(*args, **kwargs)
    return node.target


class InputStep(nn.Module):
    """The occluded image as a change: the patch's content at each position. A constant fill
    [C, *size] is the same everywhere; a :class:`kfx.fills.PositionalFill` (the covered region's
    mean, a blurred copy, a mask) computes each window's content from the unoccluded image."""

    def __init__(self, fill, size: tuple[int, ...]):
        super().__init__()
        self.positional = None if isinstance(fill, torch.Tensor) else fill
        self.register_buffer("fill", fill if self.positional is None else None, persistent=False)
        self.size = size

    def forward(self, positions: torch.Tensor, image: torch.Tensor) -> Patches:
        if self.positional is not None:
            return Patches(self.positional.content(image, positions, self.size), positions, positions)
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


def always_inside(patch: tuple[AxisBoxes, ...], window: tuple[AxisBoxes, ...]) -> bool:
    """True if, at every position, the changed box lies wholly inside the window (paste can scatter)."""
    return all(
        w <= p and p + pa.width <= w + wa.width
        for pa, wa in zip(patch, window)
        for p, w in set(zip(pa.starts, wa.starts))  # distinct pairs: most coordinates repeat one
    )


class _WindowedStep(_BoxedStep):
    """A step that reads each position's read-in window of its input's base, the change pasted in."""

    def __init__(self, meta: NodePatch, in_meta: NodePatch, device, backend: str):
        super().__init__(meta.box, device)
        self.backend = backend
        self.register_buffer("read_starts", _table(meta.read, device), persistent=False)
        self.read_size = tuple(r.width for r in meta.read)
        self.inside = always_inside(in_meta.box, meta.read)

    def read_origin(self, positions: torch.Tensor) -> torch.Tensor:
        """Each position's read-in window origin [N, axes] in the unpadded input."""
        return _look_up(self.read_starts, positions)

    def windows(self, base: torch.Tensor, patches: Patches) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows [N, C, *read size] and their origins [N, axes]."""
        read = self.read_origin(patches.positions)
        windows = kernels.read_windows(
            self.backend,
            base,
            read,
            self.read_size,
            patches.values,
            patches.origin - read,
            inside=self.inside,
        )
        return windows, read


class LocalStep(_WindowedStep):
    """Conv/pool/pad on read-in windows: gather from the padded base, paste the change, run the op."""

    def __init__(
        self,
        meta: NodePatch,
        in_meta: NodePatch,
        offset: tuple[int, ...],
        module,
        device,
        dtype,
        backend: str = "torch",
    ):
        super().__init__(meta, in_meta, device, backend)
        self.spec = meta.local
        self.op = module  # registers a conv's parameters with the program (None for functional ops)
        self.offset = offset  # the padded base's margins before each axis
        divisor = meta.local.divisor
        self.register_buffer(
            "divisor",
            None if divisor is None else divisor.to(device=device, dtype=dtype)[None],
            persistent=False,
        )

    def forward(self, padded_base: torch.Tensor, patches: Patches, *consts) -> Patches:
        positions = patches.positions
        read = self.read_origin(positions)
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


class CoveredLocalStep(LocalStep):
    """A conv/pool whose read-in window is the input's changed box itself at every position (a 1x1
    conv after a merge or a channel concat, DenseNet's bottlenecks): the windows are the change, so
    the step runs the op on it and reads no base activation, which then need not be kept."""

    def forward(self, patches: Patches, *consts) -> Patches:
        out = self.spec.apply(patches.values, *consts)
        origin = self.origin(patches.positions)
        if self.divisor is not None:
            out = out / kernels.gather_windows(self.divisor, origin, self.size)
        return Patches(out, patches.positions, origin)


class TransposedStep(_WindowedStep):
    """A transposed conv on read-in windows: run it with no padding, then crop each position's box
    out of its window's result, at box origin + padding - window origin * stride (§2.10)."""

    def __init__(self, meta: NodePatch, in_meta: NodePatch, module, device, backend: str = "torch"):
        super().__init__(meta, in_meta, device, backend)
        self.spec = meta.transposed
        self.op = module  # registers a module's parameters with the program (None for the functional form)
        self.register_buffer("padding", torch.tensor(self.spec.padding, device=device), persistent=False)
        self.register_buffer("stride", torch.tensor(self.spec.stride, device=device), persistent=False)

    def forward(self, base: torch.Tensor, patches: Patches, *consts) -> Patches:
        windows, read = self.windows(base, patches)
        result = self.spec.apply(windows, *consts)  # [N, C_out, *window result]
        origin = self.origin(patches.positions)
        offset = origin + self.padding - read * self.stride
        n, axes = offset.shape
        # One index tensor per axis, broadcast to [N, *box]: each position's box in its window's result.
        index = [torch.arange(n, device=offset.device).view(n, *(1,) * axes)]
        for axis, width in enumerate(self.size):
            along = offset[:, axis, None] + torch.arange(width, device=offset.device)
            index.append(along.view(n, *(width if d == axis else 1 for d in range(axes))))
        boxes = result.movedim(1, -1)[tuple(index)]
        return Patches(boxes.movedim(-1, 1), patches.positions, origin)


class ResampleStep(_WindowedStep):
    """Interpolation on read-in windows: gather from the base, paste the change, and apply each
    position's block of every axis's resampling matrix, for images out = A_h[box, window] @ x @
    A_w[box, window]^T (docs/design.md §2.8)."""

    def __init__(self, meta: NodePatch, in_meta: NodePatch, device, dtype, backend: str = "torch"):
        super().__init__(meta, in_meta, device, backend)
        self.axes = len(meta.resample.matrices)
        for axis, matrix in enumerate(meta.resample.matrices):
            self.register_buffer(f"matrix_{axis}", matrix.to(device=device, dtype=dtype), persistent=False)

    def _rows(self, matrix: torch.Tensor, out_start, out_width: int, in_start, in_width: int) -> torch.Tensor:
        """Each position's block of ``matrix``: [N, out_width, in_width]."""
        rows = out_start[:, None] + torch.arange(out_width, device=matrix.device)
        columns = in_start[:, None] + torch.arange(in_width, device=matrix.device)
        return matrix[rows[:, :, None], columns[:, None, :]]

    def forward(self, base: torch.Tensor, patches: Patches) -> Patches:
        windows, read = self.windows(base, patches)
        origin = self.origin(patches.positions)
        blocks = [
            self._rows(matrix, origin[:, a], self.size[a], read[:, a], self.read_size[a])
            for a, matrix in enumerate(getattr(self, f"matrix_{axis}") for axis in range(self.axes))
        ]
        return Patches(apply_per_axis(windows, blocks), patches.positions, origin)


class MergeStep(_BoxedStep):
    """Element-wise op or channel concat over the union box: window each spatial operand."""

    def __init__(
        self,
        meta: NodePatch,
        target,
        windowed: dict[int, int | None],
        inside: bool,
        device,
        backend: str,
        offsets: tuple[tuple[tuple[int, ...], ...], ...],
    ):
        super().__init__(meta.box, device)
        self.target = target
        # flat leaf index in (args, kwargs) -> index into bases, or None for an operand whose changed
        # box is this step's box: its values are the window
        self.windowed = windowed
        self.inside = inside
        self.backend = backend
        # per base, per piece: where the piece's map starts in it (a padded copy that a conv keeps
        # anyway serves the merge too; zeros for a base as it is). A base is one tensor, or the
        # pieces of a concat whose windows stack to its window (kfx.passes.slots).
        self.offsets = [
            [torch.tensor(offset, device=device) if any(offset) else None for offset in pieces]
            for pieces in offsets
        ]

    def _window(self, base, base_index: int, origin: torch.Tensor, leaf) -> torch.Tensor:
        """The operand's window at ``origin``: its base's, with a changed operand's patch pasted."""
        pieces = base if isinstance(base, (tuple, list)) else (base,)
        at = [origin if offset is None else origin + offset for offset in self.offsets[base_index]]
        changed = isinstance(leaf, Patches)
        if len(pieces) == 1 and changed:
            rel = leaf.origin - origin
            return kernels.read_windows(
                self.backend, pieces[0], at[0], self.size, leaf.values, rel, inside=self.inside
            )
        windows = [kernels.gather_windows(piece, a, self.size) for piece, a in zip(pieces, at)]
        window = windows[0] if len(windows) == 1 else torch.cat(windows, 1)
        if not changed:  # a constant spatial operand: its window, unchanged
            return window
        return kernels.paste(window, origin, leaf.values, leaf.origin, inside=self.inside)

    def forward(self, bases: tuple[torch.Tensor, ...], *args, **kwargs) -> Patches:
        leaves, spec = tree_flatten((args, kwargs))
        positions = next(leaf.positions for leaf in leaves if isinstance(leaf, Patches))
        origin = self.origin(positions)
        for leaf_index, base_index in self.windowed.items():
            leaf = leaves[leaf_index]
            if base_index is None:
                leaves[leaf_index] = leaf.values
                continue
            leaves[leaf_index] = self._window(bases[base_index], base_index, origin, leaf)
        args, kwargs = tree_unflatten(leaves, spec)
        return Patches(self.target(*args, **kwargs), positions, origin)


class ChannelStep(nn.Module):
    """A reshape/transpose/permute/chunk/split over channels: run it on the changed values.

    Reshapes take their full output shape with the batch and spatial dims of the patch, so the
    shape arguments traced from ``x.size()`` are not needed.
    """

    def __init__(self, target, reshape_to: tuple[int, ...] | None, axes: int = 2):
        super().__init__()
        self.target = target
        self.reshape_to = reshape_to
        self.axes = axes

    def forward(self, patches: Patches, *args, **kwargs):
        values = patches.values
        if self.reshape_to is not None:
            box = values.shape[-self.axes :]
            out = values.reshape(values.shape[0], *self.reshape_to[1 : -self.axes], *box)
        else:
            out = self.target(values, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return Patches(out, patches.positions, patches.origin)
        return tuple(Patches(v, patches.positions, patches.origin) for v in out)


class ShapeStep(nn.Module):
    """A metadata query of an incremental value (``kfx.passes.ops.SHAPE_ATTRIBUTES``, ``SHAPE_METHODS``):
    the full tensor's answer, with the batch of positions as its batch."""

    def __init__(self, target: str, full_shape: tuple[int, ...]):
        super().__init__()
        self.target = target
        self.full_shape = full_shape

    def forward(self, patches: Patches, *args, **kwargs):
        shape = torch.Size((patches.values.shape[0], *self.full_shape[1:]))
        dim = args[0] if args else kwargs.get("dim")  # x.size(1) or x.size(dim=1)
        answers = {
            "shape": lambda: shape,
            "size": lambda: shape if dim is None else shape[dim],
            "ndim": lambda: len(shape),
            "dim": lambda: len(shape),
            "numel": shape.numel,
            "dtype": lambda: patches.values.dtype,
            "device": lambda: patches.values.device,
            "is_cuda": lambda: patches.values.is_cuda,
        }
        return answers[self.target]()


class MeanDeltaStep(nn.Module):
    """Global average pooling from the base mean and the box's change (exact, docs/design.md §2.6);
    with ``kind="norm"`` the L2 norm over the spatial dims, from the base's squared norm and the
    box's change of squares. ``spatial``: the spatial dims of a map in another layout (channels-last),
    None for the usual last ones."""

    def __init__(
        self,
        in_size: tuple[int, ...],
        out_shape: tuple[int, ...],
        kind: str = "mean",
        spatial: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.area = math.prod(in_size)
        self.out_shape = out_shape
        self.kind = kind
        self.spatial = spatial

    def forward(self, base_in: torch.Tensor, base_out: torch.Tensor, patches: Patches) -> torch.Tensor:
        values, axes = patches.values, patches.origin.shape[1]
        if self.spatial is not None:  # the spatial dims to the end; the base has no batch dim
            tail = tuple(range(-axes, 0))
            values = values.movedim(self.spatial, tail)
            base_in = base_in.movedim(tuple(d - 1 for d in self.spatial), tail)
        n, box = values.shape[0], tuple(values.shape[-axes:])
        values = values.reshape(n, -1, *box)  # every channel dim as one, in order
        old = kernels.gather_windows(base_in.reshape(-1, *base_in.shape[-axes:]), patches.origin, box)
        summed = tuple(range(2, 2 + axes))
        base = base_out.reshape(1, -1)
        if self.kind == "norm":
            squares = base * base + (values * values - old * old).sum(dim=summed)
            out = squares.clamp_min(0).sqrt()
        else:
            out = base + (values - old).sum(dim=summed) / self.area
        return out.view(n, *self.out_shape[1:])


class GroupNormStep(nn.Module):
    """GroupNorm / InstanceNorm under ``global_context="local"`` (approximate, docs/design.md §4.4):
    each position's group statistics exactly, from the base map's and the box's change, applied
    inside the box only. Sums are taken about the base's group mean, so float32 keeps its digits."""

    def __init__(self, groups: int, eps: float, module: nn.Module | None):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.op = module  # registers a module's weight and bias with the program (None: functional)

    def forward(self, base_in: torch.Tensor, patches: Patches, weight=None, bias=None) -> Patches:
        if self.op is not None:
            weight, bias = self.op.weight, self.op.bias
        values, g = patches.values, self.groups
        n, c, *box = values.shape
        old = kernels.gather_windows(base_in, patches.origin, tuple(box)).reshape(n, g, -1)
        grouped = base_in.reshape(g, -1)
        count = grouped.shape[1]
        centre = grouped.mean(dim=1)[None, :, None]  # [1, g, 1]
        second = grouped.var(dim=1, unbiased=False)[None, :]  # E[(x - centre)^2] of the base, [1, g]
        new = values.reshape(n, g, -1) - centre
        old = old - centre
        shift = (new - old).sum(dim=2) / count
        variance = second + (new * new - old * old).sum(dim=2) / count - shift * shift
        out = (new - shift[..., None]) * torch.rsqrt(variance + self.eps)[..., None]
        out = out.view(n, c, *box)
        affine = (1, c, *(1,) * len(box))
        if weight is not None:
            out = out * weight.view(affine)
        if bias is not None:
            out = out + bias.view(affine)
        return Patches(out, patches.positions, patches.origin)


class ProjectStep(nn.Module):
    """Projection to full: paint the changes into N copies of the base (docs/design.md §2.6). A
    channels-last map (``spatial``: its spatial dims) has them moved to the end for the kernel and back."""

    def __init__(self, backend: str = "torch", spatial: tuple[int, ...] | None = None):
        super().__init__()
        self.backend = backend
        self.spatial = spatial

    def forward(self, base: torch.Tensor, patches: Patches) -> torch.Tensor:
        values = patches.values  # [N, *channel dims, *box]: channel dims flatten to one for the kernel
        axes = patches.origin.shape[1]
        tail = tuple(range(-axes, 0))
        if self.spatial is not None:  # the base has no batch dim: its spatial dims are one lower
            values = values.movedim(self.spatial, tail)
            base = base.movedim(tuple(d - 1 for d in self.spatial), tail)
        full = kernels.project_to_full(
            self.backend,
            base.reshape(-1, *base.shape[-axes:]),
            values.reshape(values.shape[0], -1, *values.shape[-axes:]),
            patches.origin,
        ).view(values.shape[0], *base.shape)
        return full if self.spatial is None else full.movedim(tail, self.spatial)


class DensePoolStep(nn.Module):
    """A max- or average-pool with one divisor everywhere, run on full values (past the plan's switch
    to full, or past a global node) on CPU by kfx's window pools, which are several times faster
    there than torch's (kfx/kernels/pooling.py): the op's padding goes on first (``pads``, in
    ``F.pad``'s order; a negative one crops what the op never reads), then the pool runs with none,
    as a :class:`LocalStep` runs it on its windows."""

    def __init__(self, spec, pads: tuple[int, ...]):
        super().__init__()
        self.spec, self.pads = spec, pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, value=self.spec.pad_value)
        return self.spec.apply(x)
