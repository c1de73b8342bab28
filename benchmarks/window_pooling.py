"""kfx's window pools (kfx/kernels/pooling.py: one strided slice per kernel tap, one axis at a time)
against torch's own CPU pooling ops, side by side in one process.

1. Ops alone: max- and sum-pooling shapes that real models pool (Inception's 3x3 stride-1 average
   pools, ResNet's and Inception's 3x3 stride-2 max pools, VGG's and DenseNet's 2x2 stride-2 pools,
   MONAI's 3-d DenseNet transitions), float32, best of --repeats.
2. Engines: the same compiled engine run with kfx's pools and with its pool steps switched back to
   torch's ops (windows and dense pools alike), against batched full inference (the model itself,
   kfx.NaiveEngine), the three taking turns within each repeat; every kfx run includes the base
   inference. Best of --repeats. Results: JSON and Markdown in benchmarks/results/. Never run by
   the tests; on a shared machine only the ratios mean much.

    nice -n 10 python benchmarks/window_pooling.py                      # ~5 min on 2 cores
    nice -n 10 python benchmarks/window_pooling.py --engines inception_v3:auto --positions 32
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from compare import best_time, interleaved, kfx_outputs, machine, save_results  # noqa: E402
from plan import MODELS, build_model  # noqa: E402

import kfx  # noqa: E402
from kfx.kernels.pooling import MAX_POOL_FUNCTIONS, avg_pool, window_max, window_sum  # noqa: E402

# (what pools it, input shape [N, C, *S], kernel, stride)
OP_CASES = [
    ("max", "ResNet/Inception stem 3x3 s2", (16, 64, 113, 113), (3, 3), (2, 2)),
    ("max", "Inception 35->17 3x3 s2", (16, 288, 35, 35), (3, 3), (2, 2)),
    ("max", "VGG 2x2 s2", (16, 256, 56, 56), (2, 2), (2, 2)),
    ("max", "3-d 3x3x3 s2", (4, 64, 33, 33, 33), (3, 3, 3), (2, 2, 2)),
    ("sum", "Inception branch_pool 3x3 s1 (35x35)", (16, 288, 37, 37), (3, 3), (1, 1)),
    ("sum", "Inception branch_pool 3x3 s1 (17x17)", (16, 768, 19, 19), (3, 3), (1, 1)),
    ("sum", "DenseNet transition 2x2 s2", (16, 256, 56, 56), (2, 2), (2, 2)),
    ("sum", "MONAI DenseNet 3-d transition 2x2x2 s2", (4, 64, 32, 32, 32), (2, 2, 2), (2, 2, 2)),
]


def time_ops(repeats: int) -> list[dict]:
    rows = []
    for kind, what, shape, kernel, stride in OP_CASES:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        ones = (1,) * len(kernel)
        if kind == "max":
            ours = partial(window_max, x, kernel, stride, ones)
            theirs = partial(MAX_POOL_FUNCTIONS[len(kernel)], x, kernel, stride)
        else:
            ours = partial(window_sum, x, kernel, stride)
            theirs = partial(avg_pool, x, kernel, stride, 0, False, True, divisor_override=1)
        torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-4)
        t_ours, t_theirs = best_time(ours, repeats), best_time(theirs, repeats)
        rows.append(
            {
                "pool": kind,
                "what": what,
                "shape": list(shape),
                "kernel": list(kernel),
                "stride": list(stride),
                "torch_ms": t_theirs * 1e3,
                "kfx_ms": t_ours * 1e3,
                "speedup": t_theirs / t_ours,
            }
        )
        print(f"{kind} {what}: torch {t_theirs * 1e3:.1f} ms, kfx {t_ours * 1e3:.1f} ms", flush=True)
    return rows


def _torch_pool(spec):
    """The pool step's op as torch runs it (what kfx ran before its window pools), same geometry."""
    kernel, stride = spec.kernel, spec.stride
    if spec.kind == "max_pool":
        return lambda w: MAX_POOL_FUNCTIONS[len(kernel)](w, kernel, stride, 0, 1)
    divisor = 1 if spec.divisor is not None else math.prod(kernel)
    return lambda w: avg_pool(w, kernel, stride, 0, False, True, divisor_override=divisor)


