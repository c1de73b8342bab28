"""The end-to-end property: for any drawn CNN, image, patch and positions, the compiled engine
equals full inference on the occluded images (float64), and its heat map equals brute force.

The occluded images are the tests' own (tests.strategies.painted), not kfx.occlude. And the engine
must be incremental, not merely right: only the global tail may run densely, and its static FMAs
stay within a bound computed here from each layer's attributes, below full inference's whenever the
patch's changed region is smaller than some conv's output."""

import math

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import kfx
from tests.strategies import (
    FunctionalConv,
    FunctionalMaxPool,
    SqueezeExcite,
    cnn,
    dag_cnn,
    painted,
    patch_for,
    positions_for,
    seed_weights,
)

TAIL = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)  # the drawn models' global tails, nothing else
INCREMENTAL_ROLES = {"input", "const", "pointwise", "local", "merge", "channel"}
SHAPE_ROLES = {"shape", "shape_arith"}  # x.size() and arithmetic on it: metadata, never a projection


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def share(part: float, whole: float) -> str:
    """A coarse bucket of part / whole for hypothesis.event, so that the statistics read as a histogram."""
    ratio = part / whole
    buckets = (("<= 1/16", 1 / 16), ("<= 1/4", 1 / 4), ("<= 1/2", 1 / 2), ("< 1", 1 - 1e-12))
    return next((label for label, limit in buckets if ratio <= limit), "= 1")


def top_level(node) -> str | None:
    """Index (as a string) of the model's top-level module whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack")
    return next(iter(stack)) if stack else None


def body_length(model: nn.Sequential) -> int:
    return next((i for i, layer in enumerate(model) if isinstance(layer, TAIL)), len(model))


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def window(layer: nn.Module) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(dilated kernel, stride) of a conv or pool of the strategies; None for layers that keep
    every output where its input is (point-wise ops, constant pads)."""
    if isinstance(layer, (nn.Conv2d, FunctionalConv)):
        kernel, dilation = layer.weight.shape[-2:], _pair(layer.dilation)
        return tuple(dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1)), _pair(layer.stride)
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d, FunctionalMaxPool)):
        kernel, dilation = _pair(layer.kernel_size), _pair(getattr(layer, "dilation", 1))
        return tuple(dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1)), _pair(layer.stride)
    return None


def fma_budget(model: nn.Sequential, shape, patch: kfx.Patch) -> tuple[int, int]:
    """(full, incremental bound) FMAs of one position: every conv in full, every conv on a bound
    of its changed box, the tail's linear in both.

    Along an axis, windows of extent k and stride s overlap a run of e changed inputs at no more
    than ceil((e + k - 1) / s) outputs; the run starts as the patch and never outgrows the map.
    """
    x = torch.zeros(1, *shape, dtype=torch.float64)
    extent, full, bound = list(patch.size), 0, 0
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                linear = layer.in_features * layer.out_features
                full, bound = full + linear, bound + linear
                continue
            x = layer(x)
            if isinstance(layer, TAIL):
                continue
            out = x.shape[-2:]
            geometry = window(layer)
            if geometry is not None:
                kernel, stride = geometry
                extent = [math.ceil((extent[a] + kernel[a] - 1) / stride[a]) for a in (0, 1)]
            extent = [min(extent[a], out[a]) for a in (0, 1)]
            if isinstance(layer, (nn.Conv2d, FunctionalConv)):
                per_output = layer.weight.numel()  # C_out * C_in / groups * k_h * k_w
                full += per_output * out[0] * out[1]
                bound += per_output * extent[0] * extent[1]
    return full, bound


