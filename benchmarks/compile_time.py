"""Compile time: ``kfx.compile`` seconds against one batch-1 forward pass, per model, and where it goes.

Issue #19 asks that compiling cost at most about 10 forward passes of one image. For every
torchvision classification model of tests/zoo.py (random weights, 224x224, Inception v3 at 299)
and every timm model of tests/timm_zoo.py (224x224), in this one process and with the same
threads, it measures:

  forward   one batch-1 forward pass of the eager model (no grad), best of --repeats after a warm-up;
  compile   ``kfx.compile(model, shape, Patch(--patch, stride=--stride))``, best of --repeats;
  stages    the best compile split into its passes, timed by wrapping each pass function: trace,
            shape propagation, the check against the eager model, patch propagation (of which the
            box tables), rewrite (incremental program), base program, cost and memory models;
  save/load ``engine.save`` and ``kfx.load`` (kfx/persist.py), best of --repeats, and whether the
            loaded engine's outputs equal the compiled one's on a few positions.

The stride does not change the compile work (box tables cover every patch coordinate). Results:
JSON and a Markdown table in benchmarks/results/ with the machine, torch, threads, commit and
command. Never run by the tests.

    python benchmarks/compile_time.py --threads 1              # every model (about 15 min here)
    python benchmarks/compile_time.py --models resnet18 dpn68 --repeats 1
    python benchmarks/compile_time.py --profile dpn68          # cProfile of one compile, top functions
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from compare import best_time, machine, save_results  # benchmarks/ is on sys.path

import kfx
import kfx.engine
import kfx.passes
import kfx.passes.patch_prop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from timm_zoo import TIMM_ZOO  # noqa: E402
from zoo import ZOO  # noqa: E402

# (label, module, function name): each pass as the pipeline calls it. A name a refactor removed is
# skipped (its time lands in "other").
STAGES = (
    ("trace", kfx.passes, "trace"),
    ("shapes", kfx.passes, "propagate_shapes"),
    ("check", kfx.passes, "check_traced"),
    ("patches", kfx.passes, "propagate_patches"),
    ("rewrite", kfx.engine, "build_program"),
    ("base program", kfx.engine, "build_base_program"),
    ("cost", kfx.engine, "static_cost"),
    ("memory", kfx.engine, "estimate_memory"),
)
# Inside patch propagation: the per-axis box tables of each node.
BOX_TABLES = ("local_axis", "merge_axis", "resample_axis", "transposed_axis")  # as patch_prop names them


def models(names: list[str] | None) -> list[tuple[str, str]]:
    """(source, name) of the models to measure: torchvision's zoo, then timm's."""
    every = [("torchvision", n) for n in ZOO] + [("timm", n) for n in TIMM_ZOO]
    if not names:
        return every
    known = dict((n, s) for s, n in every)
    return [(known.get(n, "timm"), n) for n in names]


def build(source: str, name: str) -> tuple[torch.nn.Module, int]:
    """The model in float32 with random weights, and its image side."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval(), 224
    import torchvision

    kwargs = {"init_weights": True, "aux_logits": False} if name in ("googlenet", "inception_v3") else {}
    if name == "inception_v3_aux":
        name, kwargs = "inception_v3", {"init_weights": True, "aux_logits": True}
    side = 299 if name == "inception_v3" else 224
    return torchvision.models.get_model(name, weights=None, **kwargs).eval(), side


@contextlib.contextmanager
def stage_timers():
    """Wrap each pass function; yields a dict label -> seconds, filled as the passes run."""
    seconds: dict[str, float] = defaultdict(float)
    patched = []

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start

        return wrapper

    targets = [*STAGES, *(("box tables", kfx.passes.patch_prop, n) for n in BOX_TABLES)]
    for label, module, name in targets:
        fn = getattr(module, name, None)
        if fn is not None:
            patched.append((module, name, fn))
            setattr(module, name, timed(label, fn))
    try:
        yield seconds
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)


def timed_compile(model, shape, patch) -> tuple[kfx.Engine, float, dict[str, float]]:
    with stage_timers() as stages:
        start = time.perf_counter()
        engine = kfx.compile(model, shape, patch)
        total = time.perf_counter() - start
    return engine, total, dict(stages)


