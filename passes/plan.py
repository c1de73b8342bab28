"""Pass 2b: the plan. Choose, per incremental node, whether it runs incrementally or fully.

Requires: an annotated graph (kfx.passes.patch_prop, no node forced dense yet).
Ensures: a :class:`Plan`: the nodes from which the program runs densely (``forced``, node name ->
reason), the estimated time per position of every candidate plan, the chosen one and why. Applying
it (:func:`apply_plan`) runs patch propagation again with those nodes forced dense; the rewrite then
projects their changed operands to full (docs/design.md §2.6, §3.8). Every plan is exact: a dense
node computes the op on full values, as full inference does.

Candidates (HyInf, ICDE 2024, chooses per layer; kfx searches a small family that follows how boxes
grow with depth): "incremental" (today's program: incremental up to the first global node),
"box >= r" for r in :data:`THRESHOLDS` (every node whose changed box covers at least r of its map
runs densely, so does everything after it), and "full" (every consumer of the image runs densely:
batched full inference on the occluded images). Each is estimated by :func:`estimate` from FMAs,
elements moved and steps, at :class:`Rates` measured on this machine (:func:`machine_rates`, cached
per machine) or given; the cheapest wins, ties going to the earlier (more incremental) candidate.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

from kfx.cost import CostReport, static_cost
from kfx.passes.layout import spatial_dims
from kfx.passes.patch_prop import META_KEY, SHAPE_ROLES, State, input_axes, propagate_patches

__all__ = [
    "PLAN_MODES",
    "THRESHOLDS",
    "WORTH",
    "Rates",
    "STATIC_CPU_RATES",
    "Candidate",
    "Plan",
    "calibrate",
    "machine_rates",
    "estimate",
    "choose_plan",
    "apply_plan",
]

PLAN_MODES = ("incremental", "auto", "full")
THRESHOLDS = (0.25, 0.4, 0.55, 0.7, 0.85, 0.95)
WORTH = 1.1  # an incremental plan is chosen over full inference only if estimated this much faster
CACHE_ENV = "KFX_CACHE_DIR"  # where calibrated rates are cached (default ~/.cache/kfx)
CALIBRATE_ENV = "KFX_PLAN_CALIBRATE"  # "0": never measure, use STATIC_CPU_RATES (CPU only)
_CACHE_VERSION = 1
# Roles whose PATCH nodes become a step of their own in the incremental program (a per-batch call).
_STEP_ROLES = (
    "input",
    "pointwise",
    "gate",
    "norm",
    "local",
    "resample",
    "transposed",
    "merge",
    "channel",
    "mean_delta",
)


@dataclass(frozen=True)
class Rates:
    """Throughputs of one machine, for one dtype: what the estimate divides by."""

    small_fmas_per_s: float  # a 3x3 conv of 64 channels, 10x10 outputs per image (a small window)
    large_fmas_per_s: float  # the same conv, 56x56 outputs per image (a full early map)
    gather_elements_per_s: float  # kernels' gather of read-in windows from a padded base
    copy_elements_per_s: float  # a contiguous copy (projection's base copy, elementwise ops on maps)
    step_seconds: float  # fixed cost of one incremental step per batch (indices, small launches)
    op_seconds: float  # fixed cost of one dense op per batch
    source: str = "static"  # "static", or where and when they were measured

    def valid(self) -> bool:
        return all(
            isinstance(getattr(self, f.name), float) and math.isfinite(getattr(self, f.name))
            for f in fields(self)
            if f.name != "source"
        ) and min(self.small_fmas_per_s, self.large_fmas_per_s) > 0 < min(
            self.gather_elements_per_s, self.copy_elements_per_s
        )


# A static model good enough to rank plans on a 2-core x86 CPU in float32 (order of magnitude of
# what calibrate() measured there; see docs/design.md §3.8). Used when calibration is off.
STATIC_CPU_RATES = Rates(
    small_fmas_per_s=4.0e9,
    large_fmas_per_s=1.5e10,
    gather_elements_per_s=3.0e8,
    copy_elements_per_s=1.0e9,
    step_seconds=3.0e-5,
    op_seconds=3.0e-6,
    source="static (kfx.passes.plan.STATIC_CPU_RATES)",
)


@dataclass(frozen=True)
class Candidate:
    """One plan considered: its name, the nodes it switches to dense at, its estimated time."""

    name: str
    switch_nodes: tuple[str, ...]
    seconds_per_position: float | None  # None when nothing was estimated (a plan asked for by name)


@dataclass(frozen=True)
class Plan:
    """Where the program runs incrementally and where fully (``engine.plan``), and why."""

    mode: str  # what kfx.compile was asked: "incremental", "auto" or "full"
    chosen: str  # the chosen candidate's name
    forced: Mapping[str, str] = field(default_factory=dict)  # switch node -> reason (dense_nodes shows it)
    candidates: tuple[Candidate, ...] = ()
    rates: Rates | None = None
    reason: str = ""
    # plan="auto": the chosen program timed against full inference on the first batches
    # (a kfx.measured_plan.Measured; None until then, and for other modes)
    measured: object | None = None
    # the estimate preferred full inference: it runs until a measurement says otherwise
    estimated_full: bool = False
    # auto's choice of full inference, for an engine that measures: the best incremental plan to
    # time against it (estimated_full set), since the estimate can be off by 2x
    alternative: Plan | None = None

    @property
    def switch_nodes(self) -> tuple[str, ...]:
        return tuple(self.forced)

    @property
    def full_inference(self) -> bool:
        """Whether the engine runs plain batched inference: chosen so, or measured faster (until a
        measurement, the estimate's preference)."""
        if self.chosen == "full":
            return True
        return self.measured.full_inference if self.measured is not None else self.estimated_full

    def summary(self) -> str:
        """One line: the chosen plan and why (``print(engine)`` shows it)."""
        where = f" (dense from {', '.join(self.switch_nodes[:3])}{', ...' if len(self.forced) > 3 else ''})"
        line = f"plan={self.chosen!r}{where if self.forced else ''}: {self.reason}"
        return line if self.measured is None else f"{line}; {self.measured.summary()}"

    def __str__(self) -> str:
        rows = [self.summary()]
        if any(c.seconds_per_position is not None for c in self.candidates):
            rows.append(f"{'candidate':<14} {'ms/position':>12} {'switch nodes':>13}")
            for c in self.candidates:
                mark = " <- chosen" if c.name == self.chosen else ""
                ms = "" if c.seconds_per_position is None else f"{c.seconds_per_position * 1e3:.4f}"
                rows.append(f"{c.name:<14} {ms:>12} {len(c.switch_nodes):>13}{mark}")
            rows.append(f"rates: {self.rates.source}")
        return "\n".join(rows)


# -- rates: measured once per machine, cached ---------------------------------------------------


def _seconds(fn, device: torch.device, repeats: int = 5, calls: int = 1) -> float:
    """Median over ``repeats`` samples of the time of one ``fn()`` call (each sample times ``calls``
    calls), after one warm-up call. The median, not the best: on a shared machine single samples
    come out both far too slow and, at times, implausibly fast."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) / calls)
    return max(statistics.median(samples), 1e-9)


def calibrate(device: torch.device, dtype: torch.dtype = torch.float32) -> Rates:
    """Measure :class:`Rates` on ``device`` (about a second on a 2-core CPU): a 3x3 conv of 64
    channels on full 56x56 maps and on batches of 12x12 windows, kfx's window gather, a copy, and
    the fixed cost of a tiny step and a tiny op."""
    from kfx.kernels.reference import gather_windows

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    generator = torch.Generator().manual_seed(0)
    weight = randn(64, 64, 3, 3)
    full_maps, windows = randn(8, 64, 58, 58), randn(64, 64, 12, 12)
    per_output = 64 * 64 * 9
    with torch.no_grad():
        large = 8 * 56 * 56 * per_output / _seconds(lambda: F.conv2d(full_maps, weight), device)
        small = 64 * 10 * 10 * per_output / _seconds(lambda: F.conv2d(windows, weight), device)
        base = randn(64, 60, 60)
        origins = torch.randint(0, 48, (64, 2), generator=generator).to(device)
        gather = 64 * 64 * 144 / _seconds(lambda: gather_windows(base, origins, (12, 12)), device)
        copy = 32 * 64 * 60 * 60 / _seconds(lambda: base.expand(32, 64, 60, 60).clone(), device)
        tiny, tiny_weight, one = randn(1, 1, 1), randn(1, 1, 1, 1), origins[:1]
        op = _seconds(lambda: F.conv2d(tiny[None], tiny_weight), device, calls=20)
        step = _seconds(
            lambda: F.conv2d(gather_windows(tiny, one * 0, (1, 1)), tiny_weight), device, calls=20
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return Rates(
        float(small),
        float(large),
        float(gather),
        float(copy),
        float(step),
        float(op),
        source=f"measured on {name}, {torch.get_num_threads()} threads, {dtype}, {time.strftime('%Y-%m-%d')}",
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return f"{device.type}|{name}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}|{dtype}"


def _cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kfx"
    return Path(root) / "plan_rates.json"


def _read_cache(path: Path) -> dict:
    """The cache's entries; an unreadable, corrupt or older cache counts as empty (it is rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != _CACHE_VERSION
        or not isinstance(data.get("rates"), dict)
    ):
        return {}
    return data["rates"]


