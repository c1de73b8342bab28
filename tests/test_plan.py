"""The plan (docs/design.md §3.8): every plan is exact, the plan's model of the program agrees with
the program patch propagation builds, the choice follows the estimate, and the rates are cached per
machine. Rates are passed explicitly wherever a choice is asserted: no test depends on timings."""

from __future__ import annotations

import dataclasses
import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfx
from kfx.passes import plan as planning
from kfx.passes.patch_prop import META_KEY, SHAPE_ROLES, State, propagate_patches
from tests.strategies import cnn, dag_cnn, painted, patch_for, positions_for

# Convs free, gathering free, copying full maps and dense ops dear: incremental is cheapest.
FREE_INCREMENTAL = planning.Rates(1e30, 1e30, 1e30, 1.0, 0.0, 1.0, source="test: incremental is free")
# Convs on small windows dear, on full maps nearly free, gathering and steps dear: full is cheapest.
FREE_DENSE = planning.Rates(1.0, 1e30, 1.0, 1e30, 1.0, 0.0, source="test: dense is free")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@st.composite
def planned_cases(draw):
    """A drawn model (sequential or branching), patch, positions, image, and a drawn set of the
    nodes the plan may force dense."""
    model, shape = draw(st.one_of(cnn(), dag_cnn()))
    patch = draw(patch_for(shape[1:], shape[0]))
    positions = draw(positions_for(shape[1:], patch, max_positions=4))
    image = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    incremental = kfx.compile(model, shape, patch, plan="incremental", dtype=torch.float64).graph_module
    eligible = [n.name for n in incremental.graph.nodes if planning._eligible(n)]
    forced = draw(
        st.lists(st.sampled_from(eligible), unique=True) if eligible else st.just([]), label="forced"
    )
    return model, shape, patch, positions, image, forced, incremental


def compile_forced(model, shape, patch, forced: list[str]) -> kfx.Engine:
    """kfx.compile with the plan replaced by one that forces ``forced`` dense."""
    reasons = {name: f"plan: test forces {name}" for name in forced}
    drawn = planning.Plan("auto", "drawn", reasons, (), FREE_INCREMENTAL, "drawn by the test")
    with mock.patch("kfx.engine.choose_plan", return_value=drawn):
        return kfx.compile(model, shape, patch, plan="auto", plan_rates=FREE_INCREMENTAL, dtype=torch.float64)


def geometry(node) -> tuple:
    """What patch propagation decided for a node (its specs hold callables of their own graph; the
    reason of a node dense in both may change: only the first dense node says why)."""
    meta = node.meta[META_KEY]
    return meta.state, meta.role, meta.box, meta.read


@settings(max_examples=15)
@given(planned_cases())
def test_any_forced_set_is_exact_and_is_what_the_plan_modelled(case):
    """Forcing any set of nodes dense keeps the engine exact, reports each switch with the plan's
    reason, and dense_under and estimate (computed on the incremental annotation, as the plan
    does) agree with patch propagation run with the nodes forced (what the engine builds)."""
    model, shape, patch, positions, image, forced, before = case
    engine = compile_forced(model, shape, patch, forced)
    with torch.no_grad():
        expected = model(painted(image, positions, patch))
    assert relative_error(engine.outputs(image, positions), expected) <= 1e-9

    reported = {d.node: d.reason for d in engine.dense_nodes}
    for name in forced:  # a forced node no other forced node feeds is a switch
        if name not in planning.dense_under(before, set(forced) - {name}):
            assert reported[name] == f"plan: test forces {name}"

    after = engine.graph_module
    dense = planning.dense_under(before, set(forced))
    for b, a in zip(before.graph.nodes, after.graph.nodes):
        if b.name in dense or b.meta[META_KEY].role in SHAPE_ROLES:  # x.size() of a dense x: a dense op
            assert a.meta[META_KEY].state is State.DENSE, b.name
        else:
            assert geometry(a) == geometry(b), b.name
    rates = planning.STATIC_CPU_RATES
    assert planning.estimate(before, set(forced), rates, 8) == pytest.approx(
        planning.estimate(after, set(), rates, 8)
    )

    # The plan's pass re-classified only the forced nodes and what they feed: a propagation from
    # scratch with the same nodes forced gives every node the same answer.
    kept = {n.name: (geometry(n), n.meta[META_KEY].reason) for n in after.graph.nodes}
    reasons = {name: f"plan: test forces {name}" for name in forced}
    propagate_patches(after, tuple(shape[1:]), patch.size, force_dense=reasons or None)
    assert {n.name: (geometry(n), n.meta[META_KEY].reason) for n in after.graph.nodes} == kept