def time_engine(name: str, plan: str, positions_wanted: int, batch: int, repeats: int) -> dict:
    side, size, stride = MODELS[name]
    model, patch = build_model(name), kfx.Patch(size, stride=stride)
    image = torch.randn(3, side, side, generator=torch.Generator().manual_seed(0))
    grid = kfx.grid_positions((side, side), patch)
    pick = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(1))[:positions_wanted]
    positions = grid[pick]
    engine = kfx.compile(model, (3, side, side), patch, plan=plan)
    naive = kfx.NaiveEngine(model, (3, side, side), patch)
    steps = [
        m
        for m in engine.program.modules()
        if getattr(getattr(m, "spec", None), "kind", "") in ("max_pool", "avg_pool")
    ]
    # torch's divisor: 1 where the step divides by a table, else the kernel's size (no model here sets
    # divisor_override; the error check against full inference below would show a wrong one).
    kfx_specs = {step: step.spec for step in steps}
    torch_specs = {step: dataclasses.replace(step.spec, apply=_torch_pool(step.spec)) for step in steps}

    def run_kfx(specs):
        def run():
            for step in steps:
                step.spec = specs[step]
            return kfx_outputs(engine, image, positions, batch)

        return run

    runs = {
        "full": lambda: naive.outputs(image, positions, batch_size=batch),
        "kfx_window_pools": run_kfx(kfx_specs),
        "kfx_torch_pools": run_kfx(torch_specs),
    }
    best, errors = interleaved(runs, repeats)
    row = {
        "model": name,
        "image": side,
        "patch": size,
        "stride": stride,
        "plan": plan,
        "plan_chosen": engine.plan.chosen if engine.plan is not None else None,
        "positions": len(positions),
        "batch": batch,
        "pool_steps": len(steps),
        "seconds": best,
        "max_error_vs_full_relative_to_max": errors,
        "window_pools_vs_torch_pools": best["kfx_torch_pools"] / best["kfx_window_pools"],
        "full_over_window_pools": best["full"] / best["kfx_window_pools"],
        "full_over_torch_pools": best["full"] / best["kfx_torch_pools"],
    }
    print(
        f"{name} plan={plan}: kfx pools {row['window_pools_vs_torch_pools']:.2f}x faster than torch's; over full "
        f"inference {row['full_over_window_pools']:.2f}x (torch's pools: {row['full_over_torch_pools']:.2f}x)",
        flush=True,
    )
    return row


def markdown(ops: list[dict], engines: list[dict], args, info: dict) -> str:
    lines = [
        f"# Window pools vs torch's CPU pooling ({info['processor']}, {info['cpus']} cpus, torch {info['torch']}, "
        f"{info['threads']} threads, commit {info['commit']})",
        "",
        f"Command: `{' '.join(sys.argv)}`. Best of {args.repeats}; float32; random weights.",
        "",
        "| pool | where | input | kernel/stride | torch ms | kfx ms | kfx faster |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ops:
        lines.append(
            f"| {r['pool']} | {r['what']} | {'x'.join(map(str, r['shape']))} | {r['kernel']}/{r['stride']} | "
            f"{r['torch_ms']:.1f} | {r['kfx_ms']:.1f} | {r['speedup']:.1f}x |"
        )
    if engines:
        lines += [
            "",
            f"Engines: {args.positions} positions (random, seed 1), batch {args.batch}; each kfx run includes the "
            "base inference. 'torch pools' is the same engine with its pool steps switched back to torch's ops.",
            "",
            "| model | patch/stride | plan | pool steps | kfx pools vs torch pools | over full (kfx pools) | "
            "over full (torch pools) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in engines:
            lines.append(
                f"| {r['model']} {r['image']} | {r['patch']}/{r['stride']} | {r['plan_chosen']} | {r['pool_steps']} | "
                f"{r['window_pools_vs_torch_pools']:.2f}x | {r['full_over_window_pools']:.2f}x | "
                f"{r['full_over_torch_pools']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--engines",
        nargs="*",
        default=["inception_v3:incremental", "inception_v3:auto", "resnet18:auto"],
        help="model:plan pairs (models of benchmarks/plan.py)",
    )
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--out", default="window_pooling")
    args = parser.parse_args(argv)
    info = machine()
    ops = [] if args.skip_ops else time_ops(args.repeats)
    engines = []
    for pair in args.engines:
        name, plan = pair.split(":")
        engines.append(time_engine(name, plan, args.positions, args.batch, args.repeats))
    table = markdown(ops, engines, args, info)
    save_results(args.out, {"machine": info, "ops": ops, "engines": engines}, table)
    print(table)


if __name__ == "__main__":
    main()
