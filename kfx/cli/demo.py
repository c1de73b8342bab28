"""``kfx demo``: maps of the sample photos as one gallery, and kfx's speedup measured in this run."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kfx

# read_image and run_occlusion are looked up on the package when called (see kfx.cli.explain).
from kfx import cli
from kfx.cli.checks import _device, _load_model
from kfx.cli.common import DEFAULT_PATCH, DEMO_QUICK_STRIDE, DEMO_STRIDE, EXIT_OK
from kfx.cli.images import _model_input
from kfx.cli.outputs import _check_picture_format, _check_writable_place, _writing


@dataclass(frozen=True)
class PhotoRun:
    """One demo photo: its map and both timings (kfx on every position, full inference on a subset)."""

    name: str
    label: str
    heatmap: kfx.Heatmap
    kfx_s: float
    positions: int
    naive_s: float
    naive_positions: int
    max_difference: float  # |kfx - full inference| over the subset, probabilities of the target


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads the time the work took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_full_inference(
    model, image, patch, positions, batch_size: int, target: int
) -> tuple[float, torch.Tensor]:
    """Seconds to run ``model(kfx.occlude(image, batch, patch))`` over ``positions`` in batches, and
    the target's probabilities: the baseline kfx replaces (KRYPTON's "naive" full inference,
    :class:`kfx.NaiveEngine`)."""
    naive = kfx.NaiveEngine(model, tuple(image.shape[-3:]), patch, batch_size=batch_size)
    _synchronize(image.device)
    started = time.perf_counter()
    scores = naive.outputs(image, positions)
    _synchronize(image.device)
    return time.perf_counter() - started, torch.softmax(scores, dim=1)[:, target].cpu()


def _spread_indices(total: int, count: int) -> torch.Tensor:
    """``count`` grid indices spread evenly over ``total`` (full inference costs the same anywhere)."""
    return torch.linspace(0, total - 1, min(count, total)).round().long().unique()


def _warm_up(engine, model, image: torch.Tensor, patch: kfx.Patch) -> None:
    """One small untimed batch each way (lazy initialisation, allocator), on another image so that
    kfx's cache of the unoccluded activations does not favour the first timed photo."""
    other = torch.zeros_like(image)
    positions = kfx.grid_positions(tuple(image.shape[-2:]), patch)[:2]
    engine.outputs(other, positions)
    with torch.no_grad():
        model(kfx.occlude(other, positions, patch))


def _measure_photo(name, image, engine, model, loaded, args, show_bar: bool) -> PhotoRun:
    """kfx's whole map, then full inference on an evenly spread subset of the same positions."""
    _synchronize(image.device)
    started = time.perf_counter()
    step = cli.run_occlusion(
        engine, image, None, batch_size=args.batch_size, run_options={}, desc=name, show_bar=show_bar
    )
    _synchronize(image.device)
    kfx_s = time.perf_counter() - started
    heatmap = step.heatmap
    grid = kfx.grid_positions(tuple(image.shape[-2:]), engine.patch)
    subset = _spread_indices(grid.shape[0], args.naive_positions)
    naive_s, naive = time_full_inference(
        model, image, engine.patch, grid[subset], args.batch_size, heatmap.target
    )
    ours = heatmap.values.reshape(-1)[subset].to(naive.dtype)
    return PhotoRun(
        name, loaded.label(heatmap.target), heatmap, kfx_s, step.done, naive_s, int(subset.numel()),
        float((ours - naive).abs().max()),
    )  # fmt: skip


def _demo_report(
    runs: list[PhotoRun], loaded, engine, batch_size: int, compile_s: float, device
) -> tuple[float, list[str]]:
    """The measured speedup and the lines that say honestly how it was measured."""
    positions = sum(run.positions for run in runs)
    kfx_s = sum(run.kfx_s for run in runs)
    naive_timed = sum(run.naive_positions for run in runs)
    naive_s = sum(run.naive_s for run in runs)
    naive_rate = naive_timed / naive_s
    naive_estimate = positions / naive_rate
    speedup = naive_estimate / kfx_s
    patch, theoretical = engine.patch, engine.cost().theoretical_speedup
    threads = f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs"
    where = threads if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} ({threads})"
    lines = [
        f"speedup {speedup:.2f}x over batched full inference, measured in this run ({loaded.name}, "
        f"patch {patch.size[0]}, stride {patch.stride[0]}, batches of {batch_size}; {where})",
        f"  kfx: all {positions} positions of {len(runs)} photos in {kfx_s:.1f} s = {positions / kfx_s:,.1f} positions/s "
        f"(compile {compile_s:.1f} s, once, not counted)",
        f"  full inference: timed on {naive_timed} of the same positions ({naive_timed // len(runs)} per photo, "
        f"evenly spread) in {naive_s:.1f} s = {naive_rate:,.1f} positions/s, scaled by count to {positions} "
        f"positions: {naive_estimate:.1f} s (estimated, not run in full)",
        f"  max |kfx - full inference| over the timed positions: {max(run.max_difference for run in runs):.1e}; "
        f"static FLOP model of this engine: {theoretical:.2f}x",
    ]
    return speedup, lines


def _demo(args) -> int:
    """``kfx demo``: maps of the sample photos, a gallery, and the speedup measured side by side."""
    from kfx import plot
    from kfx.models import SAMPLE_PHOTOS

    device = _device(args.device)
    out = Path(args.out) if Path(args.out).suffix else Path(args.out).with_suffix(".png")
    _check_picture_format(out)
    _check_writable_place(out)
    photos = args.photos or list(SAMPLE_PHOTOS)
    loaded = _load_model(args)
    model = loaded.model.to(device)
    images = [_model_input(loaded, cli.read_image(name), name, loaded.size, device) for name in photos]
    patch = kfx.Patch(DEFAULT_PATCH, stride=DEMO_QUICK_STRIDE if args.quick else DEMO_STRIDE, fill=0.0)
    started = time.perf_counter()
    engine = kfx.compile(model, tuple(images[0].shape), patch, batch_size=args.batch_size)
    compile_s = time.perf_counter() - started
    _warm_up(engine, model, images[0], patch)
    show_bar = not args.quiet and sys.stderr.isatty()
    runs = []
    for name, image in zip(photos, images):
        run = _measure_photo(name, image, engine, model, loaded, args, show_bar)
        runs.append(run)
        if not args.quiet:
            print(
                f"{name}: {run.label} (p = {run.heatmap.base:.3f}); kfx {run.positions} positions in "
                f"{run.kfx_s:.1f} s, full inference {run.naive_positions} positions in {run.naive_s:.1f} s",
                flush=True,
            )
    speedup, lines = _demo_report(runs, loaded, engine, args.batch_size, compile_s, device)
    title = (
        f"kfx occlusion maps, {loaded.name}, patch {patch.size[0]}, stride {patch.stride[0]}: "
        f"{speedup:.1f}x faster than batched full inference here ({torch.get_num_threads()} threads)"
    )
    panels = [(run.heatmap, image, run.label, run.name) for run, image in zip(runs, images)]
    _writing(out, lambda p: plot.gallery(panels, p, title=title))
    if not args.quiet:
        print("\n".join([*lines, f"wrote {out}"]), flush=True)
    return EXIT_OK
