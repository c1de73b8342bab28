"""The plan (docs/design.md §3.8) side by side in one run: plan="auto" vs plan="incremental" vs
batched full inference (kfx.NaiveEngine), on the same positions, in one process.

Models (torchvision, random weights: speed does not depend on them): Inception v3 at 299 with
patch 16, stride 8 (where incremental-only pays for boxes that cover the 17x17 stage); and the
"never slower" set at 224, patch 16, stride 16: EfficientNet-B0, RegNet-Y-400MF, ConvNeXt-T, VGG16,
ResNet18. Each time is the best of --repeats runs at the best of --batch-sizes, the three methods
taking turns within each repeat (a load change hits all alike); every kfx run
includes the unoccluded image's base inference. The auto engine's plan (candidates, estimates,
switch nodes) is printed and stored. Results: JSON and Markdown in benchmarks/results/. Never run by
the tests; on a shared machine only the ratios mean much.

    nice -n 10 python benchmarks/plan.py                       # all six models (~15 min on 2 cores)
    nice -n 10 python benchmarks/plan.py --models resnet18 --positions 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from compare import RESULTS, best_time, machine  # noqa: E402

import kfx  # noqa: E402

# name -> (image side, patch, stride)
MODELS = {
    "inception_v3": (299, 16, 8),
    "efficientnet_b0": (224, 16, 16),
    "regnet_y_400mf": (224, 16, 16),
    "convnext_tiny": (224, 16, 16),
    "vgg16": (224, 16, 16),
    "resnet18": (224, 16, 16),
}


def build_model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def interleaved_best(runs: dict, batch_sizes, repeats) -> dict:
    """{method: (seconds, batch size)}, each the best over ``repeats`` x ``batch_sizes``. The methods
    take turns within each repeat, so a load change on a shared machine hits all of them alike."""
    best = {name: (float("inf"), 0) for name in runs}
    for _ in range(repeats):
        for batch in batch_sizes:
            for name, run in runs.items():
                best[name] = min(best[name], (best_time(lambda r=run, b=batch: r(b), 1), batch))
    return best


def run_model(name: str, args) -> dict:
    side, size, stride = MODELS[name]
    model, patch = build_model(name), kfx.Patch(size, stride=stride)
    image = torch.randn(3, side, side, generator=torch.Generator().manual_seed(0))
    grid = kfx.grid_positions((side, side), patch)
    pick = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(1))[: args.positions]
    positions = grid[pick]
    row = {"model": name, "image": side, "patch": size, "stride": stride, "positions": len(positions)}
    start = time.perf_counter()
    auto = kfx.compile(model, (3, side, side), patch, plan="auto")
    row["compile_auto_s"] = time.perf_counter() - start
    incremental = kfx.compile(model, (3, side, side), patch, plan="incremental")
    naive = kfx.NaiveEngine(model, (3, side, side), patch)
    print(f"{name}: {auto.plan}", flush=True)
    row["plan"] = auto.plan.chosen
    row["switch_nodes"] = list(auto.plan.switch_nodes)
    row["estimates_ms"] = {c.name: c.seconds_per_position * 1e3 for c in auto.plan.candidates}

    def kfx_run(engine):
        def run(batch):
            engine._base_cache = None  # include the base inference, as a first call would
            return engine.outputs(image, positions, batch_size=batch)

        return run

    runs = {
        "full": lambda b: naive.outputs(image, positions, batch_size=b),
        "incremental": kfx_run(incremental),
        "auto": kfx_run(auto),
    }
    timings = interleaved_best(runs, args.batch_sizes, args.repeats)
    for method, (seconds, batch) in timings.items():
        row[f"{method}_ms_per_position"] = seconds / len(positions) * 1e3
        row[f"{method}_batch"] = batch
    row["incremental_speedup"] = timings["full"][0] / timings["incremental"][0]
    row["auto_speedup"] = timings["full"][0] / timings["auto"][0]
    row["auto_vs_incremental"] = timings["incremental"][0] / timings["auto"][0]
    print(
        f"  speedup over full inference: incremental {row['incremental_speedup']:.2f}x, "
        f"auto {row['auto_speedup']:.2f}x (auto/incremental {row['auto_vs_incremental']:.2f}x)",
        flush=True,
    )
    return row


def markdown(rows: list[dict], args, info: dict) -> str:
    lines = [
        f"# plan=auto vs plan=incremental vs full inference ({info['processor']}, {info['cpus']} cpus, "
        f"torch {info['torch']}, {info['threads']} threads, commit {info['commit']})",
        "",
        f"Command: `{' '.join(sys.argv)}`; {args.positions} positions, best of {args.repeats}, "
        f"best of batch sizes {args.batch_sizes}. Speedups are over batched full inference.",
        "",
        "| model | patch/stride | auto plan | switch nodes | incremental | auto | auto vs incremental |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['image']} | {r['patch']}/{r['stride']} | {r['plan']} | {len(r['switch_nodes'])} | "
            f"{r['incremental_speedup']:.2f}x | {r['auto_speedup']:.2f}x | {r['auto_vs_incremental']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--out", default="plan")
    args = parser.parse_args(argv)
    info = machine()
    rows = [run_model(name, args) for name in args.models]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    table = markdown(rows, args, info)
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
