"""max_memory and the static memory model: the estimate bounds the live batch tensors that the
incremental program really holds (measured by running it under a torch.fx Interpreter)."""

import math
import operator
import weakref

import pytest
import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

import kfx
import kfx.memory
from kfx.memory import parse_bytes
from tests.zoo import ZOO, build


class LiveBytes(fx.Interpreter):
    """Runs a GraphModule and records the peak bytes of live per-batch tensors (first dim = n)."""

    def __init__(self, module, n):
        super().__init__(module)
        self.n, self.peak = n, 0

    def run_node(self, node):
        result = super().run_node(node)
        values = [getattr(v, "values", v) for v in [*self.env.values(), result]]  # Patches -> tensor
        live = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in values
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.n
        }
        self.peak = max(self.peak, sum(live.values()))
        return result


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "shufflenet_v2_x0_5"])  # split returns a tuple
def test_estimate_bounds_the_live_batch_tensors(name):
    model, shape = build(name), (3, ZOO[name], ZOO[name])
    engine = kfx.compile(model, shape, kfx.Patch(8, stride=4), dtype=torch.float64)
    image = torch.randn(shape, dtype=torch.float64)
    n = 12
    positions = kfx.grid_positions(shape[1:], engine.patch)[:n]
    prepared = engine._prepare(engine._check_image(image)).activations
    interpreter = LiveBytes(engine.program, n)
    with torch.no_grad():
        interpreter.run(positions, *prepared)
    estimate = n * engine.memory.per_position
    assert interpreter.peak <= estimate <= 6 * interpreter.peak, (interpreter.peak, estimate)


SAFETY = 1.5  # the margin kfx.compile promises: the estimate times 1.5 must fit max_memory
MAX_BATCH = 256  # and it never picks a larger batch


def batch_that_fits(estimate, max_memory: int) -> int:
    """The oracle: the largest batch (at most 256) whose estimate with the margin fits, 0 if none."""
    return max(
        (b for b in range(1, MAX_BATCH + 1) if estimate.batch_bytes(b) * SAFETY <= max_memory), default=0
    )


def least_budget_for(estimate, batch_size: int) -> int:
    """The fewest bytes whose budget holds ``batch_size`` positions with the margin."""
    return math.ceil(estimate.batch_bytes(batch_size) * SAFETY)


def test_max_memory_picks_the_largest_batch_that_fits():
    model, shape = build("resnet18").float(), (3, 64, 64)
    small = kfx.compile(model, shape, 8, max_memory="40MiB")
    large = kfx.compile(model, shape, 8, max_memory=2**30)
    assert 1 <= small.batch_size < large.batch_size <= MAX_BATCH
    assert small.batch_size == batch_that_fits(small.memory, 40 * 2**20)
    image = torch.randn(shape)
    # the same map: float32 convs may round differently at another batch size, hence not bit for bit
    torch.testing.assert_close(small(image).values, large(image).values, rtol=1e-5, atol=1e-7)


def test_max_memory_keeps_the_safety_margin_to_the_byte():
    # At the least budget for b positions the engine takes b; one byte less and b no longer fits.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1)
    ).eval()
    shape, patch = (3, 32, 32), kfx.Patch(6, stride=2)
    estimate = kfx.compile(model, shape, patch).memory
    chosen = lambda max_memory: kfx.compile(model, shape, patch, max_memory=max_memory).batch_size
    for b in (1, 2, 37, MAX_BATCH):
        budget = least_budget_for(estimate, b)
        assert chosen(budget) == batch_that_fits(estimate, budget) == b
        if b > 1:
            assert chosen(budget - 1) == batch_that_fits(estimate, budget - 1) == b - 1
    assert chosen(least_budget_for(estimate, 10 * MAX_BATCH)) == MAX_BATCH
    with pytest.raises(kfx.InputError, match="below what one patch position needs"):
        chosen(least_budget_for(estimate, 1) - 1)


@pytest.mark.parametrize(
    ("max_memory", "batch_size", "message"),
    [
        ("1KB", None, "below what one patch position needs"),
        ("many", None, "max_memory must be bytes"),
        (0, None, "positive"),
        ("1GB", 8, "not both"),
    ],
)
def test_bad_max_memory(max_memory, batch_size, message):
    model, shape = build("resnet18").float(), (3, 64, 64)
    with pytest.raises(kfx.InputError, match=message):
        kfx.compile(model, shape, 8, max_memory=max_memory, batch_size=batch_size)


