"""kfx exact vs what people run today, side by side in one run: batched full inference and Captum.

For each model (torchvision VGG16 224, ResNet18 224, Inception v3 299 with random weights: speed
does not depend on the weights; EfficientNet-Lite0 224 with its ImageNet weights) on scikit-image's
cat photo, patch 16, stride 4, it times on the same machine, in this one process:

  naive   batched full inference on occluded copies (Krypton's baseline), best of --batch-sizes;
  captum  ``captum.attr.Occlusion.attribute`` with ``perturbations_per_eval`` = each batch size, best;
  kfx     the exact engine (``engine.outputs``) on the same positions as naive, best batch size;
          the unoccluded image's base inference is included in every timed kfx run.

Naive and kfx run on the same random sample of --positions grid positions (the full map's cost is
the same per position); Captum, which cannot be given positions, runs its own grid at a coarser
stride (--captum-stride) and is compared per window (a window costs Captum one forward pass
whatever the stride). ``kfx.captum.Occlusion`` then repeats Captum's exact call, which both checks
that the two maps agree (max relative difference) and gives a like-for-like time.

Each time is the best of --repeats runs; speedups compare best with best. Peak memory is the growth
of peak RSS over one batch of --memory-batch positions, each method in a fresh child process. The
FLOP ceiling is ``engine.cost().theoretical_speedup``. Results: JSON and a Markdown table in
benchmarks/results/ (machine, torch, threads, commit, command included). Never run by the tests.

    python benchmarks/compare.py                     # all four models, stride 4 (about 30-40 min here)
    python benchmarks/compare.py --quick             # stride 8, fewer positions, best of 1 (~8 min)
    python benchmarks/compare.py --models resnet18 --positions 0   # 0 = the whole grid
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import kfx
from kfx.geometry import captum_heatmap_size

RESULTS = Path(__file__).parent / "results"
MODELS = ("vgg16", "resnet18", "inception_v3", "efficientnet_lite0")


def save_results(tag: str, payload: dict, markdown: str) -> None:
    """Write ``results/<tag>.json`` and ``results/<tag>.md`` (every benchmark records both)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{tag}.md").write_text(markdown)


