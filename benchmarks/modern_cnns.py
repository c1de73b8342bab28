"""Modern CNN families (timm, random weights): kfx exact (and global_context="local") vs batched full
inference, side by side in one run, with each model's static ceiling and compile cost.

For each model at 224x224, patch 16, --stride, on scikit-image's cat photo, in this one process:

  naive   batched full inference on occluded copies (kfx.NaiveEngine), best of --batch-sizes;
  kfx     the exact engine on the same random sample of --positions grid positions, best batch size,
          the unoccluded image's base inference included in every timed run;
  local   the same with ``global_context="local"`` for models with squeeze-excitation gates
          (approximate: docs/design.md §4.4).

Each time is the best of --repeats runs; speedups compare best with best. ``ceiling`` is
``engine.cost().theoretical_speedup``, ``realized`` the measured speedup over it. ``compile / fwd``
is kfx.compile's wall time over one batch-1 forward pass. Results: JSON and a Markdown table in
benchmarks/results/ with the machine, torch, threads, commit and command. Never run by the tests.

    python benchmarks/modern_cnns.py                 # the six rows of issue #16 (about 10 min here)
    python benchmarks/modern_cnns.py --models convnext_atto --positions 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from compare import (  # benchmarks/ is on sys.path
    best_time,
    kfx_outputs,
    load_photo,
    machine,
    naive_outputs,
    save_results,
)

import kfx

MODELS = ("resnet50d", "darknet53", "convnext_atto", "efficientnet_b0", "hrnet_w18_small")
GATED = ("efficientnet_b0",)  # also measured with global_context="local"


def build(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def run_model(name: str, mode: str, args) -> dict:
    model = build(name)
    side = 224
    image = load_photo(side)
    patch = kfx.Patch(args.patch, stride=args.stride)
    with torch.no_grad():
        forward_s = best_time(lambda: model(image[None]), 3)
    started = time.perf_counter()
    engine = kfx.compile(model, (3, side, side), patch, global_context=mode)
    compile_s = time.perf_counter() - started
    grid = kfx.geometry.heatmap_size(side, args.patch, args.stride)
    generator = torch.Generator().manual_seed(0)
    cells = torch.randperm(grid * grid, generator=generator)[: args.positions]
    positions = torch.stack((cells // grid, cells % grid), dim=1) * args.stride
    rows = []
    for batch in args.batch_sizes:
        t_naive = best_time(lambda b=batch: naive_outputs(model, image, positions, patch, b), args.repeats)
        t_kfx = best_time(lambda b=batch: kfx_outputs(engine, image, positions, b), args.repeats)
        rows.append({"batch_size": batch, "naive_s": round(t_naive, 3), "kfx_s": round(t_kfx, 3)})
    best_naive, best_kfx = min(r["naive_s"] for r in rows), min(r["kfx_s"] for r in rows)
    speedup = best_naive / best_kfx
    ceiling = engine.cost().theoretical_speedup
    return {
        "model": name,
        "global_context": mode,
        "positions": len(positions),
        "rows": rows,
        "speedup_vs_naive": round(speedup, 2),
        "ceiling": round(ceiling, 2),
        "realized": round(speedup / ceiling, 2),
        "compile_s": round(compile_s, 2),
        "compile_over_forward": round(compile_s / forward_s, 1),
        "dense_nodes": [d.node for d in engine.dense_nodes][:3],
    }


def markdown(results: list[dict], args, info: dict) -> str:
    lines = [
        f"# Modern CNNs: kfx vs batched full inference (patch {args.patch}, stride {args.stride}, 224x224)",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, {info['threads']} threads, "
        f"commit {info['commit']}. Command: `{info['command']}`. Best of {args.repeats} per batch size "
        f"({', '.join(map(str, args.batch_sizes))}), best batch size of each method; {args.positions} random "
        "grid positions, the same for both.",
        "",
        "| model | global_context | speedup vs full inference | static ceiling | realized | compile / forward | first dense nodes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['global_context']} | {r['speedup_vs_naive']:.2f}x | {r['ceiling']:.2f} "
            f"| {r['realized']:.2f} | {r['compile_over_forward']:.0f} | {', '.join(r['dense_nodes']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--positions", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="modern_cnns")
    args = parser.parse_args(argv)
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    results = []
    for name in args.models:
        for mode in ("exact", "local") if name in GATED else ("exact",):
            result = run_model(name, mode, args)
            print(json.dumps(result), flush=True)
            results.append(result)
    save_results(args.tag, {"machine": info, "results": results}, markdown(results, args, info))
    print(markdown(results, args, info))
    return results


if __name__ == "__main__":
    main()
