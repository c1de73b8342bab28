"""The end-to-end property: for any drawn CNN, image, patch and positions, the compiled engine
equals full inference on the occluded images (float64), and its heat map equals brute force."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import kfx
from tests.strategies import cnn, dag_cnn, patch_for, positions_for


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


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
        expected = model(kfx.occlude(image, positions, patch))
    actual = engine.outputs(image, positions)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= 1e-9, (model, patch, positions)


@given(cnn(max_layers=4), st.data())
def test_heatmap_equals_brute_force(drawn, data):
    model, shape = drawn
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        model = torch.nn.Sequential(model, torch.nn.Flatten(), torch.nn.LazyLinear(4)).double()
        model(torch.zeros(1, *shape, dtype=torch.float64))
        model.eval()
    patch = data.draw(patch_for(shape[1:], shape[0]))
    image = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    engine = kfx.compile(model, shape, patch, dtype=torch.float64)
    heatmap = engine(image)

    grid = kfx.grid_positions(shape[1:], patch)
    with torch.no_grad():
        base = torch.softmax(model(image[None]), 1)[0]
        target = int(base.argmax())
        brute = torch.softmax(model(kfx.occlude(image, grid, patch)), 1)[:, target]
    h_m = (shape[1] - patch.size[0]) // patch.stride[0] + 1
    w_m = (shape[2] - patch.size[1]) // patch.stride[1] + 1
    assert heatmap.values.shape == (h_m, w_m)
    assert heatmap.target == target
    assert abs(heatmap.base - base[target].item()) <= 1e-12
    assert relative_error(heatmap.values, brute.view(h_m, w_m)) <= 1e-9


def test_engine_reports_where_it_goes_dense():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Upsample(scale_factor=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    engine = kfx.compile(model, (3, 12, 12), kfx.Patch(3, stride=3))
    roles = list(engine.roles().values())
    assert roles[:4] == ["input", "local", "pointwise", "dense"]
    assert [d.node for d in engine.dense_nodes] == ["_2"]
    assert "Upsample" in engine.dense_nodes[0].reason and "projected to full" in engine.dense_nodes[0].reason


def test_global_average_pooling_uses_the_exact_delta_not_a_projection():
    model = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 2),
        )
        .double()
        .eval()
    )
    engine = kfx.compile(model, (3, 12, 12), kfx.Patch(3, stride=3))
    assert list(engine.roles().values())[:3] == ["input", "local", "mean_delta"]
    assert engine.dense_nodes == []
    image = torch.randn(3, 12, 12, dtype=torch.float64)
    positions = kfx.grid_positions((12, 12), engine.patch)
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, engine.patch))
    assert relative_error(engine.outputs(image, positions), expected) <= 1e-12


@given(cases(dag_cnn()))
def test_branching_graphs_equal_full_inference(case):
    model, shape, patch, positions, image, batch_size = case
    engine = kfx.compile(model, shape, patch, batch_size=batch_size)
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, patch))
    assert relative_error(engine.outputs(image, positions), expected) <= 1e-9, (model, patch)
