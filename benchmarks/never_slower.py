"""Never slower than plain inference (issue #19): kfx's default engine vs batched full inference, on
every model of the torchvision zoo and the timm list, side by side in one process.

For each model (random weights: speed does not depend on them; float32; 224x224, Inception v3 at
299; patch 16, stride 16, the issue's setting) it builds, in this one process:

  full         kfx.NaiveEngine: the caller's model on occluded copies, batched (what Captum runs);
  incremental  kfx.compile(..., plan="incremental"): the incremental program, always;
  default      kfx.compile(...) as a user calls it: plan="auto", which times its program against
               full inference on its first full-size batches and keeps the faster (kfx.measured_plan).

The default engine's first call (--decide-batches full batches, untimed by the harness but its own
measurement is printed) makes the choice; then the three methods take turns on the same random
--positions of the grid, each repeat in turn, and each keeps its best of --repeats. Every run of
every method includes the unoccluded image's inference, as a map needs its probability (kfx's is
its base pass); at --positions 48 it weighs about 4x what it does in a whole 196-position map.
Earlier results (never_slower.md, never_slower_1thread.md, never_slower_margin.md,
never_slower_s8.md, never_slower_final.md) timed full inference without it. Results: JSON and
Markdown in benchmarks/results/ (machine, threads, load average, command). Never run by the tests.

    nice -n 10 python benchmarks/never_slower.py                   # every model (about 15 min here)
    python benchmarks/never_slower.py --models resnet18 efficientnet_b0 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from compare import best_time, machine, save_results  # benchmarks/ is on sys.path
from compile_time import build, models

import kfx

GOAL = 0.95  # the bar: kfx at least this fraction of full inference's speed


def run_model(source: str, name: str, args) -> dict:
    model, side = build(source, name)
    shape, patch, batch = (3, side, side), kfx.Patch(args.patch, stride=args.stride), args.batch_size
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    grid = kfx.grid_positions((side, side), patch)
    pick = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(1))[: args.positions]
    positions = grid[pick]
    started = time.perf_counter()
    default = kfx.compile(model, shape, patch, batch_size=batch)
    compile_s = time.perf_counter() - started
    incremental = kfx.compile(model, shape, patch, batch_size=batch, plan="incremental")
    naive = kfx.NaiveEngine(model, shape, patch)
    started = time.perf_counter()
    default.outputs(image, grid[: args.decide_batches * batch])  # its first call: the measurement
    first_call_s = time.perf_counter() - started
    plan = default.plan

    def kfx_run(engine):
        def run():
            engine._base_cache = None  # include the base inference, as each new image pays it
            return engine.outputs(image, positions, batch_size=batch)

        return run

    def full_map():
        with torch.no_grad():
            model(image[None])  # the unoccluded probability, which every map (and Captum) computes once
        return naive.outputs(image, positions, batch_size=batch)

    runs = {
        "full": full_map,
        "incremental": kfx_run(incremental),
        "default": kfx_run(default),
    }
    best = {method: float("inf") for method in runs}
    for _ in range(args.repeats):
        for method, run in runs.items():
            best[method] = min(best[method], best_time(run, 1))
    measured = plan.measured
    row = {
        "source": source,
        "model": name,
        "image": side,
        "positions": len(positions),
        "grid": grid.shape[0],
        "plan": plan.chosen,
        "runs_full_inference": plan.full_inference,
        "measured_incremental_ms": None if measured is None else measured.incremental_seconds * 1e3,
        "measured_full_ms": None if measured is None else measured.full_seconds * 1e3,
        "ceiling": default.cost().theoretical_speedup,
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        **{f"{method}_ms_per_position": seconds / len(positions) * 1e3 for method, seconds in best.items()},
        "incremental_speedup": best["full"] / best["incremental"],
        "default_speedup": best["full"] / best["default"],
    }
    print(
        f"{name}: {plan.summary()}\n  over full inference: incremental {row['incremental_speedup']:.2f}x, "
        f"default {row['default_speedup']:.2f}x",
        flush=True,
    )
    return row


def markdown(rows: list[dict], args, info: dict, load: tuple) -> str:
    met = sum(r["default_speedup"] >= GOAL for r in rows)
    lines = [
        "# Never slower: kfx's default engine vs batched full inference",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} threads, "
        f"commit {info['commit']}. Command: `python {' '.join(sys.argv)}`. Patch {args.patch}, stride "
        f"{args.stride}, batch {args.batch_size}, {args.positions} random grid positions per model, best of "
        f"{args.repeats} (the methods take turns in each repeat); every run includes the unoccluded "
        f"image's inference. Load average before / after: {load[0]} / {load[1]}.",
        "",
        f"Default engine at or above {GOAL}x of full inference: {met} of {len(rows)} models.",
        "",
        "| model | ceiling | default runs | measured ms/position (incremental / full) | incremental | default |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = "full inference" if r["runs_full_inference"] else f"program ({r['plan']})"
        measured = (
            "-"
            if r["measured_incremental_ms"] is None
            else f"{r['measured_incremental_ms']:.2f} / {r['measured_full_ms']:.2f}"
        )
        lines.append(
            f"| {r['source']} {r['model']} {r['image']} | {r['ceiling']:.2f}x | {runs} | {measured} | "
            f"{r['incremental_speedup']:.2f}x | {r['default_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every model of both zoos")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--positions", type=int, default=48)
    parser.add_argument("--decide-batches", type=int, default=4, help="full batches of the first call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="never_slower")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info, load, rows = machine(), os.getloadavg(), []
    for source, name in models(args.models):
        try:
            rows.append(run_model(source, name, args))
        except kfx.KfxError as exc:  # a model kfx refuses is listed, not a crash of the benchmark
            print(f"{name}: refused: {exc}", flush=True)
        payload = {"machine": info, "args": vars(args), "rows": rows}
        save_results(args.out, payload, markdown(rows, args, info, (load, os.getloadavg())))
    print(markdown(rows, args, info, (load, os.getloadavg())))
    return rows


if __name__ == "__main__":
    main()