def assert_incremental(engine: kfx.Engine, model: nn.Sequential, shape, patch: kfx.Patch) -> None:
    """Only the tail runs densely, and the static FMAs keep to :func:`fma_budget`."""
    nodes = {node.name: node for node in engine.graph_module.graph.nodes}
    tail = {str(i) for i in range(body_length(model), len(model))}
    assert all(top_level(nodes[dense.node]) in tail for dense in engine.dense_nodes), engine.dense_nodes
    body_roles = {name: role for name, role in engine.roles().items() if top_level(nodes[name]) not in tail}
    assert set(body_roles.values()) <= INCREMENTAL_ROLES, body_roles
    full, bound = fma_budget(model, shape, patch)
    cost = engine.cost()
    assert cost.full_fmas == full
    assert cost.incremental_fmas <= bound, (cost.incremental_fmas, bound)
    if bound < full:
        assert cost.incremental_fmas < cost.full_fmas
    convs = [layer for layer in cost.layers if layer.op != "Linear"]
    event("patch area / image area", share(patch.size[0] * patch.size[1], shape[1] * shape[2]))
    if convs:
        event(
            "conv FMAs, incremental / full",
            share(sum(c.incremental for c in convs), sum(c.full for c in convs)),
        )


@st.composite
def cases(draw, models=cnn()):  # noqa: B008 (a strategy object, built once on purpose)
    """A model from ``models``, its patch, positions (all corners included), image and batch size."""
    model, shape = draw(models)
    patch = draw(patch_for(shape[1:], shape[0]))
    positions = draw(positions_for(shape[1:], patch))
    seed = draw(st.integers(0, 2**16), label="image_seed")
    image = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    batch_size = draw(st.integers(1, 7), label="batch_size")
    return model, shape, patch, positions, image, batch_size


@given(cases())
def test_outputs_equal_full_inference_on_occluded_images(case):
    model, shape, patch, positions, image, batch_size = case
    engine = kfx.compile(model, shape, patch, batch_size=batch_size, dtype=torch.float64)
    with torch.no_grad():
        expected = model(painted(image, positions, patch))
    actual = engine.outputs(image, positions)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= 1e-9, (model, patch, positions)
    assert_incremental(engine, model, shape, patch)


@given(cnn(max_layers=4), st.data())
def test_heatmap_equals_brute_force(drawn, data):
    model, shape = drawn
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        with torch.no_grad():
            features = model(torch.zeros(1, *shape, dtype=torch.float64)).numel()
        head = seed_weights(
            nn.Linear(features, 4).double(), data.draw(st.integers(0, 2**32 - 1), label="head_seed")
        )
        model = nn.Sequential(*model, nn.Flatten(), head).eval()
    patch = data.draw(patch_for(shape[1:], shape[0]))
    image = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    engine = kfx.compile(model, shape, patch, dtype=torch.float64)
    heatmap = engine(image)

    h_m = (shape[1] - patch.size[0]) // patch.stride[0] + 1
    w_m = (shape[2] - patch.size[1]) // patch.stride[1] + 1
    grid = [(i * patch.stride[0], j * patch.stride[1]) for i in range(h_m) for j in range(w_m)]
    with torch.no_grad():  # on a copy: a drawn model may change its input in place (x.add_(1))
        base = torch.softmax(model(image[None].clone()), 1)[0]
        target = int(base.argmax())
        brute = torch.softmax(model(painted(image, grid, patch)), 1)[:, target]
    assert heatmap.values.shape == (h_m, w_m)
    assert heatmap.target == target
    assert abs(heatmap.base - base[target].item()) <= 1e-12
    assert relative_error(heatmap.values, brute.view(h_m, w_m)) <= 1e-9
    assert_incremental(engine, model, shape, patch)


@given(st.tuples(st.integers(1, 4), st.integers(1, 20), st.integers(1, 20)), st.data())
def test_occlude_is_the_tests_painting(shape, data):
    # kfx.occlude is the documented reference definition (and other tests' oracle): it must paint
    # exactly what the independent painting does, for every kind of fill.
    patch = data.draw(patch_for(shape[1:], shape[0]))
    positions = data.draw(positions_for(shape[1:], patch))
    image = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(kfx.occlude(image, positions, patch), painted(image, positions, patch))


