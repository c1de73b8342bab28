"""``kfx.compile``: turn a CNN into an engine that computes occlusion heat maps incrementally."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from kfx import kernels
from kfx.common import DEFAULT_BATCH_SIZE, model_dtype_device
from kfx.cost import CostReport, static_cost
from kfx.errors import InputError, ModelError, PatchError
from kfx.measured_plan import PathTimer
from kfx.memory import MemoryEstimate, estimate_memory, parse_bytes
from kfx.model_state import Settings, model_state
from kfx.passes import (
    CHANNELS_LAST_KEY,
    META_KEY,
    BaseSlot,
    annotate,
    build_base_program,
    build_program,
)
from kfx.passes.patch_prop import GLOBAL_CONTEXT_MODES
from kfx.passes.plan import PLAN_MODES, Plan, Rates, apply_plan, choose_plan, machine_rates
from kfx.passes.trace import plain_attributes
from kfx.patch import Patch, occlude
from kfx.results import DenseNode, Heatmap, Progress
from kfx.runner import OcclusionRunner
from kfx.validation import check_batch_size

__all__ = ["compile", "paper_cost", "Engine", "Compiled", "Heatmap", "Progress", "DenseNode"]

DEFAULT_PLAN = "auto"  # what kfx.compile(plan=None) runs (tests/conftest.py pins "incremental")
MAX_MEMORY_BATCH = 256  # max_memory never picks more: larger batches stop paying off on CPU
# The static estimate (kfx.memory) undercounts peak RSS by 10-40% on VGG16/ResNet18/Inception v3
# (allocator slack, conv scratch); max_memory divides the budget by this before choosing.
MEMORY_SAFETY = 1.5
# A model without floating-point weights computes in torch's default dtype, on the CPU.
_NO_WEIGHTS = (torch.get_default_dtype(), torch.device("cpu"))


@dataclass(frozen=True)
class _Base:
    """The unoccluded image's run: its output and the base activations the incremental program reads."""

    image: torch.Tensor  # a copy: the cache key, with the weights' versions
    versions: tuple  # Engine._versions()
    output: torch.Tensor
    activations: list[torch.Tensor]


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
    global_context: str  # "exact", or "local": squeeze-excitation gates inside the changed box only
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
    tuning: object | None = None  # a kfx.Tuning (kfx.tuning imports this module, not the reverse)
    plan: Plan | None = None  # where the program runs incrementally and where fully (docs/design.md §3.8)
    # plan="auto": time the program against full inference on the first batches (kfx.measured_plan)
    measure_plan: bool = False
    # the base program makes the image channels-last, so the program runs in that layout (§3.6)
    channels_last: bool = False


