"""3-D volumes and 1-D signals (issue #17): kfx exact vs batched full inference, MONAI's
OcclusionSensitivity and Captum's Occlusion, side by side in one run.

3-D: MONAI's DenseNet121 and ResNet18 (``spatial_dims=3``, one input channel, two classes, random
weights: speed does not depend on them) on a synthetic volume (smooth noise plus a bright ellipsoid)
of --sides voxels a side, a 16^3 mask, MONAI's window placement at --overlaps (0.6 is MONAI's
default: a stride of round(16 * 0.4) = 6 voxels; 0.8 gives 3). In this one process:

  full    batched full inference on occluded copies (kfx.NaiveEngine), best of --batch-sizes;
  kfx     the exact engine (engine.outputs) on the same positions, best batch size, the unoccluded
          volume's base inference included in every timed run;
  monai   ``monai.visualize.OcclusionSensitivity`` with the same mask, overlap and n_batch, on the
          whole volume, where --monai-budget seconds (estimated from the full-inference rate)
          allow; otherwise the row says so and MONAI's time is not claimed.

A full map has thousands of windows (18^3 = 5832 at 128^3, overlap 0.6), so full and kfx are timed
on --positions random window corners (the same for both) and scaled by the window count: the cost of
a position does not depend on where it is (the box is uniform). kfx's map time adds its one base
inference of the unoccluded volume (timed separately). ``ceiling`` is
``engine.cost().theoretical_speedup`` (per position); ``realized`` the measured per-position
speedup over it.

1-D: MONAI's ResNet18 (``spatial_dims=1``, 12 leads, 5 classes) on length-5000 signals, patch 250,
stride 50 (96 windows, the whole grid): kfx vs batched full inference vs ``captum.attr.Occlusion``
(sliding window (12, 250), strides (12, 50), perturbations_per_eval = batch size).

Each time is the best of --repeats runs. Results: JSON and Markdown in benchmarks/results/ with the
machine, torch, threads, commit and command. Never run by the tests.

    python benchmarks/volumes.py                                   # everything (long on 2 cores)
    python benchmarks/volumes.py --sides 64 --overlaps 0.6 --positions 8 --repeats 1 --tag volumes_quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from compare import RESULTS, best_time, machine  # benchmarks/ is on sys.path

import kfx

MASK = 16


def volume(side: int) -> torch.Tensor:
    """[1, D, H, W]: smooth noise plus a bright ellipsoid off the centre (something to find)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, side // 8, side // 8, side // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(noise, size=(side,) * 3, mode="trilinear")[0]
    axis = torch.linspace(-1, 1, side)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    blob = (((z - 0.3) / 0.25) ** 2 + ((y + 0.2) / 0.3) ** 2 + (x / 0.2) ** 2 < 1).float()
    return smooth + 2 * blob[None]


def network(name: str, axes: int) -> torch.nn.Module:
    from monai.networks import nets

    torch.manual_seed(0)
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=axes, in_channels=1, out_channels=2).eval()
    if axes == 1:
        return nets.resnet18(spatial_dims=1, n_input_channels=12, num_classes=5).eval()
    return nets.resnet18(spatial_dims=axes, n_input_channels=1, num_classes=2).eval()