def _cached_rates(entry) -> Rates | None:
    try:
        rates = Rates(**entry)
    except TypeError:
        return None
    return rates if rates.valid() else None


def _write_cache(path: Path, entries: dict) -> None:
    """Atomically (tempfile + os.replace); a cache that cannot be written is skipped, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
            json.dump({"version": _CACHE_VERSION, "rates": entries}, out, indent=1)
        os.replace(out.name, path)
    except OSError:
        pass


def machine_rates(device: torch.device, dtype: torch.dtype = torch.float32) -> Rates | None:
    """This machine's rates: from the cache if a valid entry exists, else measured and cached.
    With ``KFX_PLAN_CALIBRATE=0``: the static CPU rates, and None on other devices (no GPU numbers
    without a measurement)."""
    if os.environ.get(CALIBRATE_ENV, "1") == "0":
        return STATIC_CPU_RATES if device.type == "cpu" else None
    path, key = _cache_path(), _machine_key(device, dtype)
    entries = _read_cache(path)
    rates = _cached_rates(entries.get(key))
    if rates is None:
        rates = calibrate(device, dtype)
        _write_cache(path, {**entries, key: asdict(rates)})
    return rates


# -- the estimate -------------------------------------------------------------------------------


SMALL_CELLS, LARGE_CELLS = 10 * 10, 56 * 56  # outputs per image of the two calibrated convs


def fma_rate(rates: Rates, outputs: tuple[int, ...] | None) -> float:
    """FMAs per second of a conv with ``outputs`` (its box or map) per image: log-linear in the
    number of outputs between the two calibrated convs, clamped (a Linear layer: the large rate)."""
    cells = math.prod(outputs) if outputs else LARGE_CELLS
    share = (math.log(max(cells, 1)) - math.log(SMALL_CELLS)) / (
        math.log(LARGE_CELLS) - math.log(SMALL_CELLS)
    )
    share = min(max(share, 0.0), 1.0)
    return math.exp((1 - share) * math.log(rates.small_fmas_per_s) + share * math.log(rates.large_fmas_per_s))


def _numel(node: fx.Node) -> int:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return math.prod(shape) if shape is not None else 0


def _box_elements(node: fx.Node, box, axes: int) -> float:
    """Elements of ``node``'s value inside ``box`` (all channels)."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None or box is None:
        return 0.0
    dims = spatial_dims(node.meta[META_KEY].spatial, len(shape), axes)
    volume = math.prod(shape[d] for d in dims)
    return math.prod(shape) * math.prod(b.width for b in box) / max(volume, 1)


