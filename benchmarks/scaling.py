"""How occlusion time grows with the number of positions and with image size: kfx exact vs batched
full inference, side by side in one run (never asserted in tests).

Model: torchvision ResNet18 (random weights) on scikit-image's cat photo, patch 16, batch 64 for
both methods. Series:

  positions: full maps at stride 16, 8, 4, 2 on a 224 image (196 .. 11,025 positions);
  image size: stride 4 at 224 and 448 (2,809 and 11,881 positions);
  interactive: 16, 32, 64 positions (a user's selection), the case that must not be slower than
  full inference.

Every kfx time includes the unoccluded image's base inference (not compilation, done once per
model and reported apart). A full map is timed directly while it costs less than --direct-limit
positions; beyond, both methods are timed on a random sample of --sample positions of that grid and
scaled by count (each position is an independent batch row, so time is linear in the count; the
JSON says which points are scaled). Times: best of --repeats. Writes benchmarks/results/scaling.json
and scaling.png.

    python benchmarks/scaling.py            # about 10 minutes on a 2-core CPU
    python benchmarks/scaling.py --quick    # fewer points, best of 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from compare import RESULTS, best_time, build_model, kfx_outputs, load_photo, machine, naive_outputs

import kfx


def time_map(model, engine, image, positions, patch, args) -> dict:
    """Seconds for naive and kfx on ``positions`` (directly, or sampled and scaled by count)."""
    count = positions.shape[0]
    timed = positions
    if count > args.direct_limit:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
        timed = positions[order[: args.sample]]
    scale = count / timed.shape[0]
    naive = best_time(lambda: naive_outputs(model, image, timed, patch, args.batch), args.repeats)
    # kfx: the base inference is paid once per map, so do not scale it with the sample
    start = time.perf_counter()
    engine._base_cache = None
    engine.outputs(image, timed[:1])
    base = time.perf_counter() - start
    incremental = best_time(lambda: engine.outputs(image, timed, batch_size=args.batch), args.repeats)
    return {
        "positions": count,
        "timed_positions": int(timed.shape[0]),
        "scaled": scale != 1,
        "naive_s": round(naive * scale, 3),
        "kfx_s": round(base + incremental * scale, 3),
        "speedup": round(naive * scale / (base + incremental * scale), 2),
    }


def series(model_name: str, side: int, strides, counts, args) -> tuple[list[dict], float]:
    model = build_model(model_name)
    image = load_photo(side)
    started = time.perf_counter()
    engine = kfx.compile(model, (3, side, side), kfx.Patch(16, stride=4), batch_size=args.batch)
    compile_s = time.perf_counter() - started
    naive_outputs(
        model, image, kfx.grid_positions((side, side), engine.patch)[: args.batch], engine.patch, args.batch
    )
    kfx_outputs(engine, image, kfx.grid_positions((side, side), engine.patch)[: args.batch], args.batch)
    points = []
    for stride in strides:
        patch = kfx.Patch(16, stride=stride)
        point = {
            "image": side,
            "stride": stride,
            **time_map(model, engine, image, kfx.grid_positions((side, side), patch), patch, args),
        }
        points.append(point)
        print(json.dumps(point), flush=True)
    grid = kfx.grid_positions((side, side), engine.patch)
    for count in counts:
        chosen = grid[torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(1))[:count]]
        point = {
            "image": side,
            "selection": count,
            **time_map(model, engine, image, chosen, engine.patch, args),
        }
        points.append(point)
        print(json.dumps(point), flush=True)
    return points, compile_s


def plot(points: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, marker in ((224, "o"), (448, "s")):
        rows = sorted((p for p in points if p["image"] == side), key=lambda p: p["positions"])
        if not rows:
            continue
        n = [p["positions"] for p in rows]
        ax.plot(
            n,
            [p["naive_s"] for p in rows],
            marker=marker,
            ls="--",
            color="tab:gray",
            label=f"batched full inference, {side}px",
        )
        ax.plot(n, [p["kfx_s"] for p in rows], marker=marker, color="tab:blue", label=f"kfx exact, {side}px")
        for p in rows:
            if "stride" in p:
                ax.annotate(
                    f"S={p['stride']}",
                    (p["positions"], p["kfx_s"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("patch positions (selection sizes 16-64; full maps at stride S)")
    ax.set_ylabel("seconds (kfx includes the base inference)")
    ax.set_title("ResNet18, patch 16, batch 64: time vs positions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--direct-limit", type=int, default=800, help="time full maps directly up to this many positions"
    )
    parser.add_argument(
        "--sample", type=int, default=384, help="positions timed for larger maps (then scaled)"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.direct_limit, args.sample = 1, 200, 128
    info = machine()
    info["command"] = "python " + " ".join(
        ["benchmarks/scaling.py", *(argv if argv is not None else sys.argv[1:])]
    )

    points, compile_224 = series(args.model, 224, (16, 8, 4, 2), (16, 32, 64), args)
    more, compile_448 = series(args.model, 448, (4,), (), args)
    points += more
    RESULTS.mkdir(exist_ok=True)
    result = {
        "model": args.model,
        "patch": 16,
        "batch": args.batch,
        "statistic": f"best of {args.repeats}",
        "compile_s": {"224": round(compile_224, 2), "448": round(compile_448, 2)},
        "points": points,
        "machine": info,
    }
    (RESULTS / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, RESULTS / "scaling.png")
    print(f"wrote {RESULTS / 'scaling.json'} and scaling.png")
    return result


if __name__ == "__main__":
    main()