@settings(max_examples=8)
@given(st.one_of(cnn(), dag_cnn()), st.data())
def test_every_plan_mode_equals_full_inference(drawn, data):
    model, shape = drawn
    patch = data.draw(patch_for(shape[1:], shape[0]))
    positions = data.draw(positions_for(shape[1:], patch, max_positions=4))
    image = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        expected = model(painted(image, positions, patch))
    plans = [
        dict(plan="incremental"),
        dict(plan="full"),
        dict(plan="auto", plan_rates=planning.STATIC_CPU_RATES),
        dict(plan="auto", plan_rates=FREE_DENSE),
    ]
    engines = [kfx.compile(model, shape, patch, dtype=torch.float64, **options) for options in plans]
    for engine in engines:
        assert relative_error(engine.outputs(image, positions), expected) <= 1e-9, engine.plan


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=4, dilation=4),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def growing_cnn() -> nn.Sequential:
    """Two convs whose boxes stay small on a 64x64 map, then dilated ones that spread them over all of it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=8, dilation=8),
        nn.Conv2d(16, 16, 3, padding=16, dilation=16),
        nn.Conv2d(16, 16, 3, padding=16, dilation=16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def test_plan_incremental_forces_nothing():
    model = small_cnn()
    engine = kfx.compile(model, (3, 24, 24), kfx.Patch(4), plan="incremental")
    assert engine.plan.chosen == "incremental" and not engine.plan.forced
    assert engine.dense_nodes == []
    assert "plan='incremental'" in repr(engine)


def test_auto_keeps_the_incremental_program_when_incremental_work_is_free():
    engine = kfx.compile(small_cnn(), (3, 24, 24), kfx.Patch(4), plan="auto", plan_rates=FREE_INCREMENTAL)
    assert engine.plan.chosen == "incremental" and engine.dense_nodes == []
    assert engine.roles() == kfx.compile(small_cnn(), (3, 24, 24), kfx.Patch(4)).roles()


def test_auto_runs_full_inference_and_says_so_when_dense_work_is_free():
    # max_memory: an engine that does not time its plan (kfx.measured_plan) follows the estimate alone
    model, image = small_cnn(), torch.randn(3, 24, 24)
    patch = kfx.Patch(4, stride=4)
    engine = kfx.compile(model, (3, 24, 24), patch, plan="auto", plan_rates=FREE_DENSE, max_memory="1GB")
    assert engine.plan.chosen == "full" and engine.plan.full_inference
    assert [d.node for d in engine.dense_nodes] == ["_0"]  # the stem reads the occluded images
    assert "full inference is estimated cheapest" in engine.dense_nodes[0].reason
    assert "kfx runs plain batched inference" in repr(engine)
    assert engine.cost().theoretical_speedup == 1.0
    naive = kfx.NaiveEngine(model, (3, 24, 24), kfx.Patch(4, stride=4))
    torch.testing.assert_close(engine(image).values, naive(image).values)


def test_full_plan_runs_the_callers_model_on_occluded_copies():
    """Eager, as kfx.NaiveEngine: the model's in-place ops stay in place (the trace is functional)."""
    model, image, patch = small_cnn(), torch.randn(3, 24, 24), kfx.Patch(4, stride=4)
    engine = kfx.compile(model, (3, 24, 24), patch, plan="full", batch_size=5)
    positions = torch.tensor([[0, 0], [4, 8], [20, 20]])
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    try:
        outputs = engine.outputs(image, positions)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[-1], painted(image, positions, patch))
    torch.testing.assert_close(outputs, model(painted(image, positions, patch)).detach())


