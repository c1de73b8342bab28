"""Channels-last for the incremental program's convs (#19 item 3): torch's CPU conv on a batch of
read-in windows in the contiguous (N, C, ...) layout kfx gathers, against the same conv with the
windows converted to channels-last and the result converted back (what a per-conv switch would
pay, since kfx's gathers, pastes and projections work on contiguous tensors), and against
channels-last with no conversion at all (a bound: every kernel in channels-last).

Shapes: a batch of 16 windows (4 for 3-d), 3x3 convs over a grid of channel counts and window
sides, plus 3-d stems and blocks of MONAI's ResNet18. Best of --repeats, float32, one process.
Results: JSON and Markdown in benchmarks/results/. Never run by the tests.

    nice -n 10 python benchmarks/conv_layouts.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from compare import RESULTS, best_time, machine  # noqa: E402

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


def markdown(rows: list[dict], info: dict, repeats: int) -> str:
    lines = [
        f"# Conv layouts on read-in windows ({info['processor']}, {info['cpus']} cpus, torch {info['torch']}, "
        f"{info['threads']} threads, commit {info['commit']})",
        "",
        f"Command: `{' '.join(sys.argv)}`. Best of {repeats}; float32. 'converted' = windows to channels-last, "
        "conv, result back to contiguous; 'channels-last' = no conversion (a bound).",
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
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="conv_layouts")
    args = parser.parse_args(argv)
    info = machine()
    rows = []
    for c_in, c_out in CHANNELS:
        for side in SIDES:
            rows.append(time_case(c_in, c_out, side, 3, 1, 2, args.repeats))
            print(rows[-1], flush=True)
    for c_in, c_out, side, kernel, stride in VOLUME_CASES:
        rows.append(time_case(c_in, c_out, side, kernel, stride, 3, max(3, args.repeats // 3)))
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    table = markdown(rows, info, args.repeats)
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
