"""Channels-last for the incremental program (#19 item 3), side by side in one process.

1. Convs alone (``--convs``): torch's CPU conv on a batch of read-in windows in the contiguous
   (N, C, ...) layout, against the same conv with the windows converted to channels-last and the
   result converted back (what a per-conv switch would pay), and against channels-last with no
   conversion (what a program that keeps every map channels-last pays). A batch of 16 windows (4
   for 3-d), 3x3 convs over a grid of channel counts and window sides, plus 3-d stems and blocks of
   MONAI's ResNet18. Best of --repeats.
2. Engines (``--engines``): kfx's 2-d CPU engine as compiled (channels-last program: the base
   program makes the image channels-last, docs/design.md §3.6) against its twin with the contiguous
   base program (the same incremental program otherwise), batched full inference of the model as
   given (kfx.NaiveEngine: what every speedup in benchmarks/results/ is over), and full inference of
   a channels-last copy of the model on channels-last images (what a user who converts the model
   would run). The four take turns within each repeat; best of --repeats; every kfx run includes
   the base inference.

Float32, random weights. Results: JSON and Markdown in benchmarks/results/. Never run by the tests.

    nice -n 10 python benchmarks/conv_layouts.py --convs                  # ~1 min on 2 cores
    nice -n 10 python benchmarks/conv_layouts.py --engines --repeats 3    # ~6 min
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from compare import best_time, interleaved, kfx_outputs, machine, save_results  # noqa: E402
from plan import build_model  # noqa: E402

import kfx  # noqa: E402
from kfx.passes import build_base_program  # noqa: E402

CHANNELS = [(3, 32), (16, 16), (32, 64), (48, 64), (64, 64), (64, 96), (96, 96), (128, 128), (192, 192)]
SIDES = [15, 30, 60]
# (in channels, out channels, window side, kernel, stride) of 3-d convs, batch 4
VOLUME_CASES = [
    (1, 64, 27, 7, 2),
    (1, 64, 45, 7, 2),
    (64, 64, 12, 3, 1),
    (64, 128, 10, 3, 2),
    (128, 128, 6, 3, 1),
]


def _convert_both(conv, x, weight, layout, stride):
    return conv(x.contiguous(memory_format=layout), weight, stride=stride).contiguous()


def time_case(c_in, c_out, side, kernel, stride, axes, repeats) -> dict:
    batch = 16 if axes == 2 else 4
    conv, layout = (F.conv2d, torch.channels_last) if axes == 2 else (F.conv3d, torch.channels_last_3d)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, *(side,) * axes, generator=generator)
    weight = torch.randn(c_out, c_in, *(kernel,) * axes, generator=generator)
    weight_last = weight.contiguous(memory_format=layout)
    x_last = x.contiguous(memory_format=layout)
    runs = {
        "contiguous": partial(conv, x, weight, stride=stride),
        "converted": partial(_convert_both, conv, x, weight_last, layout, stride),
        "channels_last": partial(conv, x_last, weight_last, stride=stride),
    }
    torch.testing.assert_close(runs["converted"](), runs["contiguous"](), rtol=1e-4, atol=1e-3)
    for run in runs.values():
        run()  # oneDNN picks and caches its kernel on the first call
    ms = {name: best_time(run, repeats) * 1e3 for name, run in runs.items()}
    row = {"axes": axes, "batch": batch, "c_in": c_in, "c_out": c_out, "side": side, "kernel": kernel}
    return row | {"stride": stride, "ms": ms, "converted_speedup": ms["contiguous"] / ms["converted"]}


# name -> (image side, patch, stride, plan)
ENGINES = {
    "resnet18": (224, 16, 8, "incremental"),
    "inception_v3": (299, 16, 8, "auto"),
    "vgg16": (224, 16, 16, "auto"),
    "efficientnet_b0": (224, 16, 8, "incremental"),
    "mobilenet_v3_large": (224, 16, 8, "incremental"),
    "densenet121": (224, 16, 8, "auto"),
}


def time_engine(name: str, positions_wanted: int, batch: int, repeats: int) -> dict:
    side, size, stride, plan = ENGINES[name]
    model, patch = build_model(name), kfx.Patch(size, stride=stride)
    image = torch.randn(3, side, side, generator=torch.Generator().manual_seed(0))
    grid = kfx.grid_positions((side, side), patch)
    positions = grid[
        torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(1))[:positions_wanted]
    ]
    engine = kfx.compile(model, (3, side, side), patch, plan=plan)
    compiled = engine.compiled
    contiguous = type(engine)(
        model,
        dataclasses.replace(
            compiled,
            base_program=build_base_program(compiled.graph_module, compiled.slots, False),
            channels_last=False,
        ),
    )
    naive = kfx.NaiveEngine(model, (3, side, side), patch)
    model_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def full_last():
        outs = []
        with torch.no_grad():
            for part in positions.split(batch):
                occluded = kfx.occlude(image, part, patch).contiguous(memory_format=torch.channels_last)
                outs.append(model_last(occluded))
        return torch.cat(outs)

    runs = {
        "kfx_channels_last": lambda: kfx_outputs(engine, image, positions, batch),
        "kfx_contiguous": lambda: kfx_outputs(contiguous, image, positions, batch),
        "full": lambda: naive.outputs(image, positions, batch_size=batch),
        "full_channels_last": full_last,
    }
    best, errors = interleaved(runs, repeats)
    row = {
        "model": name,
        "image": side,
        "patch": size,
        "stride": stride,
        "plan": plan,
        "plan_chosen": compiled.plan.chosen,
        "channels_last": compiled.channels_last,
        "positions": len(positions),
        "batch": batch,
        "seconds": best,
        "max_error_vs_full_relative_to_max": errors,
        "channels_last_vs_contiguous": best["kfx_contiguous"] / best["kfx_channels_last"],
        "over_full": best["full"] / best["kfx_channels_last"],
        "contiguous_over_full": best["full"] / best["kfx_contiguous"],
        "over_full_channels_last": best["full_channels_last"] / best["kfx_channels_last"],
    }
    print(
        f"{name}: channels-last program {row['channels_last_vs_contiguous']:.2f}x the contiguous one; over full "
        f"inference {row['over_full']:.2f}x (contiguous program {row['contiguous_over_full']:.2f}x); over "
        f"channels-last full inference {row['over_full_channels_last']:.2f}x",
        flush=True,
    )
    return row


def engines_markdown(rows: list[dict], args) -> list[str]:
    lines = [
        "",
        f"Engines: {args.positions} positions (random, seed 1), batch {args.batch}, best of {args.repeats}. "
        "'full' is the model as given (contiguous), 'full CL' a channels-last copy on channels-last images.",
        "",
        "| model | patch/stride | plan | CL program vs contiguous | over full (CL program) | "
        "over full (contiguous program) | over full CL (CL program) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['image']} | {r['patch']}/{r['stride']} | {r['plan_chosen']} | "
            f"{r['channels_last_vs_contiguous']:.2f}x | {r['over_full']:.2f}x | {r['contiguous_over_full']:.2f}x | "
            f"{r['over_full_channels_last']:.2f}x |"
        )
    return lines


def markdown(rows: list[dict], info: dict, repeats: int) -> str:
    lines = [
        f"# Conv layouts on read-in windows ({info['processor']}, {info['cpus']} cpus, torch {info['torch']}, "
        f"{info['threads']} threads, commit {info['commit']})",
        "",
        f"Command: `{' '.join(sys.argv)}`. Best of {repeats}; float32.",
    ]
    if not rows:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Convs: 'converted' = windows to channels-last, conv, result back to contiguous; 'channels-last' = no "
        "conversion (a bound).",
        "",
        "| axes | batch | C_in -> C_out | window side | kernel/stride | contiguous ms | converted ms | "
        "channels-last ms | converted speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['axes']} | {r['batch']} | {r['c_in']} -> {r['c_out']} | {r['side']} | {r['kernel']}/{r['stride']} | "
            f"{ms['contiguous']:.2f} | {ms['converted']:.2f} | {ms['channels_last']:.2f} | "
            f"{r['converted_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convs", action="store_true", help="time the convs alone")
    parser.add_argument("--engines", nargs="*", default=None, choices=list(ENGINES), help="time engines")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="conv_layouts")
    args = parser.parse_args(argv)
    info = machine()
    rows, engines = [], []
    if args.convs:
        for c_in, c_out in CHANNELS:
            for side in SIDES:
                rows.append(time_case(c_in, c_out, side, 3, 1, 2, args.repeats))
                print(rows[-1], flush=True)
        for c_in, c_out, side, kernel, stride in VOLUME_CASES:
            rows.append(time_case(c_in, c_out, side, kernel, stride, 3, max(3, args.repeats // 3)))
            print(rows[-1], flush=True)
    if args.engines is not None:
        engines = [
            time_engine(name, args.positions, args.batch, args.repeats) for name in args.engines or ENGINES
        ]
    table = markdown(rows, info, args.repeats) + (
        "\n".join(engines_markdown(engines, args)) + "\n" if engines else ""
    )
    save_results(args.out, {"machine": info, "rows": rows, "engines": engines}, table)
    print(table)


if __name__ == "__main__":
    main()