def window_corners(
    side: int, stride: int, count: int, axes: int, size: int = MASK
) -> tuple[torch.Tensor, int]:
    """``count`` random corners of the grid of windows of ``size`` (all of them if count is 0) and
    the grid's size."""
    per_axis = (side - size) // stride + 1
    total = per_axis**axes
    generator = torch.Generator().manual_seed(1)
    cells = torch.randperm(total, generator=generator)[: count or total]
    corners = torch.stack([(cells // per_axis ** (axes - 1 - a)) % per_axis for a in range(axes)], 1) * stride
    return corners, total


def full_outputs(model, x, positions, patch, batch_size):
    return kfx.NaiveEngine(model, tuple(x.shape), patch, batch_size=batch_size).outputs(x, positions)


def kfx_outputs(engine, x, positions, batch_size):
    """The positions alone: the unoccluded volume's base inference is cached by a first call and
    timed once per map separately (a map runs it once, whatever its window count)."""
    return engine.outputs(x, positions, batch_size=batch_size)


def kfx_map(engine, x, positions, batch_size):
    """A whole map as a first call computes it: the base inference, then every position."""
    engine._base_cache = None
    return engine.outputs(x, positions, batch_size=batch_size)


def base_seconds(engine, x, repeats: int) -> float:
    def base():
        engine._base_cache = None
        engine.outputs(x, torch.zeros((0, x.dim() - 1), dtype=torch.long))

    return best_time(base, repeats)


def run_volume(name: str, side: int, args) -> list[dict]:
    """One row per overlap. A position costs the same whatever the stride (the changed box depends
    on the mask only), so positions are timed once, at the first overlap's grid, and each overlap's
    map time is that cost times its window count."""
    model = network(name, 3)
    x = volume(side)
    patch = kfx.Patch(MASK, stride=max(1, round(MASK * (1 - args.overlaps[0]))))
    started = time.perf_counter()
    engine = kfx.compile(model, tuple(x.shape), patch)
    compile_s = time.perf_counter() - started
    positions, _ = window_corners(side, patch.stride[0], args.positions, 3)
    t_base = base_seconds(engine, x, args.repeats)
    kfx_outputs(engine, x, positions[:1], 1)  # the base activations, cached for the timed runs
    rows = []
    for batch in args.batch_sizes:
        t_full = best_time(lambda b=batch: full_outputs(model, x, positions, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch: kfx_outputs(engine, x, positions, b), args.repeats)
        rows.append({"batch_size": batch, "full_s": round(t_full, 3), "kfx_s": round(t_kfx, 3)})
    check = kfx_outputs(engine, x, positions[:2], 2)
    with torch.no_grad():
        expected = model(kfx.occlude(x, positions[:2], patch))
    error = ((check - expected).abs().max() / expected.abs().max()).item()
    best_full, best_kfx = min(r["full_s"] for r in rows), min(r["kfx_s"] for r in rows)
    per_window_full, per_window_kfx = best_full / len(positions), best_kfx / len(positions)
    ceiling = engine.cost().theoretical_speedup
    results = []
    for overlap in args.overlaps:
        stride = max(1, round(MASK * (1 - overlap)))
        windows = ((side - MASK) // stride + 1) ** 3
        result = {
            "model": name,
            "side": side,
            "overlap": overlap,
            "stride": stride,
            "windows": windows,
            "timed_positions": len(positions),
            "rows": rows,
            "base_s": round(t_base, 2),
            "full_map_s_estimated": round(per_window_full * windows, 1),
            "kfx_map_s_estimated": round(t_base + per_window_kfx * windows, 1),
            "speedup_per_position": round(best_full / best_kfx, 2),
            "ceiling": round(ceiling, 2),
            "realized": round(best_full / best_kfx / ceiling, 2),
            "compile_s": round(compile_s, 1),
            "max_relative_error": error,
        }
        result["speedup_vs_full"] = round(result["full_map_s_estimated"] / result["kfx_map_s_estimated"], 2)
        if per_window_full * windows <= args.monai_budget:
            result["monai_s"] = round(time_monai(model, x, overlap, max(args.batch_sizes)), 1)
            result["speedup_vs_monai"] = round(result["monai_s"] / result["kfx_map_s_estimated"], 2)
        else:
            result["monai_s"] = None  # not run: its estimated time is over --monai-budget
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def time_monai(model, x, overlap: float, n_batch: int) -> float:
    from monai.visualize import OcclusionSensitivity

    occlusion = OcclusionSensitivity(model, mask_size=MASK, n_batch=n_batch, overlap=overlap, mode=0.0)
    started = time.perf_counter()
    with torch.no_grad():
        occlusion(x[None])
    return time.perf_counter() - started


def run_signal(args) -> dict:
    from captum.attr import Occlusion

    model = network("resnet18", 1)
    generator = torch.Generator().manual_seed(2)
    x = torch.cumsum(torch.randn(12, 5000, generator=generator), dim=1) / 50
    patch = kfx.Patch(250, stride=50)
    engine = kfx.compile(model, (12, 5000), patch)
    positions, windows = window_corners(5000, 50, 0, 1, size=250)
    target = int(model(x[None]).argmax())
    rows = []
    for batch in args.batch_sizes:
        t_full = best_time(lambda b=batch: full_outputs(model, x, positions, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch: kfx_map(engine, x, positions, b), args.repeats)

        def captum(b=batch):
            with torch.no_grad():
                Occlusion(model).attribute(
                    x[None],
                    sliding_window_shapes=(12, 250),
                    strides=(12, 50),
                    baselines=0.0,
                    target=target,
                    perturbations_per_eval=b,
                )

        t_captum = best_time(captum, args.repeats)
        rows.append(
            {
                "batch_size": batch,
                "full_s": round(t_full, 3),
                "kfx_s": round(t_kfx, 3),
                "captum_s": round(t_captum, 3),
            }
        )
    best = {key: min(r[key] for r in rows) for key in ("full_s", "kfx_s", "captum_s")}
    return {
        "model": "resnet18 (1-D, MONAI)",
        "length": 5000,
        "windows": windows,
        "rows": rows,
        "speedup_vs_full": round(best["full_s"] / best["kfx_s"], 2),  # kfx includes its base inference
        "speedup_vs_captum": round(best["captum_s"] / best["kfx_s"], 2),
        "ceiling": round(engine.cost().theoretical_speedup, 2),
    }


def markdown(volumes: list[dict], signal: dict | None, args, info: dict) -> str:
    lines = [
        "# Volumes and signals: kfx exact vs batched full inference, MONAI and Captum",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} threads, "
        f"commit {info['commit']}. Command: `{info['command']}`. Best of {args.repeats} per batch size "
        f"({', '.join(map(str, args.batch_sizes))}), best batch size of each method.",
        "",
        f"3-D: mask {MASK}, {args.positions or 'all'} random windows timed per row and scaled by the window count "
        "(estimated map times); MONAI timed on the whole volume only where its estimate fits the budget.",
        "",
        "| model | side | overlap (stride) | windows | kfx vs full | ceiling | realized | est. full map s "
        "| est. kfx map s | MONAI s | kfx vs MONAI | compile s | max rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in volumes:
        monai = "not run (budget)" if r["monai_s"] is None else f"{r['monai_s']:.1f}"
        versus = f"{r['speedup_vs_monai']:.2f}x" if r["monai_s"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['side']} | {r['overlap']} ({r['stride']}) | {r['windows']} | "
            f"{r['speedup_vs_full']:.2f}x | {r['ceiling']:.2f} | {r['realized']:.2f} | {r['full_map_s_estimated']} "
            f"| {r['kfx_map_s_estimated']} | {monai} | {versus} | {r['compile_s']} | {r['max_relative_error']:.1e} |"
        )
    if signal:
        lines += [
            "",
            f"1-D: {signal['model']}, 12 x {signal['length']}, patch 250, stride 50, all {signal['windows']} "
            f"windows: kfx {signal['speedup_vs_full']:.2f}x over batched full inference, "
            f"{signal['speedup_vs_captum']:.2f}x over Captum's Occlusion (static ceiling {signal['ceiling']:.2f}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["densenet121", "resnet18"])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--monai-budget", type=float, default=600.0, help="seconds")
    parser.add_argument("--no-signal", action="store_true")
    parser.add_argument("--tag", default="volumes")
    args = parser.parse_args(argv)
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    volumes = []
    for name in args.models:
        for side in args.sides:
            volumes += run_volume(name, side, args)
    signal = None if args.no_signal else run_signal(args)
    if signal:
        print(json.dumps(signal), flush=True)
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": info, "volumes": volumes, "signal": signal}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(volumes, signal, args, info))
    print(markdown(volumes, signal, args, info))
    return payload


if __name__ == "__main__":
    main()
