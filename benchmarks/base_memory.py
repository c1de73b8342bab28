"""The base activations an engine keeps for one image, per model: what a map holds for its whole run.

An exact engine keeps, for the unoccluded image, every activation its incremental program reads
(padded once where a conv's windows overhang the map). This counts their bytes after ``_prepare``
(the tensors really held, a shared storage counted once) next to the static estimate
(``engine.memory.per_image``), for 2-D torchvision models at 224 (patch 16, stride 8) and MONAI's
3-D networks (patch 16, stride 6: overlap 0.6), plan="incremental" so that the count does not depend
on a timed plan. Random weights (the sizes do not depend on them), float32. Deterministic: no
timing, so one run on any machine is the number; run it on two commits to compare them.

    python benchmarks/base_memory.py                                  # results/base_memory.{json,md}
    python benchmarks/base_memory.py --models resnet50 --tag base_memory_resnet50
"""

from __future__ import annotations

import argparse
import sys

import torch
from compare import machine, save_results  # benchmarks/ is on sys.path

import kfx

MIB = 2**20
TWO_D = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "inception_v3", "efficientnet_b0"]
THREE_D = ["monai_densenet121", "monai_resnet18"]


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], kfx.Patch]:
    torch.manual_seed(0)
    if name.startswith("monai_"):
        from monai.networks import nets

        side = 128
        if name == "monai_densenet121":
            model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
        else:
            model = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)
        return model.eval(), (1, side, side, side), kfx.Patch(16, stride=6)
    import torchvision

    kwargs = {"init_weights": True, "aux_logits": False} if name == "inception_v3" else {}
    side = 299 if name == "inception_v3" else 224
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, (3, side, side), kfx.Patch(16, stride=8)


def measure(name: str) -> dict:
    model, shape, patch = build(name)
    engine = kfx.compile(model, shape, patch, plan="incremental")
    base = engine._prepare(torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)))
    storages = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in base.activations}
    steps = [type(m).__name__ for m in engine.program.modules()]
    row = {
        "model": name,
        "input": list(shape),
        "slots": len(engine.compiled.slots),
        "kept_mib": round(sum(storages.values()) / MIB, 1),
        "estimate_mib": round(engine.memory.per_image / MIB, 1),
        "covered_local_steps": steps.count("CoveredLocalStep"),
    }
    print(row, flush=True)
    return row


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Base activations kept per image (plan='incremental')",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, commit {info.get('commit', '?')}. "
        f"Command: `{info['command']}`. Deterministic byte counts (no timing); float32, random weights; "
        "2-D at 224 (Inception v3 at 299), patch 16 stride 8; MONAI 3-D at 128^3, patch 16 stride 6.",
        "",
        "| model | input | slots | kept MiB | estimate MiB | covered local steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        lines.append(
            f"| {r['model']} | {shape} | {r['slots']} | {r['kept_mib']} | {r['estimate_mib']} | {r['covered_local_steps']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=TWO_D + THREE_D)
    parser.add_argument("--tag", default="base_memory")
    args = parser.parse_args(argv)
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    rows = [measure(name) for name in args.models]
    payload = {"machine": info, "rows": rows}
    save_results(args.tag, payload, markdown(rows, info))
    print(markdown(rows, info))
    return payload


if __name__ == "__main__":
    main()