def test_drawn_weights_replay_whatever_torchs_global_rng_holds():
    drawn_weights = []

    @settings(max_examples=5, derandomize=True, database=None)
    @given(cnn(max_layers=3))
    def draw_models(drawn):
        drawn_weights.append([t.clone() for t in drawn[0].state_dict().values()])

    torch.manual_seed(0)
    draw_models()
    first = drawn_weights[:]
    drawn_weights.clear()
    torch.manual_seed(1)
    draw_models()
    assert len(first) == len(drawn_weights) == 5
    for a, b in zip(first, drawn_weights):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_engine_reports_where_it_goes_dense():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.GroupNorm(2, 4),  # normalises over the whole map: global context
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    engine = kfx.compile(model, (3, 12, 12), kfx.Patch(3, stride=3))
    roles = list(engine.roles().values())
    assert roles[:4] == ["input", "local", "pointwise", "dense"]
    assert [d.node for d in engine.dense_nodes] == ["_2"]
    assert "GroupNorm" in engine.dense_nodes[0].reason and "projected to full" in engine.dense_nodes[0].reason


def test_global_average_pooling_uses_the_exact_delta_not_a_projection():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    model = seed_weights(model.double().eval(), 0)
    engine = kfx.compile(model, (3, 12, 12), kfx.Patch(3, stride=3))
    assert list(engine.roles().values())[:3] == ["input", "local", "mean_delta"]
    assert engine.dense_nodes == []
    image = torch.randn(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = kfx.grid_positions((12, 12), engine.patch)
    with torch.no_grad():
        expected = model(painted(image, positions, engine.patch))
    assert relative_error(engine.outputs(image, positions), expected) <= 1e-12


def assert_dag_incremental(engine: kfx.Engine, model: nn.Sequential, shape, patch: kfx.Patch) -> None:
    """Everything before the first squeeze-excite block (global context, by design) runs on
    changed boxes; the stem conv (3x3, padding 1) recomputes at most patch + 2 rows and columns."""
    nodes = {node.name: node for node in engine.graph_module.graph.nodes}
    excites = [i for i, block in enumerate(model) if isinstance(block, SqueezeExcite)]
    first_dense = excites[0] if excites else len(model) - 3  # the tail: pool, flatten, linear
    dense = engine.dense_nodes
    if excites:
        assert len(dense) == 1 and top_level(nodes[dense[0].node]) == str(first_dense), dense
        assert "applies a gate computed from global context" in dense[0].reason
    else:
        assert dense == []
    before = {
        name: role
        for name, role in engine.roles().items()
        if top_level(nodes[name]) is None or int(top_level(nodes[name])) < first_dense
    }
    assert set(before.values()) <= INCREMENTAL_ROLES | SHAPE_ROLES, before
    stem, cost = model[0], engine.cost()
    stem_cost = next(layer for layer in cost.layers if top_level(nodes[layer.node]) == "0")
    bound = tuple(min(patch.size[a] + 2, shape[1 + a]) for a in (0, 1))
    assert stem_cost.full == stem.weight.numel() * shape[1] * shape[2]
    assert stem_cost.box[0] <= bound[0] and stem_cost.box[1] <= bound[1], (stem_cost, bound)
    if bound != tuple(shape[1:]):
        assert cost.incremental_fmas < cost.full_fmas
    event("patch area / image area", share(patch.size[0] * patch.size[1], shape[1] * shape[2]))
    event("stem box area / output area", share(stem_cost.box[0] * stem_cost.box[1], shape[1] * shape[2]))


@given(cases(dag_cnn()))
def test_branching_graphs_equal_full_inference(case):
    model, shape, patch, positions, image, batch_size = case
    engine = kfx.compile(model, shape, patch, batch_size=batch_size)
    with torch.no_grad():
        expected = model(painted(image, positions, patch))
    assert relative_error(engine.outputs(image, positions), expected) <= 1e-9, (model, patch)
    assert_dag_incremental(engine, model, shape, patch)
