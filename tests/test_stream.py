"""Interactive mode: streaming partial maps, selections of cells, cancelling. The oracle is the
full heat map of the same engine (itself checked against brute force) and brute force directly."""

import dataclasses
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import kfx
from tests.strategies import painted


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
        )
        .double()
        .eval()
    )


@pytest.fixture(scope="module")
def setup():
    model = small_model()
    engine = kfx.compile(model, (3, 24, 24), kfx.Patch(6, stride=3), batch_size=7)
    image = torch.randn(3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, engine, image


def brute_force(model, image, positions, patch, target):
    with torch.no_grad():
        return torch.softmax(model(painted(image, positions, patch)), dim=1)[:, target]


def test_stream_fills_in_batch_by_batch_and_ends_at_the_full_map(setup):
    model, engine, image = setup
    full = engine(image)
    steps = list(engine.stream(image))
    total = full.values.numel()
    assert [s.done for s in steps] == [min(total, 7 * (i + 1)) for i in range(len(steps))]
    assert all(s.total == total for s in steps)
    assert [int(s.heatmap.evaluated.sum()) for s in steps] == [s.done for s in steps]
    assert torch.equal(steps[-1].heatmap.values, full.values)
    positions = kfx.grid_positions((24, 24), engine.patch)
    expected = brute_force(model, image, positions, engine.patch, full.target).view_as(full.values)
    torch.testing.assert_close(full.values, expected, rtol=1e-9, atol=1e-12)


@given(st.integers(0, 23), st.integers(0, 23), st.integers(1, 24), st.integers(1, 24))
def test_selection_evaluates_exactly_the_cells_whose_window_touches_it(setup, y, x, h, w):
    model, engine, image = setup
    pixels = torch.zeros(24, 24, dtype=torch.bool)
    pixels[y : y + h, x : x + w] = True
    cells = engine.cells_overlapping(pixels)
    # oracle: a window at (4i, 4j) touches the selection iff the occluded pixels intersect it
    positions = kfx.grid_positions((24, 24), engine.patch)
    occluded = painted(torch.ones(1, 24, 24), positions, engine.patch)[:, 0] == 0
    expected_cells = (occluded & pixels).flatten(1).any(dim=1).view_as(cells)
    assert torch.equal(cells, expected_cells)
    part = engine(image, cells=cells)
    assert torch.equal(part.evaluated, cells)
    if cells.any():
        wanted = brute_force(model, image, positions[cells.view(-1)], engine.patch, part.target)
        torch.testing.assert_close(part.values[cells], wanted, rtol=1e-9, atol=1e-12)


def test_an_empty_selection_gives_an_all_nan_map(setup):
    _, engine, image = setup
    empty = torch.zeros(engine.patch.grid_shape((24, 24)), dtype=torch.bool)
    heatmap = engine(image, cells=empty)
    assert heatmap.values.isnan().all() and not heatmap.evaluated.any()
    assert torch.equal(heatmap.to_pixels(), torch.zeros(24, 24, dtype=heatmap.values.dtype))


def test_partial_to_pixels_averages_only_evaluated_windows(setup):
    _, engine, image = setup
    full = engine(image)
    cells = torch.zeros_like(full.evaluated)
    cells[1, 2] = True
    part = engine(image, cells=cells)
    pixels = part.to_pixels()
    y, x = 1 * 3, 2 * 3
    drop = part.base - part.values[1, 2].item()
    assert torch.allclose(pixels[y : y + 6, x : x + 6], torch.full((6, 6), drop, dtype=pixels.dtype))
    assert pixels.count_nonzero() == 36


def test_closing_the_stream_cancels_the_remaining_batches(setup, monkeypatch):
    _, engine, image = setup
    calls = []
    program = engine.program
    counting = lambda *args: calls.append(1) or program(*args)  # noqa: E731
    monkeypatch.setattr(engine, "compiled", dataclasses.replace(engine.compiled, program=counting))
    stream = engine.stream(image)
    first = next(stream)
    stream.close()
    assert first.done == 7 and len(calls) == 1


@pytest.mark.parametrize(
    "cells",
    [torch.ones(3, 3, dtype=torch.bool), torch.ones(7, 7), "all", torch.ones(7, 7, dtype=torch.bool)[None]],
)
def test_bad_cells_are_rejected(setup, cells):
    _, engine, image = setup
    with pytest.raises(kfx.InputError, match="cells must be a bool tensor"):
        engine(image, cells=cells)


def test_bad_selection_mask_is_rejected(setup):
    _, engine, _ = setup
    with pytest.raises(kfx.InputError, match="selection"):
        engine.cells_overlapping(torch.ones(10, 10, dtype=torch.bool))


def test_a_stream_resumed_on_another_thread_stays_gradient_free(setup, monkeypatch):
    # Web servers resume generators on whichever worker thread is free; grad mode is per thread:
    # every batch must run without grad on the thread that runs it, and leave each thread's grad
    # mode as it found it.
    _, engine, image = setup
    batches = []  # (thread that ran the batch, its grad mode while the batch ran)
    program = engine.program

    def recording_program(*args):
        batches.append((threading.get_ident(), torch.is_grad_enabled()))
        return program(*args)

    monkeypatch.setattr(engine, "compiled", dataclasses.replace(engine.compiled, program=recording_program))
    stream = engine.stream(image)
    first = next(stream)
    assert torch.is_grad_enabled()  # the thread that started the stream
    later, worker_grad = [], []

    def resume():
        later.extend(stream)
        worker_grad.append(torch.is_grad_enabled())  # the thread that resumed it

    worker = threading.Thread(target=resume)
    worker.start()
    worker.join()
    assert worker_grad == [True]
    assert torch.is_grad_enabled()
    assert len(batches) == 1 + len(later) > 1
    assert batches[0][0] == threading.get_ident()
    assert all(thread == worker.ident for thread, _ in batches[1:])
    assert not any(grad for _, grad in batches)
    assert not first.heatmap.values.requires_grad
    assert later and not any(step.heatmap.values.requires_grad for step in later)
