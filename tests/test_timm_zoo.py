"""timm's CNN families: exact against full inference (float64), and dense only where the model has
global context (issue #16). CI runs CI_SUBSET; `pytest -m slow tests/test_timm_zoo.py` runs the rest."""

import pytest
import torch

import kfx
from tests.timm_zoo import CI_SUBSET, TIMM_ZOO, build

pytest.importorskip("timm", reason="the timm zoo needs timm: pip install 'kfx[dev]'")

PARAMS = [pytest.param(name, marks=() if name in CI_SUBSET else pytest.mark.slow) for name in TIMM_ZOO]
PATCH = kfx.Patch(8, stride=4, fill=0.5)


def corner_and_interior_positions(size: int) -> torch.Tensor:
    hi = size - PATCH.size[0]
    return torch.tensor([[0, 0], [0, hi], [hi, 0], [hi, hi], [size // 3, size // 2]])


def assert_matches_full_inference(model, engine, size: int) -> None:
    image = torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = corner_and_interior_positions(size)
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, PATCH))
    actual = engine.outputs(image, positions)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-9


@pytest.mark.parametrize("name", PARAMS)
def test_timm_model_is_exact_and_dense_only_at_global_context(name):
    size, dense = TIMM_ZOO[name]
    model = build(name)
    engine = kfx.compile(model, (3, size, size), PATCH, batch_size=5)
    assert_matches_full_inference(model, engine, size)
    assert tuple(d.node for d in engine.dense_nodes) == dense


def test_local_global_context_lifts_every_squeeze_excitation_gate():
    model = build("mobilenetv3_small_100")
    exact = kfx.compile(model, (3, 64, 64), PATCH)
    local = kfx.compile(model, (3, 64, 64), PATCH, global_context="local")
    assert "global_context='local'" in exact.dense_nodes[0].reason
    assert local.dense_nodes == []
    assert local.cost().theoretical_speedup > exact.cost().theoretical_speedup


@pytest.mark.parametrize("name", ["resnet50_gn", "convnextv2_atto"])
def test_local_global_context_lifts_group_norm_and_grn(name):
    model = build(name)
    exact = kfx.compile(model, (3, 64, 64), PATCH)
    local = kfx.compile(model, (3, 64, 64), PATCH, global_context="local")
    assert "global_context='local'" in exact.dense_nodes[0].reason
    assert local.dense_nodes == []
    assert local.cost().theoretical_speedup > exact.cost().theoretical_speedup


def test_a_timm_module_fx_cannot_trace_runs_densely_as_a_leaf_with_no_hook():
    from timm.models.vgg import ConvMlp  # `if x.shape[-2] < self.input_size`: control flow on a shape

    model = build("vgg11")
    engine = kfx.compile(model, (3, 32, 32), PATCH, batch_size=5)  # timm registers ConvMlp as not traceable
    assert_matches_full_inference(model, engine, 32)
    assert [d.node for d in engine.dense_nodes] == ["pre_logits"]
    assert isinstance(engine.compiled.graph_module.get_submodule("pre_logits"), ConvMlp)


@pytest.mark.parametrize("name", ["regnetx_002", "mobilenetv3_small_100"])
def test_functional_batch_norm_costs_what_the_hand_made_module_costs(name):
    from tests.timm_zoo import with_classic_batch_norm

    size = TIMM_ZOO[name][0]
    timm_model, classic = build(name), with_classic_batch_norm(build(name))
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in classic.modules())
    with torch.no_grad():  # the same function
        image = torch.randn(1, 3, size, size, dtype=torch.float64)
        torch.testing.assert_close(classic(image), timm_model(image))
    options = dict(global_context="local")  # the gates of mobilenetv3 aside
    ceilings = [
        kfx.compile(m, (3, size, size), PATCH, **options).cost().theoretical_speedup
        for m in (timm_model, classic)
    ]
    assert ceilings[0] == pytest.approx(ceilings[1], rel=0.1)