class Engine(OcclusionRunner):
    """A compiled occlusion engine for one (model, image shape, patch). Build it with :func:`compile`.

    Runs only: everything static comes in ``compiled``. Its one piece of state is a cache of the
    unoccluded image's activations, guarded by a lock, so one engine may serve several threads.
    """

    def __init__(self, model: nn.Module, compiled: Compiled):
        self.compiled = compiled
        # The engine reads the caller's parameters and buffers live (it shares them, it does not copy
        # them): in-place changes (load_state_dict, an optimizer step, new BatchNorm statistics) are
        # seen, and the base activations are keyed on every tensor's version counter. Replacing a
        # tensor or a module, or changing a setting or a hook, is not seen by the traced graph, so it
        # is refused (ModelError; kfx.model_state).
        self._model = model
        self._compiled_state = model_state(model)
        self._compiled_settings = Settings(model, plain_attributes(compiled.graph_module))
        self._lock = threading.Lock()  # guards _base_cache
        self._base_cache: _Base | None = None
        self._timer = PathTimer(compiled.device) if compiled.measure_plan else None

    image_shape = property(lambda self: self.compiled.image_shape)
    patch = property(lambda self: self.compiled.patch)
    tau = property(lambda self: self.compiled.tau)
    global_context = property(lambda self: self.compiled.global_context)
    dtype = property(lambda self: self.compiled.dtype)
    device = property(lambda self: self.compiled.device)
    backend = property(lambda self: self.compiled.backend)
    batch_size = property(lambda self: self.compiled.batch_size)
    graph_module = property(lambda self: self.compiled.graph_module)
    program = property(lambda self: self.compiled.program)
    memory = property(lambda self: self.compiled.memory)
    tuning = property(lambda self: self.compiled.tuning)

    @property
    def plan(self) -> Plan | None:
        """The plan, with what the first batches measured once they have (plan="auto")."""
        plan = self.compiled.plan
        if self._timer is None:
            return plan
        if self._timer.result is not None:
            return replace(plan, measured=self._timer.result)
        if plan.estimated_full:  # its reason says so already
            return plan
        pending = "timed against full inference on the first full-size batches"
        return replace(plan, reason=f"{plan.reason}; {pending}")

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
        incremental = sum(r in ("pointwise", "gate", "norm", "local", "merge") for r in roles)
        dense = "; ".join(f"{d.node}: {d.reason}" for d in self.dense_nodes) or "none"
        return (
            f"kfx.Engine(image_shape={self.image_shape}, patch={self.patch.size}, stride={self.patch.stride}, "
            f"backend={self.backend!r}{', channels-last' if self.compiled.channels_last else ''}, "
            f"tau={self.tau:g}, global_context={self.global_context!r}, "
            f"incremental nodes={incremental}, dense from: {dense}, "
            f"theoretical speedup={self.compiled.cost.theoretical_speedup:.2f}x"
            + ("" if self.plan is None else f", {self.plan.summary()}")
            + ")"
        )

    # -- running --------------------------------------------------------------------------------
    def _versions(self) -> tuple:
        """What the cached unoccluded activations are keyed on: the version counters of the model's
        tensors (and, for an engine that only runs the eager model, its settings and hooks);
        ModelError if the model changed in a way the engine cannot follow."""
        state = model_state(self._model)
        if self._timer is None and self.compiled.plan.full_inference:
            # only the caller's eager model runs: nothing was baked in by the trace, so a changed
            # setting or hook is followed (the cached unoccluded output is keyed on them)
            state.check_unchanged_since(self._compiled_state, None)
            return (*state.versions, self._compiled_settings.now(self._model))
        state.check_unchanged_since(self._compiled_state, self._compiled_settings)
        return state.versions

    def _prepare(self, image: torch.Tensor) -> _Base:
        """Run the unoccluded image once; keep (and reuse for the same image and weights) its activations."""
        versions = self._versions()
        with self._lock:
            cached = self._base_cache
            if cached is not None and cached.versions == versions and torch.equal(cached.image, image):
                return cached
            with torch.no_grad():
                if (
                    self._runs_fully() and not self._measuring()
                ):  # no program reads activations: the plain model
                    output, prepared = self._model(image), []
                else:
                    output, prepared = self.compiled.base_program(image)  # padded as slots say
                    prepared = list(prepared)
            self._base_cache = _Base(image.clone(), versions, output, prepared)
            return self._base_cache

    def _batches(
        self, base: _Base, positions: torch.Tensor, batch_size: int | None
    ) -> Iterator[torch.Tensor]:
        step = self._step(batch_size)
        positions = positions.to(self.device)
        for start in range(0, positions.shape[0], step):
            if self._versions() != base.versions:
                raise ModelError(
                    "the model's weights changed while this map was being computed; run it again"
                )
            # no_grad per batch, never held across the yield: grad mode is per thread, and a web
            # server may resume this generator on another thread.
            with torch.no_grad():
                out = self._evaluate(base, positions[start : start + step], step)
            yield out

    def _evaluate(self, base: _Base, positions: torch.Tensor, step: int) -> torch.Tensor:
        timer = self._timer
        path = None if timer is None else timer.path_to_time(positions.shape[0], step)
        if path is not None:
            run = self._full_inference if path == "full" else self._incremental
            return timer.timed(path, lambda: run(base, positions), positions.shape[0])
        if self._runs_fully():
            return self._full_inference(base, positions)
        return self._incremental(base, positions)

    def _measuring(self) -> bool:
        return self._timer is not None and self._timer.result is None

    def _runs_fully(self) -> bool:
        """Full inference now: measured faster, or (until measured) the plan's choice or estimate."""
        measured = None if self._timer is None else self._timer.result
        return self.compiled.plan.full_inference if measured is None else measured.full_inference

    def _incremental(self, base: _Base, positions: torch.Tensor) -> torch.Tensor:
        return self.program(positions, *base.activations)

    def _full_inference(self, base: _Base, positions: torch.Tensor) -> torch.Tensor:
        # The caller's model on occluded copies, as kfx.NaiveEngine runs it. Eager, its in-place
        # ops stay in place, which the functional trace cannot do. In chunks that hold no more than
        # the incremental program does for the batch (MemoryEstimate.full_inference_chunk).
        chunk = self.compiled.memory.full_inference_chunk(positions.shape[0])
        return torch.cat(
            [self._eager(occlude(base.image, part, self.patch)) for part in positions.split(chunk)]
        )

    def _run_model(self, copies: torch.Tensor) -> torch.Tensor:
        """The caller's model on a batch of occluded copies, in the chunks _full_inference uses."""
        chunk = self.compiled.memory.full_inference_chunk(copies.shape[0])
        return torch.cat([self._eager(part) for part in copies.split(chunk)])

    def _eager(self, copies: torch.Tensor) -> torch.Tensor:
        """The caller's model on occluded copies, channels-last where the program is (its traced
        graph gave the same output so; oneDNN's convs run up to 1.9x faster: docs/design.md §3.6)."""
        if self.compiled.channels_last:
            copies = copies.contiguous(memory_format=torch.channels_last)
        return self._model(copies)

    def save(self, path) -> None:
        """Save this engine for :func:`kfx.load`: compile arguments and the model's fingerprint, no weights."""
        from kfx.persist import save

        save(self, path)


