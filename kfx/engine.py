"""``kfx.compile``: turn a CNN into an engine that computes occlusion heat maps incrementally."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from kfx import kernels
from kfx.cost import CostReport, static_cost
from kfx.errors import InputError, ModelError, PatchError
from kfx.memory import MemoryEstimate, estimate_memory, parse_bytes
from kfx.passes import META_KEY, BaseSlot, annotate, build_program
from kfx.passes.trace import require_eval_module
from kfx.patch import Patch, check_positions, grid_positions
from kfx.results import DenseNode, Heatmap, Progress
from kfx.validation import check_batch_size, check_class_index

if TYPE_CHECKING:
    from kfx.tuning import Tuning

__all__ = ["compile", "paper_cost", "Engine", "Compiled", "Heatmap", "Progress", "DenseNode"]

DEFAULT_BATCH_SIZE = 64  # positions per batch when none is given
MAX_MEMORY_BATCH = 256  # max_memory never picks more: larger batches stop paying off on CPU
# The static estimate (kfx.memory) undercounts peak RSS by 10-40% on VGG16/ResNet18/Inception v3
# (allocator slack, conv scratch); max_memory divides the budget by this before choosing.
MEMORY_SAFETY = 1.5


@dataclass(frozen=True)
class _Base:
    """The unoccluded image's run: its output and the base activations the incremental program reads."""

    image: torch.Tensor  # a copy: the cache key, with the weights' versions
    versions: tuple[int, ...]
    output: torch.Tensor
    activations: list[torch.Tensor]


def model_state(model: nn.Module) -> tuple[tuple, tuple[int, ...]]:
    """(identity, versions) of the model's parameters and buffers.

    identity changes when a tensor is replaced, re-allocated, or converted (what the traced graph
    cannot follow); versions change on every in-place write (load_state_dict, optimizer steps,
    BatchNorm statistics), which the graph does follow.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    identity = tuple((name, id(t), t.data_ptr(), t.dtype, t.device) for name, t in tensors)
    return identity, tuple(t._version for _, t in tensors)


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype.is_floating_point:
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _base_program(gm: fx.GraphModule, sources: list[str]) -> fx.GraphModule:
    """A copy of the model that also returns the activations the incremental program reads."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_map)
    by_name = {node.name: node for node in gm.graph.nodes}
    graph.output((output, tuple(value_map[by_name[name]] for name in sources)))
    return fx.GraphModule(gm, graph, class_name="BaseProgram")


@dataclass(frozen=True)
class Compiled:
    """What :func:`compile` builds for one (model, image shape, patch): no run-time state.

    ``graph_module`` is the annotated trace (``node.meta["kfx_patch"]``), ``program`` the incremental
    program reading the base activations named by ``slots``, ``base_program`` the model plus those
    activations. ``tuning`` holds :func:`kfx.tune`'s measurements when it chose ``tau``.
    """

    image_shape: tuple[int, int, int]
    patch: Patch
    tau: float
    dtype: torch.dtype
    device: torch.device
    backend: str
    batch_size: int
    graph_module: fx.GraphModule
    program: fx.GraphModule
    slots: tuple[BaseSlot, ...]
    base_program: fx.GraphModule
    cost: CostReport
    memory: MemoryEstimate  # static estimate of a run: .per_image + batch size x .per_position bytes
    tuning: Tuning | None = None


