"""Does ``torch.compile`` (Inductor, CPU) speed up kfx's incremental program? (issue #19, item 3)

For each model: the exact engine's incremental program run eagerly, the same program through
``torch.compile(program, dynamic=False)``, and batched full inference on the occluded copies, side by
side in one process on the same positions (one full batch), best of --repeats. Also the one-off
compile time and the largest difference between the compiled and eager programs' outputs.

Inductor needs a C++ compiler (gcc here). kfx does not use it by default: see the results' notes.

    python benchmarks/inductor_cpu.py                          # resnet18, about 5 min on our 2-core CPU
    python benchmarks/inductor_cpu.py --models resnet18 vgg16 --batch 16

Results: JSON and Markdown in benchmarks/results/ with the machine and command. Never run by tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from compare import build_model, image_side, load_photo, machine, save_results  # benchmarks/ is on sys.path

import kfx


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            fn()
        best = min(best, time.perf_counter() - started)
    return best


def run(name: str, args) -> dict:
    torch.manual_seed(0)
    model = build_model(name)
    size = image_side(name)
    patch = kfx.Patch(args.patch, stride=args.stride)
    engine = kfx.compile(model, (3, size, size), patch, batch_size=args.batch)
    image = load_photo(size)
    base = engine._prepare(image[None])
    positions = kfx.grid_positions((size, size), engine.patch)[: args.batch]
    program = engine.program
    started = time.perf_counter()
    compiled = torch.compile(program, dynamic=False)
    with torch.no_grad():
        compiled(positions, *base.activations)
    compile_seconds = time.perf_counter() - started
    with torch.no_grad():
        eager_out = program(positions, *base.activations)
        compiled_out = compiled(positions, *base.activations)
    occluded = kfx.occlude(image, positions, engine.patch)
    times = {
        "eager": best_seconds(lambda: program(positions, *base.activations), args.repeats),
        "inductor": best_seconds(lambda: compiled(positions, *base.activations), args.repeats),
        "full": best_seconds(lambda: model(occluded), args.repeats),
    }
    row = {
        "model": name,
        "positions": int(positions.shape[0]),
        "seconds": times,
        "inductor_vs_eager": times["eager"] / times["inductor"],
        "eager_vs_full": times["full"] / times["eager"],
        "inductor_vs_full": times["full"] / times["inductor"],
        "compile_seconds": compile_seconds,
        "max_abs_difference": (compiled_out - eager_out).abs().max().item(),
    }
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], args, info: dict) -> str:
    lines = [
        "# torch.compile (Inductor, CPU) of kfx's incremental program",
        "",
        f"Command: `python benchmarks/inductor_cpu.py {' '.join(sys.argv[1:])}`; machine: {info}.",
        f"Patch {args.patch}, stride {args.stride}, one batch of {args.batch} positions, best of {args.repeats};",
        "speedups are ratios of times measured side by side in this run (x > 1: the first is faster).",
        "",
        "| model | eager kfx s | inductor kfx s | full s | inductor vs eager | eager vs full | inductor vs full "
        "| compile s | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {s['eager']:.3f} | {s['inductor']:.3f} | {s['full']:.3f} | "
            f"{r['inductor_vs_eager']:.2f}x | {r['eager_vs_full']:.2f}x | {r['inductor_vs_full']:.2f}x | "
            f"{r['compile_seconds']:.0f} | {r['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="inductor_cpu")
    args = parser.parse_args(argv)
    info = machine()
    rows = [run(name, args) for name in args.models]
    save_results(args.tag, {"machine": info, "rows": rows}, markdown(rows, args, info))
    return rows


if __name__ == "__main__":
    main()
