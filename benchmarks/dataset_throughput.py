"""Images per second over a dataset: kfx.explain_dataset (local runner, Ray runner) against a plain
Python loop over kfx.compile(...)(image).

EfficientNet-Lite0 (embedded ImageNet weights), patch 16, stride 8 (729 positions per image), on
scikit-image's four sample photos written as PNG files and repeated to --images files. Every
method's time includes loading the model and compiling its engine(s) (the Ray runner: starting its
actors too; starting Ray itself is timed separately), and reading and resizing every image. The
maps of the three methods are compared (largest absolute difference), so a fast wrong answer shows.

    python benchmarks/dataset_throughput.py                  # 200 images: hours on a 2-core CPU
    python benchmarks/dataset_throughput.py --rounds 4 --output benchmarks/results/dataset_throughput_200
        # 200 images in 4 rounds of 50, the methods taking turns: what benchmarks/results/ holds
    python benchmarks/dataset_throughput.py --images 8       # a quick look
    python benchmarks/dataset_throughput.py --images 8 --threads 1 --no-ray \
        --output benchmarks/results/dataset_throughput_1thread  # the local side single-threaded

Writes benchmarks/results/dataset_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kfx
from kfx.cli.images import _model_input, read_image
from kfx.models import SAMPLE_PHOTOS, load_model, read_pixels

RESULTS = Path(__file__).parent / "results"
MODEL = "efficientnet-lite0"


def write_photos(folder: Path, count: int) -> list[Path]:
    """The sample photos as PNG files, repeated to ``count`` (distinct names, so distinct inputs)."""
    from PIL import Image

    pixels = {name: read_pixels(name) for name in SAMPLE_PHOTOS}
    paths = []
    for i in range(count):
        name = SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)]
        path = folder / f"{i:04d}_{name}.png"
        Image.fromarray(pixels[name]).save(path)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], patch: kfx.Patch) -> tuple[float, dict]:
    """What a user writes without kfx.explain_dataset: load, compile once, explain each image."""
    started = time.perf_counter()
    loaded = load_model(MODEL)
    engine = kfx.compile(loaded.model, (3, loaded.size, loaded.size), patch)
    maps = {}
    for path in paths:
        image = _model_input(loaded, read_image(str(path)), str(path), loaded.size, torch.device("cpu"))
        maps[str(path.resolve())] = engine(image).values.numpy()
    return time.perf_counter() - started, maps


def dataset_run(paths, patch, out: Path, **options) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = kfx.explain_dataset(paths, MODEL, patch, out, **options)
    seconds = time.perf_counter() - started
    assert summary.done == len(paths) and summary.failed == 0, str(summary)
    table = kfx.read_results(out)
    return seconds, dict(zip(table["path"], table["map"]))


LOOP = "plain loop over kfx.compile(...)(image)"
LOCAL = "explain_dataset, local runner"
RAY = "explain_dataset, Ray runner (2 actors x 1 torch thread)"


def run_rounds(paths: list[Path], patch: kfx.Patch, work: Path, rounds: int, ray: bool) -> dict:
    """Every method on every round's share of ``paths`` (methods take turns, the first one rotating
    from round to round); each method's seconds and maps summed over the rounds. A method's time in
    a round includes its fixed costs (model load, compile; Ray: its actors' start), paid per round."""
    names = [LOOP, LOCAL] + ([RAY] if ray else [])
    seconds = {name: [] for name in names}
    maps: dict[str, dict] = {name: {} for name in names}
    if ray:
        import ray as ray_module

        started = time.perf_counter()
        ray_module.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - started
    try:
        for index in range(rounds):
            share = paths[index * len(paths) // rounds : (index + 1) * len(paths) // rounds]
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                if name == LOOP:
                    spent, got = plain_loop(share, patch)
                elif name == LOCAL:
                    spent, got = dataset_run(share, patch, work / f"local{index}")
                else:
                    spent, got = dataset_run(
                        share, patch, work / f"ray{index}", runner="ray", actors=2, threads=1
                    )
                seconds[name].append(spent)
                maps[name].update(got)
                print(
                    f"round {index + 1}/{rounds}, {name}: {spent:.1f} s for {len(share)} images", flush=True
                )
    finally:
        if ray:
            ray_module.shutdown()
    images = len(paths)
    out = {}
    for name in names:
        total = sum(seconds[name])
        out[name] = {"seconds": total, "images_per_second": images / total, "round_seconds": seconds[name]}
        if name == LOOP:
            out[name]["torch_threads"] = torch.get_num_threads()
        else:
            out[name]["max_abs_difference_vs_loop"] = largest_difference(maps[name], maps[LOOP])
        if name == RAY:
            out[name]["ray_init_seconds"] = ray_start_s
        print(f"{name}: {total:.1f} s, {images / total:.4f} images/s", flush=True)
    return out


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def machine() -> dict:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    repo = Path(__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=repo
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True, cwd=repo
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kfx": kfx.__version__,
        "commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray runner")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the loop and the local runner (default: torch's)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split the images into this many rounds; each round runs every method on its share, "
        "the order rotating, so load from other jobs falls on all methods alike",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "dataset_throughput")
    args = parser.parse_args()
    patch = kfx.Patch(args.patch, stride=args.stride)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "images": args.images,
        "model": MODEL,
        "patch": args.patch,
        "stride": args.stride,
        "load_average_start": os.getloadavg(),
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "photos").mkdir()
        paths = write_photos(work / "photos", args.images)
        methods = run_rounds(paths, patch, work, args.rounds, ray=not args.no_ray)
        record["rounds"] = args.rounds
        record["methods"] = methods
    record["load_average_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {args.output.with_suffix('.json')} and .md")


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# Dataset throughput",
        "",
        f"`{record['command']}`: {record['model']}, patch {record['patch']}, stride {record['stride']}, "
        f"{record['images']} images (scikit-image's sample photos repeated), "
        + (
            "one run per method; "
            if record.get("rounds", 1) == 1
            else f"in {record['rounds']} rounds of {record['images'] // record['rounds']} images, each "
            "round running every method in turn (the first method rotating), times summed; "
        )
        + f"the loop and the local runner with {m['torch_threads']} torch thread(s).",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, "
        f"kfx {m['kfx']} at {m['commit']}. Load average (1/5/15 min) at start "
        f"{', '.join(f'{v:.1f}' for v in record['load_average_start'])}, at end "
        f"{', '.join(f'{v:.1f}' for v in record['load_average_end'])}: the machine was shared with "
        "other jobs, so these numbers are noisy; compare ratios, not absolute times.",
        "",
        "| method | seconds | images/s | max abs difference vs loop |",
        "|---|---|---|---|",
    ]
    for name, result in record["methods"].items():
        difference = result.get("max_abs_difference_vs_loop")
        shown = "-" if difference is None else f"{difference:.2e}"
        lines.append(f"| {name} | {result['seconds']:.1f} | {result['images_per_second']:.4f} | {shown} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