class Engine:
    """A compiled occlusion engine for one (model, image shape, patch). Build it with :func:`compile`.

    Runs only: everything static comes in ``compiled``. Its one piece of state is a cache of the
    unoccluded image's activations, guarded by a lock, so one engine may serve several threads.
    """

    def __init__(self, model: nn.Module, compiled: Compiled):
        self.compiled = compiled
        # The engine reads the caller's parameters and buffers live (it shares them, it does not copy
        # them): in-place changes (load_state_dict, an optimizer step, new BatchNorm statistics) are
        # seen, and the base activations are keyed on every tensor's version counter. Replacing a
        # tensor or a module is not seen by the traced graph, so it is refused (ModelError).
        self._model = model
        self._identity, _ = model_state(model)
        self._lock = threading.Lock()  # guards _base_cache
        self._base_cache: _Base | None = None

    image_shape = property(lambda self: self.compiled.image_shape)
    patch = property(lambda self: self.compiled.patch)
    tau = property(lambda self: self.compiled.tau)
    dtype = property(lambda self: self.compiled.dtype)
    device = property(lambda self: self.compiled.device)
    backend = property(lambda self: self.compiled.backend)
    batch_size = property(lambda self: self.compiled.batch_size)
    graph_module = property(lambda self: self.compiled.graph_module)
    program = property(lambda self: self.compiled.program)
    memory = property(lambda self: self.compiled.memory)
    tuning = property(lambda self: self.compiled.tuning)

    # -- reporting ------------------------------------------------------------------------------
    @property
    def dense_nodes(self) -> list[DenseNode]:
        """Where the incremental path stops (the first dense nodes) and why."""
        return [
            DenseNode(n.name, n.meta[META_KEY].reason)
            for n in self.graph_module.graph.nodes
            if n.meta.get(META_KEY) is not None and n.meta[META_KEY].reason
        ]

    def roles(self) -> dict[str, str]:
        """Each traced node's role: input, pointwise, local, merge, const or dense."""
        return {n.name: n.meta[META_KEY].role for n in self.graph_module.graph.nodes if n.op != "output"}

    def cost(self) -> CostReport:
        """Static cost model (docs/design.md §2.7): per-layer FMAs full vs incremental; no inference."""
        return self.compiled.cost

    def __repr__(self) -> str:
        roles = self.roles().values()
        incremental = sum(r in ("pointwise", "local", "merge") for r in roles)
        dense = "; ".join(f"{d.node}: {d.reason}" for d in self.dense_nodes) or "none"
        return (
            f"kfx.Engine(image_shape={self.image_shape}, patch={self.patch.size}, stride={self.patch.stride}, "
            f"backend={self.backend!r}, tau={self.tau:g}, "
            f"incremental nodes={incremental}, dense from: {dense}, "
            f"theoretical speedup={self.compiled.cost.theoretical_speedup:.2f}x)"
        )

    # -- running --------------------------------------------------------------------------------
    def _check_image(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise InputError(f"image must be a torch.Tensor [C, H, W], got {type(image).__name__}")
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if tuple(image.shape) != tuple(self.image_shape):
            raise InputError(
                f"image has shape {list(image.shape)} but the engine was compiled for {list(self.image_shape)} "
                "([C, H, W] or [1, C, H, W]); compile another engine for this shape"
            )
        if image.dtype != self.dtype:
            raise InputError(
                f"image dtype is {image.dtype} but the model computes in {self.dtype}; "
                f"convert it with image.to({self.dtype})"
            )
        if image.is_meta:
            raise InputError("the image is on the meta device (a shape without values); pass a real tensor")
        if not torch.isfinite(image).all():
            raise InputError("image holds NaN or infinite values; occlusion maps need finite pixels")
        return image.to(self.device).unsqueeze(0)

    def _versions(self) -> tuple[int, ...]:
        """The version counters of the model's tensors; ModelError if the model changed otherwise."""
        require_eval_module(self._model, "running a kfx engine")
        identity, versions = model_state(self._model)
        if identity != self._identity:
            raise ModelError(
                "the model's parameters, buffers or modules were replaced (or moved to another dtype or "
                "device) after kfx.compile, and the compiled graph still holds the old ones; compile a new "
                "engine for the changed model"
            )
        return versions

    def _prepare(self, image: torch.Tensor) -> _Base:
        """Run the unoccluded image once; keep (and reuse for the same image and weights) its activations."""
        versions = self._versions()
        with self._lock:
            cached = self._base_cache
            if cached is not None and cached.versions == versions and torch.equal(cached.image, image):
                return cached
            with torch.no_grad():
                output, activations = self.compiled.base_program(image)
                prepared = [
                    kernels.pad_base(act, slot.margins, slot.pad_value)
                    for act, slot in zip(activations, self.compiled.slots)
                ]
            self._base_cache = _Base(image.clone(), versions, output, prepared)
            return self._base_cache

    def _batches(
        self, base: _Base, positions: torch.Tensor, batch_size: int | None
    ) -> Iterator[torch.Tensor]:
        step = self.batch_size if batch_size is None else check_batch_size(batch_size)
        positions = positions.to(self.device)
        for start in range(0, positions.shape[0], step):
            if self._versions() != base.versions:
                raise ModelError(
                    "the model's weights changed while this map was being computed; run it again"
                )
            # no_grad per batch, never held across the yield: grad mode is per thread, and a web
            # server may resume this generator on another thread.
            with torch.no_grad():
                out = self.program(positions[start : start + step], *base.activations)
            yield out

    def outputs(self, image: torch.Tensor, positions, *, batch_size: int | None = None) -> torch.Tensor:
        """The model's raw outputs [N, ...] for ``image`` occluded at each of ``positions``.

        Equal to ``model(kfx.occlude(image, positions, patch))``. ``positions`` is an integer tensor
        [N, 2] of (y, x) top-left corners; any corner where the patch fits is allowed (interactive
        mode), not only the heat-map grid.

        >>> engine.outputs(image, torch.tensor([[0, 0], [8, 12]])).shape  # doctest: +SKIP
        torch.Size([2, 1000])
        """
        image = self._check_image(image)
        positions = check_positions(positions, self.image_shape[1:], self.patch)
        base = self._prepare(image)
        batches = list(self._batches(base, positions, batch_size))
        if not batches:  # no positions: an empty batch of the model's output shape
            return base.output.new_empty((0, *base.output.shape[1:]))
        return torch.cat(batches)

    def cells_overlapping(self, pixels: torch.Tensor) -> torch.Tensor:
        """Grid cells [H_M, W_M] whose patch window touches a True pixel of ``pixels`` [H, W].

        Turns a user's selection (a rectangle or brush strokes, as a pixel mask) into the ``cells``
        argument of :meth:`__call__` / :meth:`stream`.
        """
        hw = tuple(self.image_shape[1:])
        if not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != hw:
            raise InputError(f"the selection must be a [H, W] = {list(hw)} mask tensor")
        mask = pixels.detach().to("cpu", torch.float32)[None, None]
        return F.max_pool2d(mask, self.patch.size, self.patch.stride)[0, 0] > 0

    def _check_cells(self, cells) -> torch.Tensor:
        grid = self.patch.grid_shape(tuple(self.image_shape[1:]))
        if cells is None:
            return torch.ones(grid, dtype=torch.bool)
        if not isinstance(cells, torch.Tensor) or cells.dtype != torch.bool or tuple(cells.shape) != grid:
            raise InputError(
                f"cells must be a bool tensor of the heat-map shape {list(grid)} (True = evaluate); "
                "engine.cells_overlapping(pixel_mask) builds one from a pixel selection"
            )
        return cells.cpu()

    def _check_target(self, base_output: torch.Tensor, target) -> tuple[int, torch.Tensor]:
        if base_output.dim() != 2 or base_output.shape[0] != 1:
            raise ModelError(
                f"heat maps need a model that returns [1, num_classes] scores; this one returns shape "
                f"{list(getattr(base_output, 'shape', []))}. Use engine.outputs(image, positions) instead"
            )
        num_classes = base_output.shape[1]
        base_probs = torch.softmax(base_output, dim=1)[0]
        if not torch.isfinite(base_probs).all():
            raise ModelError(
                "the model's scores for the unoccluded image hold NaN or infinite values, so no map can be "
                "read from them; check the model's weights and the image's scaling"
            )
        target = int(base_probs.argmax()) if target is None else check_class_index(target, num_classes)
        return target, base_probs

    def stream(
        self,
        image: torch.Tensor,
        target: int | None = None,
        *,
        cells: torch.Tensor | None = None,
        batch_size: int | None = None,
        drill_down=None,
    ) -> Iterator[Progress]:
        """The heat map filling in: one :class:`Progress` after each batch of positions.

        Unevaluated cells are NaN. ``cells`` (bool [H_M, W_M]) restricts the run to a selection
        (interactive mode). ``drill_down`` (a :class:`kfx.DrillDown`) streams the two-stage
        approximate map instead (``drill_down.stream(engine, ...)``). To cancel, stop iterating
        (``break``, or ``close()`` the generator): no further batch runs. Input is checked before
        the first batch.

        >>> for step in engine.stream(image):  # doctest: +SKIP
        ...     print(f"{step.done}/{step.total}")
        """
        if drill_down is not None:
            if cells is not None:
                raise InputError(
                    "drill_down chooses its own cells; pass either cells (interactive mode) or drill_down"
                )
            if not callable(getattr(drill_down, "stream", None)):
                raise InputError(f"drill_down must be a kfx.DrillDown, got {type(drill_down).__name__}")
            return drill_down.stream(self, image, target, batch_size)
        started = time.perf_counter()
        image = self._check_image(image)
        selected = self._check_cells(cells)
        if batch_size is not None:
            check_batch_size(batch_size)
        base = self._prepare(image)
        target, base_probs = self._check_target(base.output, target)
        return self._fill(base, target, float(base_probs[target]), selected, batch_size, started)

    def _fill(self, base_run: _Base, target, base, selected, batch_size, started) -> Iterator[Progress]:
        hw = tuple(self.image_shape[1:])
        values = torch.full(selected.shape, float("nan"), dtype=self.dtype)
        flat = values.view(-1)
        indices = selected.view(-1).nonzero()[:, 0]
        positions = grid_positions(hw, self.patch)[indices]
        done = 0
        for out in self._batches(base_run, positions, batch_size):
            flat[indices[done : done + out.shape[0]]] = torch.softmax(out, dim=1)[:, target].cpu()
            done += out.shape[0]
            heatmap = Heatmap(values.clone(), target, base, self.patch, hw, tau=self.tau)
            yield Progress(heatmap, done, len(indices), time.perf_counter() - started)
        if not len(indices):
            heatmap = Heatmap(values, target, base, self.patch, hw, tau=self.tau)
            yield Progress(heatmap, 0, 0, time.perf_counter() - started)

    def __call__(
        self,
        image: torch.Tensor,
        target: int | None = None,
        *,
        cells: torch.Tensor | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        drill_down=None,
    ) -> Heatmap:
        """The occlusion heat map of ``image`` for class ``target`` (default: the predicted class).

        ``cells`` (bool [H_M, W_M]) evaluates only a selection (the rest is NaN);
        ``show_progress`` draws a tqdm bar with positions per second. ``drill_down`` (a
        :class:`kfx.DrillDown`) computes the map approximately in two stages (docs/design.md §4.2): a coarse
        stage 1, then the target stride only in the cells with the largest drops; the rest is
        interpolated from stage 1 and ``heatmap.measured`` marks which cells were queried.
        """
        steps = self.stream(image, target, cells=cells, batch_size=batch_size, drill_down=drill_down)
        bar = (
            _progress_bar("kfx occlusion" if drill_down is None else "kfx drill-down")
            if show_progress
            else None
        )
        try:
            for step in steps:
                if bar is not None:
                    bar.total = step.total
                    bar.update(step.done - bar.n)
        finally:
            if bar is not None:
                bar.close()
        return step.heatmap


def _progress_bar(description: str):
    from tqdm.auto import tqdm

    return tqdm(total=0, unit="pos", desc=description)


def _check_model_shape_patch_tau(
    model, image_shape, patch, tau, caller: str
) -> tuple[tuple[int, int, int], Patch]:
    """The arguments kfx.compile and kfx.paper_cost share, checked: (C, H, W) and a Patch."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{caller} needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(patch, int) and not isinstance(patch, bool):
        patch = Patch(patch)
    if not isinstance(patch, Patch):
        raise PatchError(f"patch must be a kfx.Patch or an int, got {type(patch).__name__}")
    try:
        shape = tuple(int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise InputError(f"image_shape must be (C, H, W), got {image_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau <= 1):
        raise InputError(
            f"tau must be a number in (0, 1] (1 = exact, smaller = faster and more approximate), got {tau!r}"
        )
    return shape, patch


def paper_cost(
    model: nn.Module, image_shape: tuple[int, int, int], patch: Patch | int, *, tau: float = 1.0
) -> CostReport:
    """The static cost model as the KRYPTON paper counted it, to compare with its published numbers.

    It differs from ``kfx.compile(...).cost()`` (the exact engine's ceiling) in one rule only: a
    channel concatenation takes the changed box of its *last* input, not the union of all its
    inputs' boxes ([TR] Eq. 20). That rule reproduces the paper's Inception3 curves ([TR] Fig. 3,
    2.27x at patch 16 on 299x299, and Fig. 7a under tau), where the union gives 1.80x; but it is not
    exact, because the other branches change outside that box (tests/test_cost.py measures it), so
    no engine runs with it. Models without concatenations get the same numbers as ``engine.cost()``.
    No inference runs.
    """
    shape, patch = _check_model_shape_patch_tau(model, image_shape, patch, tau, "kfx.paper_cost")
    patch.check_fits(shape[1:])
    gm = annotate(model, shape, patch.size, float(tau), *_model_dtype_device(model), concat="last")
    return static_cost(gm, float(tau), concat="last")


def compile(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    patch: Patch | int,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    max_memory: int | str | None = None,
    tau: float = 1.0,
) -> Engine:
    """Compile ``model`` into an exact (or, with ``tau < 1``, approximate) incremental occlusion engine.

    Args:
        model: a CNN in eval mode that torch.fx can trace, taking one image batch [N, C, H, W].
        image_shape: (C, H, W) of the images to explain.
        patch: a :class:`kfx.Patch` (or an int, for a square patch of that size with default stride
            and fill).
        batch_size: patch positions evaluated per batch (default 64).
        max_memory: instead of ``batch_size``, a memory budget for one run (bytes, or a string such
            as "2GB" or "512MiB"): the largest batch (at most 256) whose static estimate
            (``engine.memory``, times a 1.5 safety margin) fits. Set one of the two, not both.
        dtype: the images' dtype; defaults to the dtype of the model's parameters (needed only for
            models without floating-point parameters or buffers).
        backend: kernels for gather/paste/conv/projection: "torch" (plain torch, any device),
            "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), or "auto": Triton for
            CUDA models when triton runs, torch otherwise.
        tau: projective-field threshold in (0, 1] (docs/design.md §4.1, [TR] Eqs. 21-27). Each conv and pool
            recomputes at most round(tau * H_out) x round(tau * W_out) outputs around the patch and
            drops the changes beyond them: faster, approximate. 1 (the default) is exact, by the
            same code. ``kfx.tune`` picks tau for a target SSIM; ``engine.cost()`` shows its speedup.

    Returns:
        An :class:`Engine`; ``engine(image)`` gives the heat map, ``engine.outputs(image, positions)``
        the raw outputs for any positions, ``engine.cost()`` the static cost model.

    >>> engine = kfx.compile(model.eval(), (3, 224, 224), kfx.Patch(16, stride=4))  # doctest: +SKIP
    >>> heatmap = engine(image)  # doctest: +SKIP
    """
    shape, patch = _check_model_shape_patch_tau(model, image_shape, patch, tau, "kfx.compile")
    if batch_size is not None:
        check_batch_size(batch_size)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if max_memory is not None:
        if batch_size is not None:
            raise InputError("give batch_size or max_memory, not both (max_memory picks the batch size)")
        try:
            max_memory = parse_bytes(max_memory)
        except (ValueError, OverflowError):
            raise InputError(
                f"max_memory must be bytes (an int) or a size such as '2GB' or '512MiB', got {max_memory!r}"
            ) from None
        if max_memory < 1:
            raise InputError(f"max_memory must be positive, got {max_memory}")
    return Engine(model, _build(model, shape, patch, batch_size, dtype, backend, max_memory, float(tau)))


def _build(model, image_shape, patch: Patch, batch_size, dtype, backend, max_memory, tau) -> Compiled:
    """Run the pipeline: annotate, rewrite, cost and memory models, batch size (docs/design.md §3)."""
    model_dtype, device = _model_dtype_device(model)
    dtype = dtype or model_dtype
    backend = kernels.resolve_backend(backend, device)
    patch.check_fits(tuple(image_shape[1:]))
    gm = annotate(model, image_shape, patch.size, tau, dtype, device)
    program = build_program(gm, patch.fill_tensor(image_shape[0], dtype, device), backend)
    sources = [slot.source for slot in program.slots]
    memory = estimate_memory(gm, sources, torch.empty((), dtype=dtype).element_size())
    if max_memory is not None:
        batch_size = _batch_size_for(memory, max_memory)
    return Compiled(
        image_shape=tuple(image_shape),
        patch=patch,
        tau=tau,
        dtype=dtype,
        device=device,
        backend=backend,
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        graph_module=gm,
        program=program.module,
        slots=tuple(program.slots),
        base_program=_base_program(gm, sources),
        cost=static_cost(gm, tau),
        memory=memory,
    )


def _batch_size_for(memory: MemoryEstimate, max_memory: int) -> int:
    """The largest batch (at most MAX_MEMORY_BATCH) whose estimate, times MEMORY_SAFETY, fits."""
    fits = memory.largest_batch(int(max_memory / MEMORY_SAFETY))
    if fits < 1:
        need = memory.batch_bytes(1) * MEMORY_SAFETY / 2**20
        raise InputError(
            f"max_memory={max_memory / 2**20:.0f} MiB is below what one patch position needs "
            f"(about {need:.0f} MiB with kfx's safety margin); raise it or use a smaller image"
        )
    return min(fits, MAX_MEMORY_BATCH)