def build_model(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        from kfx.models import efficientnet_lite0

        return efficientnet_lite0()
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def image_side(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def load_photo(side: int) -> torch.Tensor:
    from kfx.models import load_image

    return load_image("chelsea", side)


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
    """Batched full inference on occluded copies: kfx's own naive reference, one pass per position."""
    naive = kfx.NaiveEngine(model, tuple(image.shape[-3:]), patch, batch_size=batch_size)
    return naive.outputs(image, positions)


def kfx_outputs(engine, image, positions, batch_size):
    engine._base_cache = None  # include the base inference of the image, as a first call would
    return engine.outputs(image, positions, batch_size=batch_size)


def captum_attribute(occlusion, image, patch_size, stride, target, batch_size):
    with torch.no_grad():
        return occlusion.attribute(
            image[None],
            sliding_window_shapes=(3, patch_size, patch_size),
            strides=(3, stride, stride),
            baselines=0.0,
            target=target,
            perturbations_per_eval=batch_size,
        )


def interleaved(runs: dict, repeats: int, reference: str = "full") -> tuple[dict, dict]:
    """Time ``runs`` ({method: callable returning outputs}) side by side: each runs once to check
    its outputs, then the methods take turns within each of ``repeats`` rounds (a load change on a
    shared machine hits all alike). Returns ({method: best seconds}, {method: largest difference from
    the ``reference`` method's outputs, relative to their largest magnitude})."""
    outputs = {method: run() for method, run in runs.items()}
    scale = outputs[reference].abs().max()
    errors = {
        method: float((out - outputs[reference]).abs().max() / scale)
        for method, out in outputs.items()
        if method != reference
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for method, run in runs.items():
            best[method] = min(best[method], best_time(run, 1))
    return best, errors


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# -- peak memory, one method per fresh child process ----------------------------------------------
def _rss_mib(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, in MiB. Not ru_maxrss: a
    spawned child inherits its parent's ru_maxrss across exec, VmHWM is its own address space's."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux)
        f.write("5")


def _peak_child(name, method, patch_size, stride, batch_size, threads, queue):
    try:
        queue.put(_measure_peak(name, method, patch_size, stride, batch_size, threads))
    except BaseException as exc:  # report, so the parent never waits forever on a dead child
        queue.put(f"{type(exc).__name__}: {exc}")


def _measure_peak(name, method, patch_size, stride, batch_size, threads) -> float:
    torch.set_num_threads(threads)
    model = build_model(name)
    side = image_side(name)
    image = load_photo(side)
    patch = kfx.Patch(patch_size, stride=stride)
    positions = kfx.grid_positions((side, side), patch)[:batch_size]
    engine = kfx.compile(model, (3, side, side), patch, batch_size=batch_size) if method == "kfx" else None
    _reset_peak_rss()
    before = _rss_mib()
    if method == "kfx":
        kfx_outputs(engine, image, positions, batch_size)  # includes the image's base activations
    elif method == "naive":
        naive_outputs(model, image, positions, patch, batch_size)
    else:  # captum: its coarsest allowed grid (stride = window) has at least one full batch
        from captum.attr import Occlusion

        captum_attribute(Occlusion(model), image, patch_size, patch_size, 0, batch_size)
    return _rss_mib("VmHWM") - before


def peak_memory_mib(name, method, patch_size, stride, batch_size, threads) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_peak_child, args=(name, method, patch_size, stride, batch_size, threads, queue)
    )
    proc.start()
    value = queue.get()
    proc.join()
    if isinstance(value, str):
        raise RuntimeError(f"peak memory of {method} on {name} failed in the child process: {value}")
    return round(value, 1)


# -- one model --------------------------------------------------------------------------------------
def run_model(name: str, args) -> dict:
    from captum.attr import Occlusion as CaptumOcclusion

    import kfx.captum

    model = build_model(name)
    side = image_side(name)
    image = load_photo(side)
    patch = kfx.Patch(args.patch, stride=args.stride)
    engine = kfx.compile(model, (3, side, side), patch)
    with torch.no_grad():
        target = int(model(image[None]).argmax())
    grid = kfx.grid_positions((side, side), patch)
    positions = grid
    if args.positions:
        order = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(0))
        positions = grid[order[: args.positions]]
    n = positions.shape[0]
    captum_windows = captum_heatmap_size(side, args.patch, args.captum_stride) ** 2

    rows = []
    for batch in args.batch_sizes:
        naive_outputs(model, image, positions[:batch], patch, batch)  # warm up this batch shape
        kfx_outputs(engine, image, positions[:batch], batch)
        t_naive = best_time(lambda b=batch: naive_outputs(model, image, positions, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch: kfx_outputs(engine, image, positions, b), args.repeats)
        t_captum = best_time(
            lambda b=batch: captum_attribute(
                CaptumOcclusion(model), image, args.patch, args.captum_stride, target, b
            ),
            args.repeats,
        )
        row = {
            "batch_size": batch,
            "naive_pos_per_s": round(n / t_naive, 2),
            "captum_pos_per_s": round(captum_windows / t_captum, 2),
            "kfx_pos_per_s": round(n / t_kfx, 2),
        }
        rows.append(row)
        print(f"  {name} batch {batch}: {json.dumps(row)}", flush=True)

    # Like for like: Captum's own call through kfx's drop-in, and do the two maps agree?
    best_batch = max(rows, key=lambda r: r["captum_pos_per_s"])["batch_size"]
    ours = kfx.captum.Occlusion(model)
    drop_in = captum_attribute(ours, image, args.patch, args.captum_stride, target, best_batch)
    reference = captum_attribute(
        CaptumOcclusion(model), image, args.patch, args.captum_stride, target, best_batch
    )
    agreement = ((drop_in - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
    t_drop_in = best_time(
        lambda: captum_attribute(ours, image, args.patch, args.captum_stride, target, best_batch),
        args.repeats,
    )

    with torch.no_grad():  # the engine's answer must be the model's, or the timings mean nothing
        check = positions[:8]
        expected = model(kfx.occlude(image, check, patch))
        exact_err = ((engine.outputs(image, check) - expected).abs().max() / expected.abs().max()).item()

    best = {
        key: max(r[key] for r in rows) for key in ("naive_pos_per_s", "captum_pos_per_s", "kfx_pos_per_s")
    }
    ceiling = engine.cost().theoretical_speedup
    result = {
        "model": name,
        "image": side,
        "positions_timed": n,
        "grid_positions": int(grid.shape[0]),
        "captum_windows": captum_windows,
        "rows": rows,
        "best": best,
        "speedup_vs_naive": round(best["kfx_pos_per_s"] / best["naive_pos_per_s"], 2),
        "speedup_vs_captum": round(best["kfx_pos_per_s"] / best["captum_pos_per_s"], 2),
        "theoretical_speedup": round(ceiling, 2),
        # the paper's count (a concat takes its last input's box; not exact): differs for Inception v3
        "paper_accounting_speedup": round(
            kfx.paper_cost(model, (3, side, side), patch).theoretical_speedup, 2
        ),
        "realized_over_ceiling": round(best["kfx_pos_per_s"] / best["naive_pos_per_s"] / ceiling, 2),
        "drop_in_vs_captum_same_call": round(captum_windows / t_drop_in / best["captum_pos_per_s"], 2),
        "drop_in_max_rel_diff": agreement,
        "exact_max_rel_err": exact_err,
        "full_map_seconds_estimate": {
            key.split("_")[0]: round(grid.shape[0] / value, 1) for key, value in best.items()
        },
    }
    if not args.no_memory:
        result["peak_mib"] = measure_memory(name, args)
    return result


def measure_memory(name: str, args) -> dict:
    mem = {
        method: peak_memory_mib(name, method, args.patch, args.stride, args.memory_batch, args.threads)
        for method in ("naive", "captum", "kfx")
    }
    return {"batch": args.memory_batch, **mem}


def markdown(results: list[dict], args, info: dict) -> str:
    lines = [
        f"Patch {args.patch}, stride {args.stride}; {info['processor']}, {info['cpus']} CPUs, "
        f"{info['threads']} threads, torch {info['torch']}, commit {info['commit']}; "
        f"best of {args.repeats}, batch sizes {args.batch_sizes} (best of each method). "
        f"`{info['command']}`",
        "",
        "| model | image | positions/s: naive | Captum | kfx | kfx / naive | kfx / Captum | FLOP ceiling "
        "| realized / ceiling | peak MiB naive / Captum / kfx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = r.get("peak_mib")
        mem_text = (
            f"{mem['naive']:.0f} / {mem['captum']:.0f} / {mem['kfx']:.0f} (batch {mem['batch']})"
            if mem
            else "-"
        )
        b = r["best"]
        lines.append(
            f"| {r['model']} | {r['image']} | {b['naive_pos_per_s']:.1f} | {b['captum_pos_per_s']:.1f} "
            f"| {b['kfx_pos_per_s']:.1f} | {r['speedup_vs_naive']:.2f}x | {r['speedup_vs_captum']:.2f}x "
            f"| {r['theoretical_speedup']:.2f}x | {r['realized_over_ceiling']:.2f} | {mem_text} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--positions", type=int, default=128, help="random grid positions timed (0 = all)")
    parser.add_argument(
        "--captum-stride",
        type=int,
        default=16,
        help="Captum's stride, at most the patch (Captum refuses more); its windows are timed",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="stride 8, 64 positions, best of 1")
    parser.add_argument(
        "--memory-only", action="store_true", help="re-measure peak memory into an existing results file"
    )
    parser.add_argument("--tag", default=None, help="results file name suffix (default: quick or s<stride>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.stride, args.positions, args.repeats = 8, 64, 1
        args.batch_sizes = [32, 64]
    torch.set_num_threads(args.threads)
    info = machine()
    info["command"] = "python " + " ".join(
        ["benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])]
    )

    tag = args.tag or ("quick" if args.quick else f"s{args.stride}")
    if args.memory_only:
        saved = json.loads((RESULTS / f"compare_{tag}.json").read_text())
        results, info = saved["results"], saved["machine"]
        for result in results:
            result["peak_mib"] = measure_memory(result["model"], args)
            print(result["model"], result["peak_mib"], flush=True)
    else:
        results = []
        for name in args.models:
            print(f"{name} ...", flush=True)
            results.append(run_model(name, args))
    table = markdown(results, args, info)
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"compare_{tag}.json").write_text(
        json.dumps({"machine": info, "settings": vars(args), "results": results}, indent=2) + "\n"
    )
    (RESULTS / f"compare_{tag}.md").write_text(table)
    print(f"wrote {RESULTS / f'compare_{tag}.json'} and .md")
    return results


if __name__ == "__main__":
    main()