@pytest.mark.parametrize(
    ("text", "value"), [(1000, 1000), ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kb", 1500), ("7", 7)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", True, "1.2.3MB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def exact_engine(model: nn.Module, shape, patch) -> kfx.Engine:
    """An engine for ``model`` whose outputs equal torch's on the occluded images at every position."""
    engine = kfx.compile(model, shape, patch, batch_size=7)
    image = torch.randn(shape, dtype=torch.float64)
    positions = kfx.grid_positions(shape[1:], patch)
    with torch.no_grad():
        expected = torch.cat([model(kfx.occlude(image, p[None], patch)) for p in positions])
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=1e-12, atol=1e-12)
    return engine


class DenseLayer(nn.Module):
    """DenseNet's layer: BatchNorm, ReLU and a 1x1 conv on the concat of all earlier features, then a
    3x3 conv whose output is concatenated again."""

    def __init__(self, channels: int, growth: int = 3):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.squeeze = nn.Conv2d(channels, 4, 1)
        self.grow = nn.Conv2d(4, growth, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.grow(torch.relu(self.squeeze(torch.relu(self.norm(torch.cat(features, 1))))))


class DenseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.layers = nn.ModuleList([DenseLayer(4), DenseLayer(7), DenseLayer(10)])
        self.head = nn.Linear(13, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.head(torch.cat(features, 1).mean((2, 3)))


def test_a_1x1_conv_after_a_concat_keeps_no_base_of_its_input_and_stays_exact():
    """Each layer's 1x1 conv reads exactly the concat's changed box, so it runs on the change and
    its input (a full-size copy of every earlier feature: quadratic in the layers) is not kept."""
    from kfx.passes.steps import CoveredLocalStep

    torch.manual_seed(0)
    model = DenseBlock().double().eval()
    with torch.no_grad():
        for layer in model.layers:  # BatchNorm statistics that matter
            layer.norm.running_mean.uniform_(-1, 1), layer.norm.running_var.uniform_(0.5, 2)
    shape, patch = (2, 11, 13), kfx.Patch(3, stride=2, fill=0.3)
    engine = exact_engine(model, shape, patch)
    covered = [m for m in engine.program.modules() if isinstance(m, CoveredLocalStep)]
    assert len(covered) == 3
    graph = engine.compiled.graph_module.graph
    squeezed = {n.args[0].name for n in graph.nodes if n.op == "call_module" and n.target.endswith("squeeze")}
    grown = {n.args[0].name for n in graph.nodes if n.op == "call_module" and n.target.endswith("grow")}
    kept = {slot.source for slot in engine.compiled.slots}
    assert len(squeezed) == 3 and kept.isdisjoint(squeezed), kept
    assert grown <= kept  # a 3x3 conv reads around the change: its input's base is kept


class NestedDense(nn.Module):
    """MONAI's dense layer: ``x = cat([x, new], 1)``, so each concat holds the previous one. The
    stem also feeds a 3x3 conv (a padded copy of it is kept) and the head reads the last concat
    through a 3x3 conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 3, 3, padding=1)
        self.layers = nn.ModuleList([DenseLayer(4), DenseLayer(7), DenseLayer(10)])
        self.head = nn.Conv2d(13, 3, 3, padding=1)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        stem = self.stem(x)
        x = stem
        for layer in self.layers:
            x = torch.cat([x, layer([x])], 1)
        return self.out((self.head(x) + self.side(stem)).mean((2, 3)))


def test_a_concat_of_a_concat_is_read_as_its_pieces_and_stays_exact():
    """Each layer's merge reads the previous concat's window: built from the stem's and every new
    feature's bases, so no concat is kept (keeping them is quadratic in the layers)."""
    torch.manual_seed(0)
    model = NestedDense().double().eval()
    shape, patch = (2, 12, 11), kfx.Patch(3, stride=2, fill=0.3)
    engine = exact_engine(model, shape, patch)
    graph = engine.compiled.graph_module.graph
    cats = [n.name for n in graph.nodes if n.target is torch.cat and len(n.args[0]) == 2]  # not cat([x])
    grown = [n.name for n in graph.nodes if n.op == "call_module" and n.target.endswith("grow")]
    kept = [(slot.source, any(slot.margins)) for slot in engine.compiled.slots]
    assert len(cats) == 3
    # the last concat only as the head's padded copy; the stem once, padded (for the side conv);
    # the first two layers' new features as they are (the third is the last concat's own change)
    assert [k for k in kept if k[0] in cats] == [(cats[-1], True)], kept
    assert [k for k in kept if k[0] == "stem"] == [("stem", True)], kept
    assert [k for k in kept if k[0] in grown] == [(grown[0], False), (grown[1], False)], kept


class Residual(nn.Module):
    """x + branch(x): the branch's 3x3 convs grow the box beyond x's, so the add's union box is the
    branch's own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
        self.head = nn.Conv2d(3, 2, 3, stride=2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(x + self.branch(x)).flatten(1)


def test_a_merge_reads_the_union_filling_operand_from_its_change_and_the_other_from_a_shared_copy():
    torch.manual_seed(0)
    model = Residual().double().eval()
    shape, patch = (2, 12, 11), kfx.Patch(2, stride=3, fill=-0.5)
    engine = exact_engine(model, shape, patch)
    graph = engine.compiled.graph_module.graph
    add = next(n for n in graph.nodes if n.target in (operator.add, torch.add))
    identity, branch = add.args
    kept = {slot.source for slot in engine.compiled.slots}
    assert branch.name not in kept and identity.name in kept, (branch.name, identity.name, kept)
    # the branch's first conv keeps identity's base padded; the add reads that copy at an offset
    copies = [slot for slot in engine.compiled.slots if slot.source == identity.name]
    assert len(copies) == 1 and any(copies[0].margins), copies


SEEN_BATCHES: list[int] = []  # what Volume's forward saw, eagerly (a global: not a model setting)


class Volume(nn.Module):
    """Two 3-D convs and a global pool: its forward holds whole volumes, a position only its box."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        SEEN_BATCHES.append(x.shape[0])
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3, 4)))


