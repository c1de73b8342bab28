"""plan="auto" (kfx.compile's default) times its program against plain batched inference on the
first full-size batches and keeps the faster path (kfx.measured_plan). The clock is the test's:
each path advances it by a set amount, so which path is faster is decided here, not by the machine.
Every map is checked against kfx.NaiveEngine (brute-force occlusion) whichever path ran."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import kfx
from kfx import measured_plan
from kfx.passes import plan as planning

SHAPE, PATCH, STEP = (3, 16, 16), kfx.Patch(4, stride=2), 8  # 49 positions: 6 full batches + 1


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
        .eval()
        .double()
    )


def image() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


class FakeClock:
    """perf_counter for kfx.measured_plan, advanced only by the engine's two paths."""

    def __init__(self, monkeypatch, engine, incremental_seconds: float, full_seconds: float):
        self.now, self.paths = 0.0, []
        monkeypatch.setattr(measured_plan.time, "perf_counter", lambda: self.now)
        for name, path, cost in (
            ("_incremental", "incremental", incremental_seconds),
            ("_full_inference", "full", full_seconds),
        ):
            monkeypatch.setattr(engine, name, self._timed(getattr(engine, name), path, cost))

    def _timed(self, run, path, cost):
        def wrapped(base, positions):
            self.now += cost * positions.shape[0]
            self.paths.append((path, positions.shape[0]))
            return run(base, positions)

        return wrapped


def brute_force(model, x) -> torch.Tensor:
    return kfx.NaiveEngine(model, SHAPE, PATCH)(x).values


@pytest.mark.parametrize("full_faster", [True, False])
def test_the_faster_path_is_kept_after_two_samples_each_and_the_map_stays_exact(monkeypatch, full_faster):
    model, x = small_cnn(), image()
    engine = kfx.compile(model, SHAPE, PATCH, plan="auto", batch_size=STEP)
    clock = FakeClock(monkeypatch, engine, 1.5e-3 if full_faster else 1e-3, 1e-3 if full_faster else 1.5e-3)
    heatmap = engine(x)
    winner = "full" if full_faster else "incremental"
    assert clock.paths[:4] == [("incremental", STEP), ("full", STEP)] * 2
    assert clock.paths[4:] == [(winner, STEP)] * 2 + [(winner, 1)]
    measured = engine.plan.measured
    assert (measured.incremental_seconds, measured.full_seconds) == pytest.approx(
        (1.5e-3, 1e-3) if full_faster else (1e-3, 1.5e-3)
    )
    assert engine.plan.full_inference is full_faster
    assert ("runs plain batched inference" in engine.plan.summary()) is full_faster
    assert "measured on batches of 8" in repr(engine)
    torch.testing.assert_close(heatmap.values, brute_force(model, x), rtol=0, atol=1e-12)
    again = engine(x)  # decided: no more sampling
    assert clock.paths[7:] == [(winner, STEP)] * 6 + [(winner, 1)]
    torch.testing.assert_close(again.values, heatmap.values, rtol=0, atol=1e-12)
    other = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(engine(other).values, brute_force(model, other), rtol=0, atol=1e-12)
    # decided on full inference, a new image's base is the plain model's output: no activations kept
    assert (engine._base_cache.activations == []) is full_faster


def test_partial_and_small_batches_are_not_timed_and_samples_add_up_across_calls(monkeypatch):
    model, x = small_cnn(), image()
    engine = kfx.compile(model, SHAPE, PATCH, plan="auto", batch_size=STEP)
    clock = FakeClock(monkeypatch, engine, 1.5e-3, 1e-3)
    grid = torch.arange(0, SHAPE[1] - 3, 2)
    positions = torch.cartesian_prod(grid, grid)[:19]  # 2 full batches and 3
    engine.outputs(x, positions)
    assert clock.paths == [("incremental", STEP), ("full", STEP), ("incremental", 3)]
    assert engine.plan.measured is None and "timed against full inference" in engine.plan.reason
    engine.outputs(x, positions[: STEP - 1], batch_size=STEP)  # smaller than one step: not a sample
    engine.outputs(x, positions[:2], batch_size=2)  # below MIN_STEP: not a sample
    assert clock.paths[3:] == [("incremental", STEP - 1), ("incremental", 2)]
    expected = kfx.NaiveEngine(model, SHAPE, PATCH).outputs(x, positions)
    torch.testing.assert_close(engine.outputs(x, positions), expected, rtol=0, atol=1e-12)
    assert clock.paths[5:7] == [("incremental", STEP), ("full", STEP)]
    assert engine.plan.full_inference and clock.paths[7:] == [("full", 3)]