def test_auto_switches_where_boxes_cover_the_map_at_the_static_rates():
    """A 4x4 patch's box stays small for two convs, then dilated convs spread it over the whole
    64x64 map: there the incremental steps only add gathering to the same FMAs, and the plan runs
    densely from there (but not from the input: the first convs are worth running incrementally)."""
    model, image, patch = growing_cnn(), torch.randn(3, 64, 64), kfx.Patch(4, stride=16)
    incremental = kfx.compile(model, (3, 64, 64), patch)
    engine = kfx.compile(model, (3, 64, 64), patch, plan="auto", plan_rates=planning.STATIC_CPU_RATES)
    chosen = engine.plan.chosen
    assert chosen.startswith("box>="), str(engine.plan)
    estimates = {c.name: c.seconds_per_position for c in engine.plan.candidates}
    assert estimates[chosen] < estimates["incremental"] and estimates[chosen] < estimates["full"]
    switches = engine.plan.switch_nodes
    assert switches and {d.node for d in engine.dense_nodes} == set(switches)
    assert all(
        "of the map; full evaluation from here is estimated cheaper" in d.reason for d in engine.dense_nodes
    )
    roles = engine.roles()
    assert roles["_0"] == roles["_1"] == "local" and all(roles[s] == "dense" for s in switches)
    assert engine.cost().incremental_fmas > incremental.cost().incremental_fmas  # dense layers count fully
    torch.testing.assert_close(engine(image).values, incremental(image).values)
    assert chosen in str(engine.plan) and "<- chosen" in str(engine.plan)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(plan="fast"), "plan must be one of"),
        (dict(plan="full", tau=0.5), "plan='full' runs exact full inference"),
        (dict(plan="full", global_context="local"), "plan='full' runs exact full inference"),
        (dict(plan="auto", plan_rates={"dense": 1}), "plan_rates must be"),
        (
            dict(plan="auto", plan_rates=dataclasses.replace(FREE_DENSE, large_fmas_per_s=-1.0)),
            "plan_rates must be",
        ),
    ],
)
def test_bad_plan_arguments_are_input_errors(arguments, message):
    with pytest.raises(kfx.InputError, match=message):
        kfx.compile(small_cnn(), (3, 24, 24), kfx.Patch(4), **arguments)


def test_approximate_modes_keep_their_incremental_program():
    engine = kfx.compile(small_cnn(), (3, 24, 24), kfx.Patch(4), tau=0.5, plan="auto", plan_rates=FREE_DENSE)
    assert engine.plan.chosen == "incremental" and "approximate mode" in engine.plan.reason


# -- rates and their cache ------------------------------------------------------------------------

MEASURED = dataclasses.replace(planning.STATIC_CPU_RATES, source="test: measured")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(planning.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(planning.CALIBRATE_ENV, raising=False)
    return tmp_path


def test_rates_are_measured_once_and_then_read_from_the_cache(cache_dir):
    with mock.patch.object(planning, "calibrate", return_value=MEASURED) as measure:
        assert planning.machine_rates(torch.device("cpu")) == MEASURED
        assert planning.machine_rates(torch.device("cpu")) == MEASURED
    assert measure.call_count == 1
    stored = json.loads((cache_dir / "plan_rates.json").read_text())
    assert stored["version"] == 1 and len(stored["rates"]) == 1


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"version": 0, "rates": {}}),
        json.dumps([1, 2]),
        "MACHINE",  # a valid entry for this machine, but with a negative rate
    ],
)
def test_a_corrupt_or_old_cache_is_measured_again(cache_dir, content):
    if content == "MACHINE":
        key = planning._machine_key(torch.device("cpu"), torch.float32)
        bad = dict(dataclasses.asdict(MEASURED), copy_elements_per_s=-5.0)
        content = json.dumps({"version": 1, "rates": {key: bad}})
    (cache_dir / "plan_rates.json").write_text(content)
    with mock.patch.object(planning, "calibrate", return_value=MEASURED) as measure:
        assert planning.machine_rates(torch.device("cpu")) == MEASURED
    assert measure.call_count == 1
    assert planning.machine_rates(torch.device("cpu")) == MEASURED  # rewritten, now valid


def test_calibration_off_uses_static_rates_on_cpu_and_none_elsewhere(cache_dir, monkeypatch):
    monkeypatch.setenv(planning.CALIBRATE_ENV, "0")
    with mock.patch.object(planning, "calibrate") as measure:
        assert planning.machine_rates(torch.device("cpu")) is planning.STATIC_CPU_RATES
        assert planning.machine_rates(torch.device("cuda")) is None
    assert measure.call_count == 0
    engine = kfx.compile(small_cnn(), (3, 24, 24), kfx.Patch(4), plan="auto")
    assert engine.plan.rates is planning.STATIC_CPU_RATES


def test_calibration_measures_positive_finite_rates():
    rates = planning.calibrate(torch.device("cpu"))
    assert rates.valid() and rates.source.startswith("measured on")