def test_full_inference_runs_in_chunks_that_hold_no_more_than_the_incremental_batch(monkeypatch):
    """Timed by plan="auto" (or chosen by it), full inference runs a batch through the model in
    chunks that hold no more than the incremental program does for the batch, and the outputs are
    unchanged. (No floor here: a volume small enough for a test is far below the default one.)"""
    monkeypatch.setattr(kfx.memory, "FULL_CHUNK_FLOOR", 0)
    torch.manual_seed(0)
    model = Volume().double().eval()
    shape, patch = (1, 20, 20, 20), kfx.Patch((4, 4, 4), stride=4)
    engine = kfx.compile(model, shape, patch, batch_size=16, plan="auto")  # it times full inference
    memory = engine.compiled.memory
    chunk = memory.full_inference_chunk(16)
    assert 1 <= chunk < 16  # else the test shows nothing: a forward of this volume outweighs a box
    assert chunk * memory.full_per_position <= 16 * memory.per_position
    image = torch.randn(shape, dtype=torch.float64)
    positions = kfx.grid_positions(shape[1:], patch)[:64]
    SEEN_BATCHES.clear()
    got = engine.outputs(image, positions)
    assert SEEN_BATCHES and max(SEEN_BATCHES) <= chunk and sum(SEEN_BATCHES) % 16 == 0, SEEN_BATCHES
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, patch))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class LiveTensors(TorchDispatchMode):
    """Records the peak bytes of live tensors made by torch ops while active (every op's outputs,
    tracked by weak reference and counted once per storage): allocator-independent, unlike RSS."""

    def __init__(self):
        super().__init__()
        self.tensors, self.peak = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else [result]
        self.tensors += [weakref.ref(t) for t in outputs if isinstance(t, torch.Tensor)]
        alive = [t for t in (ref() for ref in self.tensors) if t is not None]
        self.tensors = [weakref.ref(t) for t in alive]
        self.peak = max(self.peak, storage_bytes(alive))
        return result


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def live_peak(run) -> int:
    with torch.no_grad(), LiveTensors() as tracker:
        run()
    return tracker.peak


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_the_base_run_holds_the_model_run_plus_the_padded_copies_and_no_unpadded_ones(name):
    """Preparing the base activations pads each where the model computes it: its peak is at most the
    traced model's own run plus the prepared copies (padding after the run would hold every kept
    activation twice: unpadded to the end of the run, and padded)."""
    model, shape = build(name), (3, ZOO[name], ZOO[name])
    engine = kfx.compile(model, shape, kfx.Patch(8, stride=4), plan="incremental")
    image = engine._check_image(torch.randn(shape, dtype=engine.dtype))  # [1, C, H, W]
    # the traced model in the layout the base program runs it in (channels-last on CPU: §3.6)
    as_run = image.contiguous(memory_format=torch.channels_last) if engine.compiled.channels_last else image
    model_peak = live_peak(lambda: engine.compiled.graph_module(as_run))
    prepared = engine._prepare(image).activations
    engine._base_cache = None
    base_peak = live_peak(lambda: engine._prepare(image))
    assert base_peak <= model_peak + storage_bytes(prepared), (base_peak, model_peak, storage_bytes(prepared))
    # the prepared copies are the model's activations, padded as each slot says
    model_run = fx.Interpreter(engine.compiled.graph_module, garbage_collect_values=False)
    with torch.no_grad():
        model_run.run(as_run)
    values = {node.name: value for node, value in model_run.env.items()}
    for slot, kept in zip(engine.compiled.slots, prepared):
        if not slot.whole:
            assert torch.equal(kept, kfx.kernels.pad_base(values[slot.source], slot.margins, slot.pad_value))