@pytest.mark.parametrize(
    "options",
    [
        dict(plan="incremental"),
        dict(plan="full"),
        dict(plan="auto", tau=0.5),
        dict(plan="auto", global_context="local"),
        dict(plan="auto", max_memory="1GB"),
    ],
    ids=["incremental", "full", "tau", "local", "max_memory"],
)
def test_no_measurement_where_the_paths_differ_or_the_user_fixed_them(monkeypatch, options):
    model, x = small_cnn(), image()
    sizing = {} if "max_memory" in options else {"batch_size": STEP}
    engine = kfx.compile(model, SHAPE, PATCH, **sizing, **options)
    clock = FakeClock(monkeypatch, engine, 2e-3, 1e-3)
    engine(x)
    only = "full" if options.get("plan") == "full" else "incremental"
    assert {path for path, _ in clock.paths} == {only}
    assert engine.plan.measured is None


def test_threads_sharing_an_engine_get_exact_maps_and_one_decision():
    model = small_cnn()
    engine = kfx.compile(model, SHAPE, PATCH, plan="auto", batch_size=STEP)
    images = [
        torch.randn(SHAPE, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(4)
    ]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = engine(images[i]).values

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, x in enumerate(images):
        torch.testing.assert_close(results[i], brute_force(model, x), rtol=0, atol=1e-12)
    assert engine.plan.measured is not None


@pytest.mark.library_defaults
def test_kfx_compile_defaults_to_the_measured_auto_plan(tmp_path):
    model, x = small_cnn(), image()
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=STEP)
    assert engine.plan.mode == "auto" and engine.plan.measured is None
    heatmap = engine(x)
    assert engine.plan.measured is not None  # whichever path won on this machine
    torch.testing.assert_close(heatmap.values, brute_force(model, x), rtol=0, atol=1e-12)
    engine.save(tmp_path / "engine.kfx")
    loaded = kfx.load(tmp_path / "engine.kfx", model)
    assert loaded.plan.mode == "auto" and loaded.plan.measured is None  # it measures again


def test_an_estimated_full_inference_is_timed_against_the_best_incremental_plan(monkeypatch):
    # Dense work free in the estimate: it prefers full inference, which runs until the measurement
    # (here: the program is faster) says otherwise.
    dense_is_free = planning.Rates(1.0, 1e30, 1.0, 1e30, 1.0, 0.0, source="test: dense is free")
    model, x = small_cnn(), image()
    engine = kfx.compile(model, SHAPE, PATCH, plan="auto", plan_rates=dense_is_free, batch_size=STEP)
    assert engine.plan.estimated_full and engine.plan.full_inference and engine.plan.chosen != "full"
    assert "is timed against full inference" in engine.plan.reason
    clock = FakeClock(monkeypatch, engine, 1e-3, 1.5e-3)
    grid = torch.arange(0, SHAPE[1] - 3, 2)
    engine.outputs(x, torch.cartesian_prod(grid, grid)[:3])  # not a sample: the estimate's path
    assert clock.paths == [("full", 3)]
    heatmap = engine(x)
    assert clock.paths[1:5] == [("incremental", STEP), ("full", STEP)] * 2
    assert set(clock.paths[5:]) == {("incremental", STEP), ("incremental", 1)}
    assert not engine.plan.full_inference and "runs the incremental program" in repr(engine)
    torch.testing.assert_close(heatmap.values, brute_force(model, x), rtol=0, atol=1e-12)


def test_a_near_tie_goes_to_plain_inference(monkeypatch):
    model, x = small_cnn(), image()
    engine = kfx.compile(model, SHAPE, PATCH, plan="auto", batch_size=STEP)
    FakeClock(
        monkeypatch, engine, 1e-3, 1e-3 * (measured_plan.MARGIN - 0.01)
    )  # the program wins, by less than MARGIN
    heatmap = engine(x)
    assert engine.plan.full_inference and "won by less than" in repr(engine)
    torch.testing.assert_close(heatmap.values, brute_force(model, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("full_faster", [True, False])
def test_one_sample_each_decides_a_decisive_gap(monkeypatch, full_faster):
    model, x = small_cnn(), image()
    engine = kfx.compile(model, SHAPE, PATCH, plan="auto", batch_size=STEP)
    slow, fast = 1e-3 * measured_plan.DECISIVE, 1e-3
    clock = FakeClock(monkeypatch, engine, slow if full_faster else fast, fast if full_faster else slow)
    heatmap = engine(x)
    winner = "full" if full_faster else "incremental"
    assert clock.paths[:2] == [("incremental", STEP), ("full", STEP)]
    assert clock.paths[2:] == [(winner, STEP)] * 4 + [(winner, 1)]
    assert engine.plan.full_inference is full_faster
    torch.testing.assert_close(heatmap.values, brute_force(model, x), rtol=0, atol=1e-12)