def check_compile_arguments(model, image_shape, patch, tau, caller: str) -> tuple[tuple[int, ...], Patch]:
    """The arguments kfx.compile, kfx.paper_cost and kfx.NaiveEngine share, checked: (C, *spatial)
    with one to three spatial axes, and a Patch with as many axes."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{caller} needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(patch, int) and not isinstance(patch, bool):
        patch = Patch(patch)
    if not isinstance(patch, Patch):
        raise PatchError(f"patch must be a kfx.Patch or an int, got {type(patch).__name__}")
    try:
        shape = tuple(int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise InputError(
            f"image_shape must be (C, H, W), (C, L) or (C, D, H, W), got {image_shape!r}"
        ) from None
    if len(shape) not in (2, 3, 4) or min(shape) < 1:
        raise InputError(
            "image_shape must be positive ints: (C, H, W) for images, (C, L) for signals or (C, D, H, W) for "
            f"volumes; got {image_shape!r}"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau <= 1):
        raise InputError(
            f"tau must be a number in (0, 1] (1 = exact, smaller = faster and more approximate), got {tau!r}"
        )
    return shape, patch.for_axes(len(shape) - 1)


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
    shape, patch = check_compile_arguments(model, image_shape, patch, tau, "kfx.paper_cost")
    patch.check_fits(shape[1:])
    gm = annotate(
        model, shape, patch.size, float(tau), *model_dtype_device(model, _NO_WEIGHTS), concat="last"
    )
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
    global_context: str = "exact",
    leaf_modules: tuple = (),
    autowrap_functions: tuple = (),
    plan: str | None = None,
    plan_rates: Rates | None = None,
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
        global_context: "exact" (the default) or "local" (docs/design.md §4.4). A squeeze-excitation
            gate (``x * g``, g one value per channel computed from the whole map) changes every cell
            of its output, so the exact engine runs densely after it. "local" recomputes g exactly
            but applies its change only inside x's changed box: approximate (``heatmap.approximate``),
            and as fast as the same model without gates. ``print(engine)`` names the gates.
        leaf_modules, autowrap_functions: torch.fx's hooks for code it cannot trace (control flow
            on shapes, as in timm's ``ConvMlp``): module classes and plain functions kept as single
            calls. kfx runs them densely (exact). timm's same-padding helper needs neither: kfx
            knows it and runs it incrementally.
        plan: "auto" (the default) picks the cheapest of the incremental program, plans that run
            densely from the nodes whose changed box covers most of their map, and full inference,
            by a cost model calibrated once on this machine and cached (docs/design.md §3.8); an
            exact engine then times its program against plain batched inference on its first
            full-size batches and keeps the faster (kfx.measured_plan), so it is never much slower
            than full inference. "incremental" always runs the incremental program (incremental up
            to the first node kfx cannot run incrementally); "full" always runs batched full
            inference on the occluded images. Every plan is exact; ``engine.plan`` and
            ``print(engine)`` say what was chosen, why, and what was measured.
        plan_rates: the :class:`kfx.passes.plan.Rates` "auto" estimates with, instead of this
            machine's measured ones (``KFX_PLAN_CALIBRATE=0`` uses static CPU rates).

    Returns:
        An :class:`Engine`; ``engine(image)`` gives the heat map, ``engine.outputs(image, positions)``
        the raw outputs for any positions, ``engine.cost()`` the static cost model.

    >>> engine = kfx.compile(model.eval(), (3, 224, 224), kfx.Patch(16, stride=4))  # doctest: +SKIP
    >>> heatmap = engine(image)  # doctest: +SKIP
    """
    shape, patch = check_compile_arguments(model, image_shape, patch, tau, "kfx.compile")
    if global_context not in GLOBAL_CONTEXT_MODES:
        raise InputError(
            f"global_context must be one of {', '.join(map(repr, GLOBAL_CONTEXT_MODES))} ('exact' is exact; "
            f"'local' applies squeeze-excitation gates inside the changed box only), got {global_context!r}"
        )
    trace_hooks = _check_trace_hooks(leaf_modules, autowrap_functions)
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
    plan = DEFAULT_PLAN if plan is None else plan
    _check_plan(plan, plan_rates, float(tau), global_context)
    options = dict(global_context=global_context, trace_hooks=trace_hooks, plan=plan, plan_rates=plan_rates)
    return Engine(
        model, _build(model, shape, patch, batch_size, dtype, backend, max_memory, float(tau), **options)
    )


