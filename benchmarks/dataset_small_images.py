"""Small images over a dataset (issue #18 item 7): kfx.explain_dataset's local runner, which puts
positions of several images in one batch (kfx/_multi_image.py), against a plain Python loop over
kfx.compile(...)(image), side by side in one process.

Each configuration has fewer patch positions per image than a batch (64):

  resnet18-64  torchvision ResNet18 (random weights, 1000 classes) at 64x64, patch 16, stride 8
  resnet18-32  the same at 32x32, patch 16, stride 8: 9 positions per image
  resnet18-32-s16  the same, stride 16: 4 positions per image
  cnn-32       a five-conv CNN (random weights, 10 classes) at 32x32, patch 8, stride 4

(49 positions per image unless said), on scikit-image's four sample photos written as PNG
files and repeated to --images files. Methods, each compiled with kfx.compile's default plan:

  loop             load, compile once, then engine(image) for each image (what a user writes);
  runner           kfx.explain_dataset(..., runner="local"): groups of images when the engine
                   runs full inference (kfx._multi_image.group_size), else one image at a time;
  runner, 1 image  the same with grouping switched off (MAX_GROUP = 1): what grouping itself buys.

Each method first runs once, untimed, on a few images. Every time includes compiling the engine and reading and resizing every image; the runner's also
includes writing its Parquet parts. The methods take turns, each repeat in turn; the table gives
the median and the best of --repeats. The runner's maps are compared with the loop's (largest
absolute difference), so a fast wrong answer shows. Results: JSON and Markdown in
benchmarks/results/ (machine, threads, load average, command). Never run by the tests.

    nice -n 19 python benchmarks/dataset_small_images.py                 # 200 images, 3 repeats
    nice -n 19 python benchmarks/dataset_small_images.py --images 50 --configs cnn-32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from compare import save_results  # benchmarks/ is on sys.path
from dataset_throughput import machine, write_photos
from torch import nn

import kfx
import kfx._multi_image as multi
from kfx.cli.images import _model_input, read_image
from kfx.models import LoadedModel, _imagenet_normalize


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=1000).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip


WARMUP_IMAGES = 4

CONFIGS = {
    "resnet18-64": (resnet18, 64, kfx.Patch(16, stride=8)),
    "resnet18-32": (resnet18, 32, kfx.Patch(16, stride=8)),
    "resnet18-32-s16": (resnet18, 32, kfx.Patch(16, stride=16)),
    "cnn-32": (small_cnn, 32, kfx.Patch(8, stride=4)),
}


def plain_loop(model: nn.Module, size: int, patch: kfx.Patch, paths: list[Path]) -> dict:
    """What a user writes without kfx.explain_dataset: compile once, explain each image."""
    loaded = LoadedModel(model, "model", _imagenet_normalize, size, None)
    engine = kfx.compile(model, (3, size, size), patch)
    maps = {}
    for path in paths:
        image = _model_input(loaded, read_image(str(path)), str(path), size, torch.device("cpu"))
        maps[str(path)] = engine(image).values.numpy()
    return maps


def runner(model: nn.Module, size: int, patch: kfx.Patch, paths: list[Path], out: Path) -> dict:
    summary = kfx.explain_dataset([str(p) for p in paths], model, patch, out, size=size)
    assert summary.done == len(paths) and summary.failed == 0, str(summary)
    table = kfx.read_results(out)
    return dict(zip(table["path"], table["map"]))


def ungrouped_runner(model, size, patch, paths, out) -> dict:
    grouping = multi.MAX_GROUP
    multi.MAX_GROUP = 1
    try:
        return runner(model, size, patch, paths, out)
    finally:
        multi.MAX_GROUP = grouping


def slug(method: str) -> str:
    return method.replace(", ", "-").replace(" ", "_")


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def run_config(name: str, paths: list[Path], work: Path, repeats: int) -> dict:
    make, size, patch = CONFIGS[name]
    model = make()
    engine = kfx.compile(model, (3, size, size), patch)  # what each method's own compile chooses
    methods = {
        "loop": lambda images, out: plain_loop(model, size, patch, images),
        "runner": lambda images, out: runner(model, size, patch, images, out),
        "runner, 1 image": lambda images, out: ungrouped_runner(model, size, patch, images, out),
    }
    for method, run in methods.items():  # untimed, on a few images: lazy initialisation, caches
        run(paths[:WARMUP_IMAGES], work / f"{name}-{slug(method)}-warmup")
    seconds = {method: [] for method in methods}
    maps = {}
    for repeat in range(repeats):
        for method, run in methods.items():
            started = time.perf_counter()
            maps[method] = run(paths, work / f"{name}-{slug(method)}-{repeat}")
            seconds[method].append(time.perf_counter() - started)
            print(f"{name} {method} repeat {repeat}: {seconds[method][-1]:.1f} s", flush=True)
    return {
        "config": name,
        "size": size,
        "patch": list(patch.size),
        "stride": list(patch.stride),
        "positions_per_image": multi.positions_per_image(engine),
        "batch_size": engine.batch_size,
        "plan": engine.plan.summary() if engine.plan is not None else None,
        "group_size": multi.group_size(engine),
        "seconds": seconds,
        "median_s": {m: statistics.median(s) for m, s in seconds.items()},
        "best_s": {m: min(s) for m, s in seconds.items()},
        "max_abs_difference_vs_loop": {
            m: largest_difference(maps[m], maps["loop"]) for m in methods if m != "loop"
        },
    }


def markdown(record: dict) -> str:
    m, images = record["machine"], record["images"]
    lines = [
        "# Small images over a dataset: local runner vs a plain loop",
        "",
        f"`{record['command']}`: {images} images (scikit-image's sample photos repeated), best and median "
        f"of {record['repeats']} turns per method; torch threads {m['torch_threads']}.",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, kfx {m['kfx']} at "
        f"{m['commit']}. Load average (1/5/15 min) at start "
        f"{', '.join(f'{v:.1f}' for v in record['load_average_start'])}, at end "
        f"{', '.join(f'{v:.1f}' for v in record['load_average_end'])}; the machine is shared, so compare "
        "ratios within a row, not absolute times.",
        "",
        "| config | positions/image | group | method | median s | best s | images/s (best) | vs loop (median) "
        "| max abs diff vs loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        loop = row["median_s"]["loop"]
        for method, median in row["median_s"].items():
            best = row["best_s"][method]
            difference = row["max_abs_difference_vs_loop"].get(method)
            lines.append(
                f"| {row['config']} | {row['positions_per_image']} | {row['group_size']} | {method} | "
                f"{median:.1f} | {best:.1f} | {images / best:.2f} | {loop / median:.2f}x | "
                f"{'-' if difference is None else f'{difference:.1e}'} |"
            )
    lines += ["", "Plans (kfx.compile's default):", ""]
    lines += [f"- {row['config']}: {row['plan']}" for row in record["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="dataset_small_images")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "images": args.images,
        "repeats": args.repeats,
        "load_average_start": os.getloadavg(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "photos").mkdir()
        paths = write_photos(work / "photos", args.images)
        for name in args.configs:
            record["rows"].append(run_config(name, paths, work, args.repeats))
            record["load_average_end"] = os.getloadavg()
            save_results(args.out, record, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