def save_load(engine, model, image, repeats: int) -> dict:
    """engine.save / kfx.load seconds (best of ``repeats``), the file's size, and whether the loaded
    engine's outputs equal the compiled engine's on a few positions (bitwise)."""
    if not hasattr(kfx, "load"):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine.kfx"
        save_s = best_time(lambda: engine.save(path), repeats)
        load_s = best_time(lambda: kfx.load(path, model), repeats)
        loaded = kfx.load(path, model)
        size = path.stat().st_size
    positions = torch.tensor([[0, 0], [8, 40], [100, 60]])
    same = torch.equal(engine.outputs(image, positions), loaded.outputs(image, positions))
    return {"save_s": round(save_s, 3), "load_s": round(load_s, 3), "file_kib": size // 1024, "same": same}


def fx_trace_seconds(model, repeats: int) -> float | None:
    """Best time of plain ``torch.fx.symbolic_trace(model)``, the first step of any torch.fx
    compiler: a floor under kfx.compile. None where plain tracing fails (kfx's tracer keeps some
    modules as leaves; timm's same-padding convs branch on shapes)."""
    try:
        return best_time(lambda: torch.fx.symbolic_trace(model), repeats)
    except Exception:  # noqa: BLE001 - any trace error means: no floor to report
        return None


def run_model(source: str, name: str, args) -> dict:
    model, side = build(source, name)
    shape, patch = (3, side, side), kfx.Patch(args.patch, stride=args.stride)
    image = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(image)  # warm-up
        forward_s = best_time(lambda: model(image), args.repeats)
    runs = [timed_compile(model, shape, patch) for _ in range(args.repeats)]
    first_s = runs[0][1]  # what a fresh process (a CLI call) pays, with first-call warm-ups
    engine, compile_s, stages = min(runs, key=lambda run: run[1])
    fx_s = fx_trace_seconds(model, args.repeats)
    stages["other"] = compile_s - sum(v for k, v in stages.items() if k != "box tables")
    return {
        "model": name,
        "source": source,
        "side": side,
        "nodes": len(engine.graph_module.graph.nodes),
        "forward_s": round(forward_s, 4),
        "compile_s": round(compile_s, 3),
        "first_compile_s": round(first_s, 3),
        "ratio": round(compile_s / forward_s, 1),
        "fx_trace_s": None if fx_s is None else round(fx_s, 3),
        "fx_trace_ratio": None if fx_s is None else round(fx_s / forward_s, 1),
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        **save_load(engine, model, image[0], args.repeats),
    }


def profile(source: str, name: str, args) -> None:
    model, side = build(source, name)
    shape, patch = (3, side, side), kfx.Patch(args.patch, stride=args.stride)
    kfx.compile(model, shape, patch)  # warm-up: imports, first-call caches
    profiler = cProfile.Profile()
    profiler.runcall(kfx.compile, model, shape, patch)
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)


STAGE_COLUMNS = ("trace", "shapes", "check", "patches", "box tables", "rewrite", "base program", "other")


def markdown(results: list[dict], args, info: dict) -> str:
    has_load = any("load_s" in r for r in results)
    lines = [
        f"# Compile time: kfx.compile against one batch-1 forward pass (patch {args.patch}, stride {args.stride})",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} threads, "
        f"commit {info['commit']}. Command: `{info['command']}`. Best of {args.repeats} (forward and compile "
        "each); random weights, float32; torchvision at 224 (Inception v3 at 299), timm at 224. 'First compile' is the "
        "first of the repeats (a fresh process's, after one eager forward). Stage times are the best compile's, in seconds (box tables are part of patches). The goal (issue #19) is "
        "compile / forward <= about 10. 'Plain fx trace' is `torch.fx.symbolic_trace(model)` alone (best of the repeats; '-' where it cannot trace the model): the first step of any torch.fx compiler, a floor under kfx.compile. "
        f"Load average (1, 5, 15 min) {info['load_average_before']} before the run and {info['load_average_after']} "
        f"after it on {info['cpus']} CPUs: a machine shared with other jobs gives noisy times.",
        "",
        "| model | nodes | forward s | compile s | compile / forward | plain fx trace / forward | first compile s | "
        + " | ".join(STAGE_COLUMNS)
        + (" | save s | load s | load / forward | file KiB | loaded == compiled |" if has_load else " |"),
        "|---|" + "---|" * (6 + len(STAGE_COLUMNS) + (5 if has_load else 0)),
    ]
    for r in results:
        stages = " | ".join(f"{r['stages_s'].get(k, 0):.2f}" for k in STAGE_COLUMNS)
        fx = "-" if r.get("fx_trace_ratio") is None else f"{r['fx_trace_ratio']:.1f}"
        row = f"| {r['model']} | {r['nodes']} | {r['forward_s']:.3f} | {r['compile_s']:.2f} | {r['ratio']:.0f} | {fx} | {r['first_compile_s']:.2f} | {stages} |"
        if has_load:
            load_ratio = f"{r['load_s'] / r['forward_s']:.0f}" if "load_s" in r else "-"
            row += (
                f" {r.get('save_s', '-')} | {r.get('load_s', '-')} | {load_ratio} | {r.get('file_kib', '-')} "
                f"| {r.get('same', '-')} |"
            )
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", help="names from tests/zoo.py or tests/timm_zoo.py (or any timm name)"
    )
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--profile", metavar="MODEL", help="print a cProfile of one compile of MODEL and exit"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine"
    )
    parser.add_argument("--tag", default="compile_time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(*models([args.profile])[0], args)
        return []
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    info["load_average_before"] = [round(v, 1) for v in os.getloadavg()]
    results = []
    for source, name in models(args.models):
        result = run_model(source, name, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    info["load_average_after"] = [round(v, 1) for v in os.getloadavg()]
    save_results(args.tag, {"machine": info, "results": results}, markdown(results, args, info))
    print(markdown(results, args, info))
    return results


if __name__ == "__main__":
    main()