def _check_plan(plan, plan_rates, tau: float, global_context: str) -> None:
    if plan not in PLAN_MODES:
        raise InputError(
            f"plan must be one of {', '.join(map(repr, PLAN_MODES))} (how much runs incrementally), got {plan!r}"
        )
    if plan_rates is not None and not (isinstance(plan_rates, Rates) and plan_rates.valid()):
        raise InputError("plan_rates must be a kfx.passes.plan.Rates with positive, finite rates")
    if plan == "full" and (tau < 1 or global_context != "exact"):
        raise InputError(
            "plan='full' runs exact full inference, which tau < 1 and global_context='local' (approximate "
            "incremental modes) contradict; drop one of them"
        )


def _check_trace_hooks(leaf_modules, autowrap_functions) -> tuple[tuple, tuple]:
    """(leaf module classes, functions), checked: kfx.compile's tracer hooks."""
    try:
        leaves, functions = tuple(leaf_modules), tuple(autowrap_functions)
    except TypeError:
        raise InputError(
            "leaf_modules and autowrap_functions must be tuples (of module classes, of functions)"
        ) from None
    for leaf in leaves:
        if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
            raise InputError(
                f"leaf_modules must hold nn.Module subclasses (classes, not instances), got {leaf!r}"
            )
    for function in functions:
        if not hasattr(function, "__globals__"):
            raise InputError(f"autowrap_functions must hold plain Python functions, got {function!r}")
    return leaves, functions


def _build(
    model,
    image_shape,
    patch: Patch,
    batch_size,
    dtype,
    backend,
    max_memory,
    tau,
    *,
    global_context,
    trace_hooks,
    plan: str,
    plan_rates: Rates | None = None,
) -> Compiled:
    """Run the pipeline: annotate, rewrite, cost and memory models, batch size (docs/design.md §3)."""
    model_dtype, device = model_dtype_device(model, _NO_WEIGHTS)
    dtype = dtype or model_dtype
    backend = kernels.resolve_backend(backend, device, axes=len(image_shape) - 1)
    patch.check_fits(tuple(image_shape[1:]))
    leaves, functions = trace_hooks
    gm = annotate(
        model,
        image_shape,
        patch.size,
        tau,
        dtype,
        device,
        global_context=global_context,
        leaf_modules=leaves,
        autowrap_functions=functions,
        try_channels_last=backend == "torch",  # the Triton kernels read contiguous maps
    )
    approximate = tau < 1 or global_context != "exact"
    rates = plan_rates or (machine_rates(device, dtype) if plan == "auto" and not approximate else None)
    chosen = choose_plan(gm, plan, rates, batch_size or DEFAULT_BATCH_SIZE, approximate=approximate)
    measure = plan == "auto" and not approximate and max_memory is None  # kfx.measured_plan
    if measure and chosen.alternative is not None:  # estimated full: time its best rival against it
        chosen = chosen.alternative
    apply_plan(gm, chosen, tuple(image_shape[1:]), patch.size, tau, global_context=global_context)
    program = build_program(gm, patch, image_shape[0], dtype, device, backend)
    # Channels-last where the graph runs so (2-d images on CPU, torch backend: annotate asked only
    # then): oneDNN's convs run 1.5-2.3x faster in it on our CPU.
    channels_last = gm.meta.get(CHANNELS_LAST_KEY, False)
    sources = [slot.source for slot in program.slots]
    memory = estimate_memory(gm, sources, torch.empty((), dtype=dtype).element_size())
    if max_memory is not None:
        batch_size = _batch_size_for(memory, max_memory)
    return Compiled(
        image_shape=tuple(image_shape),
        patch=patch,
        tau=tau,
        global_context=global_context,
        dtype=dtype,
        device=device,
        backend=backend,
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        graph_module=gm,
        program=program.module,
        slots=tuple(program.slots),
        base_program=build_base_program(gm, program.slots, channels_last),
        cost=static_cost(gm, tau),
        memory=memory,
        plan=chosen,
        measure_plan=measure and chosen.chosen != "full",
        channels_last=channels_last,
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
