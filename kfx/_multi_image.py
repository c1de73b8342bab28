"""Several images' occlusion outputs from one engine, with positions of several images in one batch.

A small image has fewer patch positions than ``engine.batch_size``, so one image at a time leaves
each model call part empty (issue #18 item 7). :func:`grid_outputs` runs the whole position grid
of a group of same-shape images by full inference on occluded copies (as ``Engine._evaluate``
runs a plan that chose full inference), the images' grids laid end to end and cut into batches of
at most ``engine.batch_size`` positions, so a batch may hold positions of several images.

Each output row belongs to exactly one image: image i's outputs are rows ``[i * P, (i + 1) * P)``
of that flat order, handed back per image, never merged.

The other path the issue suggests, the incremental program under ``torch.func.vmap`` over the
images' stacked base activations, is exact but was slower than one image at a time in every
configuration measured (32/64 px, small CNN and ResNet18): the program's ``scatter_`` has no vmap
batching rule, so vmap runs it image by image. It is not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kfx.errors import ModelError
from kfx.patch import grid_positions, occlude

__all__ = ["grid_outputs", "group_size", "positions_per_image"]

MAX_GROUP = 16  # images per group at most: a group's rows are written (and lost to a Ctrl-C) together


def positions_per_image(engine) -> int:
    """How many patch positions one image's full map has."""
    return math.prod(engine.patch.grid_shape(tuple(engine.image_shape[1:])))


def group_size(engine, run_options: dict | None = None) -> int:
    """How many images :func:`grid_outputs` should run together: 1 (one at a time) unless the
    engine is exact (tau 1, exact global context, no drill-down), runs full inference
    (:func:`_runs_fully`) and one image has fewer positions than a batch; then enough images to
    fill whole batches (images x positions a multiple of the batch size), at most MAX_GROUP."""
    from kfx.engine import Engine

    positions = positions_per_image(engine)
    exact = engine.tau == 1 and engine.global_context == "exact" and not (run_options or {}).get("drill_down")
    if not (isinstance(engine, Engine) and exact and positions < engine.batch_size and _runs_fully(engine)):
        return 1
    return min(MAX_GROUP, math.lcm(positions, engine.batch_size) // positions)


def _runs_fully(engine) -> bool:
    """Whether a group runs by full inference on occluded copies: when the engine does (its plan
    chose it, or its run-time measurement did: kfx/measured_plan.py).

    Only then are images grouped. Where the plan keeps the incremental program, grouped full
    inference was 2-7x slower than one image at a time through the program (16 images of 32/64 px,
    a five-conv CNN whose static ceiling is 2.4-5.1x), and the program under vmap (module
    docstring) was no faster than one image at a time.
    """
    return engine.plan is not None and engine.plan.full_inference


def grid_outputs(engine, bases: Sequence) -> list[torch.Tensor]:
    """Each image's model outputs [P, ...] at the engine's full position grid (row-major), by
    full inference on occluded copies, positions of several images sharing a batch.

    ``bases``: ``engine._prepare(image)`` of each image (this engine, the same weights). Equal to
    ``engine.outputs(image, grid)`` per image, up to the floating-point rounding of a batched run.
    """
    if not bases:
        return []
    versions = bases[0].versions
    if any(base.versions != versions for base in bases):
        raise ModelError("the model's weights changed while these images were being prepared; run them again")
    positions = grid_positions(tuple(engine.image_shape[1:]), engine.patch).to(engine.device)
    flat = torch.cat(list(_full_batches(engine, bases, positions, versions)))
    return list(flat.split(positions.shape[0]))


def _full_batches(engine, bases, positions: torch.Tensor, versions: tuple):
    """The model on occluded copies, the images' grids laid end to end and cut every batch_size."""
    count, step = positions.shape[0], engine.batch_size
    total = count * len(bases)
    for start in range(0, total, step):
        # As Engine._batches: weights changed mid-run is an error, never a map of two models.
        if engine._versions() != versions:
            raise ModelError(
                "the model's weights changed while these maps were being computed; run them again"
            )
        stop = min(start + step, total)
        copies = []
        for index in range(start // count, (stop - 1) // count + 1):  # the images this batch touches
            first, last = max(start, index * count), min(stop, (index + 1) * count)
            rows = positions[first - index * count : last - index * count]
            copies.append(occlude(bases[index].image, rows, engine.patch))
        # no_grad per batch, as Engine._batches (grad mode is per thread)
        with torch.no_grad():
            yield engine._run_model(torch.cat(copies))
