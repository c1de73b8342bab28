"""kfx exact vs batched full inference, side by side in one run (never asserted in tests).

For a torchvision model with random weights (speed does not depend on the weights), it times:
  - naive: batched full inference on occluded copies of the image (Krypton's baseline),
  - kfx:   the compiled exact engine, on the same positions and the same batch sizes,
and reports positions/s, the speedup (best batch size of each, best of --repeats runs), the peak
memory of one batch (measured in a fresh child process each, as the growth of peak RSS), and the
static FLOP ceiling from engine.cost(). JSON goes to benchmarks/results/, a table to stdout.

    python benchmarks/exact_speed.py --model vgg16                 # 224, patch 16, stride 4
    python benchmarks/exact_speed.py --model vgg16 --quick         # fewer positions, one repeat
    python benchmarks/exact_speed.py --model resnet18 --positions 0  # 0 = the whole grid
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import kfx

RESULTS = Path(__file__).parent / "results"


def build_model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def machine() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": commit,
    }


def naive_outputs(model, image, positions, patch, batch_size):
    outs = []
    with torch.no_grad():
        for start in range(0, positions.shape[0], batch_size):
            outs.append(model(kfx.occlude(image, positions[start : start + batch_size], patch)))
    return torch.cat(outs)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_child(args, method, batch_size, queue):
    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    patch = kfx.Patch(args.patch, stride=args.stride)
    shape = (3, args.size, args.size)
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    positions = kfx.grid_positions(shape[1:], patch)[:batch_size]
    engine = kfx.compile(model, shape, patch, batch_size=batch_size) if method == "kfx" else None
    before = _rss_mib()
    if method == "kfx":
        engine.outputs(image, positions)  # includes the base activations of the image
    else:
        naive_outputs(model, image, positions, patch, batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(peak - before)


def peak_memory_mib(args, method: str, batch_size: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(args, method, batch_size, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return round(value, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vgg16")
    parser.add_argument(
        "--size", type=int, default=None, help="image side (default 299 for inception_v3, else 224)"
    )
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--positions", type=int, default=256, help="random grid positions to time (0 = all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--quick", action="store_true", help="64 positions, batch 32 and 64, 1 repeat, no memory"
    )
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    args.size = args.size or (299 if args.model == "inception_v3" else 224)
    if args.quick:
        args.positions, args.batch_sizes, args.repeats, args.no_memory = 64, [32, 64], 1, True
    torch.set_num_threads(args.threads)

    model = build_model(args.model)
    patch = kfx.Patch(args.patch, stride=args.stride)
    shape = (3, args.size, args.size)
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    grid = kfx.grid_positions(shape[1:], patch)
    if args.positions:
        grid = grid[
            torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(0))[: args.positions]
        ]
    engine = kfx.compile(model, shape, patch)
    ceiling = engine.cost().theoretical_speedup
    engine.outputs(image, grid[:2])  # base activations of the image, computed once (as any user would)

    rows = []
    for batch_size in args.batch_sizes:
        naive_outputs(model, image, grid[:batch_size], patch, batch_size)  # warm up
        t_naive = best_time(lambda b=batch_size: naive_outputs(model, image, grid, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch_size: engine.outputs(image, grid, batch_size=b), args.repeats)
        row = {
            "batch_size": batch_size,
            "naive_s": round(t_naive, 3),
            "kfx_s": round(t_kfx, 3),
            "naive_pos_per_s": round(grid.shape[0] / t_naive, 2),
            "kfx_pos_per_s": round(grid.shape[0] / t_kfx, 2),
            "speedup": round(t_naive / t_kfx, 2),
        }
        if not args.no_memory:
            row["naive_peak_mib"] = peak_memory_mib(args, "naive", batch_size)
            row["kfx_peak_mib"] = peak_memory_mib(args, "kfx", batch_size)
        rows.append(row)
        print(json.dumps(row), flush=True)

    with torch.no_grad():  # the comparison is only meaningful if the answers agree
        check = grid[: min(8, grid.shape[0])]
        expected = model(kfx.occlude(image, check, patch))
        max_rel_err = ((engine.outputs(image, check) - expected).abs().max() / expected.abs().max()).item()

    best_naive = min(r["naive_s"] for r in rows)
    best_kfx = min(r["kfx_s"] for r in rows)
    result = {
        "model": args.model,
        "image": args.size,
        "patch": args.patch,
        "stride": args.stride,
        "positions": int(grid.shape[0]),
        "repeats": args.repeats,
        "statistic": "best of repeats; speedup = best naive batch size / best kfx batch size",
        "rows": rows,
        "speedup_best_vs_best": round(best_naive / best_kfx, 2),
        "theoretical_speedup": round(ceiling, 2),
        "realized_over_ceiling": round(best_naive / best_kfx / ceiling, 2),
        "max_rel_err_vs_full_inference": max_rel_err,
        "machine": machine(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    print()
    print(
        f"{args.model} {args.size}px patch {args.patch} stride {args.stride}, {grid.shape[0]} positions, "
        f"best of {args.repeats}, {args.threads} threads"
    )
    print(
        f"{'batch':>6} {'naive pos/s':>12} {'kfx pos/s':>10} {'speedup':>8} {'naive MiB':>10} {'kfx MiB':>8}"
    )
    for r in rows:
        print(
            f"{r['batch_size']:>6} {r['naive_pos_per_s']:>12} {r['kfx_pos_per_s']:>10} {r['speedup']:>7}x "
            f"{r.get('naive_peak_mib', '-'):>10} {r.get('kfx_peak_mib', '-'):>8}"
        )
    print(
        f"best vs best: {result['speedup_best_vs_best']}x; FLOP ceiling {result['theoretical_speedup']}x "
        f"(realized/ceiling {result['realized_over_ceiling']}); max rel err {max_rel_err:.1e}"
    )
    RESULTS.mkdir(exist_ok=True)
    tag = "quick" if args.quick else f"s{args.stride}"
    out = RESULTS / f"exact_{args.model}_{args.size}_{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