def _box_share(node: fx.Node, axes: int) -> float:
    meta = node.meta[META_KEY]
    return _box_elements(node, meta.box, axes) / max(_numel(node), 1)


def _incremental(node: fx.Node) -> bool:
    """Computed from changed boxes in the annotation (a PATCH node, or the global-mean delta)."""
    meta = node.meta[META_KEY]
    return meta.state is State.PATCH or meta.role == "mean_delta"


def _projectable(node: fx.Node) -> bool:
    """A PATCH value a dense node can read: a tensor map (not a tuple of split pieces)."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return shape is not None and len(shape) >= 3


def _eligible(node: fx.Node) -> bool:
    """A node the plan may force dense: it runs incrementally and its changed operands can be projected."""
    meta = node.meta[META_KEY]
    if meta.state is not State.PATCH or node.op not in ("call_module", "call_function", "call_method"):
        return False
    return all(_projectable(m) for m in node.all_input_nodes if m.meta[META_KEY].state is State.PATCH)


def dense_under(gm: fx.GraphModule, forced) -> set[str]:
    """Nodes that run incrementally in the annotation and densely once ``forced`` are: the forced
    ones and everything reading them (patch propagation's downstream_of_dense rule)."""
    dense: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "output" and _incremental(node):
            if node.name in forced or any(m.name in dense for m in node.all_input_nodes):
                dense.add(node.name)
    return dense


def _reads_full(user: fx.Node, dense: set[str]) -> bool:
    """Whether ``user`` reads its changed operands projected to full (rewrite's dense_copy, output)."""
    if user.op == "output" or user.name in dense:
        return True
    meta = user.meta[META_KEY]
    return meta.state is State.DENSE and meta.role not in (*SHAPE_ROLES, "mean_delta")


def estimate(
    gm: fx.GraphModule, forced, rates: Rates, batch_size: int, costs: CostReport | None = None
) -> float:
    """Estimated seconds per position of the program with ``forced`` nodes dense (docs/design.md §3.8).

    Incremental nodes: box FMAs at the conv rate for their box (:func:`fma_rate`), the box read and
    written at the copy rate, read-in windows gathered and the change pasted into them at the gather
    rate, one step per batch. Projections: the full map copied, the box pasted. Dense nodes: full
    FMAs at the conv rate for their map, the map read and written at the copy rate, one op per batch.
    ``costs``: ``static_cost(gm)``, if already computed (it does not depend on ``forced``).
    """
    axes = input_axes(gm)
    fmas = {layer.node: layer for layer in (static_cost(gm) if costs is None else costs).layers}
    dense = dense_under(gm, forced)
    total = 0.0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        meta = node.meta[META_KEY]
        layer = fmas.get(node.name)
        if node.name in dense or (meta.state is State.DENSE and meta.role == "dense"):
            total += layer.full / fma_rate(rates, layer.out) if layer else 0.0
            if _numel(node):  # a tensor (not a shape, which costs the same in every plan)
                total += 2 * _numel(node) / rates.copy_elements_per_s + rates.op_seconds / batch_size
        elif _incremental(node):
            copied, gathered = 2 * _box_elements(node, meta.box, axes), 0.0  # elementwise on the box
            if meta.read is not None:  # local, resample, transposed: windows gathered, the change pasted
                source = node.args[0]
                gathered += _box_elements(source, meta.read, axes)
                gathered += _box_elements(source, source.meta[META_KEY].box, axes)
            if meta.role == "merge":  # a window of each operand over the union box
                gathered += len(node.all_input_nodes) * _box_elements(node, meta.box, axes)
            if meta.role == "mean_delta":
                source = node.args[0]
                copied += 2 * _box_elements(source, source.meta[META_KEY].box, axes)
            total += layer.incremental / fma_rate(rates, layer.box) if layer else 0.0
            total += copied / rates.copy_elements_per_s + gathered / rates.gather_elements_per_s
            total += (rates.step_seconds if meta.role in _STEP_ROLES else 0.0) / batch_size
        if meta.state is State.PATCH and node.name not in dense:
            if any(_reads_full(user, dense) for user in node.users):  # projected once (rewrite)
                total += 2 * _numel(node) / rates.copy_elements_per_s + rates.step_seconds / batch_size
                total += _box_elements(node, meta.box, axes) / rates.gather_elements_per_s  # the paste
    # placeholder's step (the patch content) is the same in every plan: left out.
    return total


# -- choosing -----------------------------------------------------------------------------------


def _threshold_forced(gm: fx.GraphModule, share: float) -> dict[str, float]:
    """Eligible nodes whose box covers at least ``share`` of their map, and that share, minimal:
    nodes after a forced one are dense anyway and are not listed."""
    axes, forced, dense = input_axes(gm), {}, set()
    for node in gm.graph.nodes:
        if node.op == "output" or not _incremental(node):
            continue
        if any(m.name in dense for m in node.all_input_nodes):
            dense.add(node.name)
        elif _eligible(node) and node.meta[META_KEY].role != "input" and _box_share(node, axes) >= share:
            forced[node.name] = _box_share(node, axes)
            dense.add(node.name)
    return forced


def _full_forced(gm: fx.GraphModule) -> list[str]:
    """The image's consumers that run incrementally: forced dense, the image itself is projected
    (the occluded images) and the whole model runs on them."""
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return [user.name for user in image.users if _eligible(user)]


def _fixed_plan(gm: fx.GraphModule, mode: str, reason: str) -> Plan:
    if mode == "full":
        forced = {
            name: "plan='full': batched full inference on the occluded images" for name in _full_forced(gm)
        }
        return Plan(mode, "full", forced, (Candidate("full", tuple(forced), None),), None, reason)
    return Plan(mode, "incremental", {}, (Candidate("incremental", (), None),), None, reason)


def choose_plan(
    gm: fx.GraphModule, mode: str, rates: Rates | None, batch_size: int, *, approximate: bool = False
) -> Plan:
    """The plan for annotated ``gm`` (not yet forced): ``mode`` "incremental" or "full" as asked,
    "auto" the cheapest candidate at ``rates`` (docs/design.md §3.8). ``approximate`` (tau < 1 or
    global_context="local"): auto keeps the incremental program, whose answer those modes define."""
    if mode not in PLAN_MODES:
        raise ValueError(f"plan must be one of {PLAN_MODES}, got {mode!r}")
    if mode == "incremental":
        return _fixed_plan(gm, mode, "incremental up to the first node kfx cannot run incrementally (asked)")
    if mode == "full":
        return _fixed_plan(gm, mode, "batched full inference (asked)")
    if approximate:
        return _fixed_plan(
            gm, mode, "an approximate mode (tau < 1 or global_context='local') keeps its program"
        )
    if rates is None:
        return _fixed_plan(
            gm, mode, "no measured rates for this device (calibration is off): kept incremental"
        )
    full_reason = "plan: no incremental layer is worth its overhead; full inference is estimated cheapest"
    options: list[tuple[str, dict[str, str]]] = [
        ("incremental", {}),
        ("full", {name: full_reason for name in _full_forced(gm)}),
    ]
    for share in THRESHOLDS:
        reasons = {
            name: f"plan: box covers {s:.0%} of the map; full evaluation from here is estimated cheaper"
            for name, s in _threshold_forced(gm, share).items()
        }
        options.append((f"box>={share:.0%}", reasons))
    candidates, seen, costs = {}, set(), static_cost(gm)
    for name, forced in options:  # a program met before keeps its first name (incremental, full)
        effect = frozenset(dense_under(gm, forced))
        if effect not in seen:
            seen.add(effect)
            candidates[name] = (
                Candidate(name, tuple(forced), estimate(gm, forced, rates, batch_size, costs)),
                forced,
            )
    return _cheapest(mode, candidates, rates)


def _cheapest(mode: str, candidates: dict, rates: Rates) -> Plan:
    """The cheapest candidate, ties to the earlier (incremental, then full); an incremental plan must
    beat full inference by :data:`WORTH` (the estimate is rough, and full inference has no overhead
    beyond the model's own ops)."""
    seconds = {name: c.seconds_per_position for name, (c, _) in candidates.items()}
    best = min(seconds, key=seconds.get)
    if "full" in seconds and best != "full" and seconds["full"] < WORTH * seconds[best]:
        best = "full"
        reason = (
            f"no incremental layer is worth its overhead: the best incremental plan is estimated "
            f"{seconds['full'] / min(seconds.values()):.2f}x faster than full inference, below the "
            f"{WORTH:.2f}x it must gain; kfx runs plain batched inference"
        )
    elif best == "incremental":
        reason = "the incremental program is estimated cheapest"
    elif best == "full":
        reason = (
            f"full inference is estimated {seconds['incremental'] / seconds['full']:.2f}x faster than "
            "incremental-only: kfx runs plain batched inference"
        )
    else:
        reason = f"estimated {seconds['incremental'] / seconds[best]:.2f}x faster than incremental-only"
    order = ["incremental", *(n for n in candidates if n.startswith("box")), "full"]
    listed = tuple(candidates[n][0] for n in order if n in candidates)
    alternative = None
    runner_up = min((n for n in seconds if n != "full"), key=seconds.get, default=None)
    if best == "full" and runner_up is not None:
        timed = (
            f"{reason}; until measured: the estimate can be off by 2x, so the best incremental plan "
            f"({runner_up}) is timed against full inference on the first full-size batches"
        )
        alternative = Plan(
            mode, runner_up, candidates[runner_up][1], listed, rates, timed, estimated_full=True
        )
    return Plan(mode, best, candidates[best][1], listed, rates, reason, alternative=alternative)


def apply_plan(
    gm: fx.GraphModule,
    plan: Plan,
    image_size: tuple[int, ...],
    patch_size: tuple[int, ...],
    tau: float = 1.0,
    *,
    global_context: str = "exact",
) -> None:
    """Annotate ``gm`` again with the plan's switch nodes forced dense (nothing to do without any)."""
    if plan.forced:
        propagate_patches(
            gm, image_size, patch_size, tau, global_context=global_context, force_dense=plan.forced
        )
