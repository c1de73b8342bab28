"""How approximate is ``global_context="local"``? Map SSIM against the exact map, and the ceilings.

Squeeze-excitation gates change every cell of their output, so the exact engine runs densely after
the first one; ``kfx.compile(..., global_context="local")`` applies each gate's change inside the
changed box only (docs/design.md §4.4). This measures what that costs in map quality:

  - digits: a small squeeze-excitation CNN trained here for a few seconds on scikit-learn's 8x8
    digits (upscaled to 32x32, the split of benchmarks/approx_quality.py: trained on the first 1300),
    maps on --digits held-out digits at patch 8, strides 1 and 2;
  - stress: torchvision EfficientNet-B0 and MobileNetV3-Large with random weights (a gate's change
    is then arbitrary, not learned) on scikit-image's sample photos at 224, patch 16, stride 16.

SSIM is kfx.approx.heatmap_ssim (data_range = the exact map's range). Ceilings are the static
``engine.cost().theoretical_speedup``, exact vs local vs the same model with its gates removed.
Results: JSON and Markdown in benchmarks/results/ with machine and command. Never run by the tests.

    python benchmarks/global_context_quality.py             # about 5 min on our 2-core CPU
    python benchmarks/global_context_quality.py --digits 20 --no-stress
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from approx_quality import digits_data, train_on_digits  # benchmarks/ is on sys.path
from compare import RESULTS, machine
from torch import nn

import kfx
from kfx.approx import heatmap_ssim


class Gate(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc(relu(fc(mean(x))))); the identity when ``on`` is False."""

    def __init__(self, channels: int, on: bool = True):
        super().__init__()
        self.on = on
        self.squeeze = nn.Conv2d(channels, max(channels // 4, 4), 1)
        self.excite = nn.Conv2d(max(channels // 4, 4), channels, 1)

    def forward(self, x):
        if not self.on:
            return x
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))


def se_digits_cnn(gated: bool = True) -> nn.Module:
    """benchmarks/approx_quality.py's digits CNN with a squeeze-excitation gate after each early conv."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        Gate(16, gated),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        Gate(32, gated),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def ssim_study(model, images, patch: kfx.Patch) -> dict:
    shape = tuple(images[0].shape)
    exact = kfx.compile(model, shape, patch)
    local = kfx.compile(model, shape, patch, global_context="local")
    scores, ranges = [], []
    for image in images:
        reference = exact(image)
        scores.append(heatmap_ssim(reference, local(image, reference.target)))
        ranges.append(float(reference.values.max() - reference.values.min()))
    scores = np.array(scores)
    return {
        "patch": patch.size[0],
        "stride": patch.stride[0],
        "maps": len(scores),
        "exact_map_range_mean": float(f"{np.mean(ranges):.3g}"),  # near 0: a flat map, SSIM says little
        "ssim_mean": round(float(scores.mean()), 3),
        "ssim_min": round(float(scores.min()), 3),
        "share_at_least_0.9": round(float((scores >= 0.9).mean()), 3),
        "ceiling_exact": round(exact.cost().theoretical_speedup, 2),
        "ceiling_local": round(local.cost().theoretical_speedup, 2),
    }


def digits_study(count: int) -> dict:
    images, labels = digits_data()
    torch.manual_seed(0)
    model = se_digits_cnn()
    accuracy = train_on_digits(model, images, labels, epochs=8)
    held_out = images[1300 : 1300 + count]
    ungated = se_digits_cnn(gated=False).eval()
    rows = []
    for stride in (1, 2):
        patch = kfx.Patch(8, stride=stride)
        row = ssim_study(model, held_out, patch)
        row["ceiling_no_gates"] = round(
            kfx.compile(ungated, (1, 32, 32), patch).cost().theoretical_speedup, 2
        )
        rows.append(row)
        print(json.dumps({"digits": row}), flush=True)
    return {"accuracy": round(accuracy, 3), "rows": rows}


def stress_study(photos: list[str]) -> list[dict]:
    import torchvision

    from kfx.models import load_image

    rows = []
    for name in ("efficientnet_b0", "mobilenet_v3_large"):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        images = [load_image(photo, 224) for photo in photos]
        row = {"model": name, **ssim_study(model, images, kfx.Patch(16, stride=16))}
        print(json.dumps({"stress": row}), flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    info, digits = result["machine"], result["digits"]
    lines = [
        "# global_context='local': map SSIM against the exact map",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, commit {info['commit']}. "
        f"Command: `{info['command']}`.",
        "",
        f"Trained squeeze-excitation digits CNN (held-out accuracy {digits['accuracy']:.3f}), held-out digits:",
        "",
        "| patch / stride | maps | SSIM mean | SSIM min | share >= 0.9 | ceiling exact | local | no gates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in digits["rows"]:
        lines.append(
            f"| {r['patch']} / {r['stride']} | {r['maps']} | {r['ssim_mean']:.3f} | {r['ssim_min']:.3f} "
            f"| {r['share_at_least_0.9']:.2f} | {r['ceiling_exact']:.2f} | {r['ceiling_local']:.2f} | {r['ceiling_no_gates']:.2f} |"
        )
    if result["stress"]:
        lines += [
            "",
            "Stress cases (random weights, sample photos at 224, patch 16, stride 16):",
            "",
            "| model | maps | exact map range | SSIM mean | SSIM min | share >= 0.9 | ceiling exact | local |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["stress"]:
            lines.append(
                f"| {r['model']} | {r['maps']} | {r['exact_map_range_mean']:.3g} | {r['ssim_mean']:.3f} | {r['ssim_min']:.3f} "
                f"| {r['share_at_least_0.9']:.2f} | {r['ceiling_exact']:.2f} | {r['ceiling_local']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=60, help="held-out digits to map")
    parser.add_argument("--photos", nargs="+", default=["chelsea", "coffee", "astronaut", "rocket"])
    parser.add_argument("--no-stress", action="store_true")
    parser.add_argument("--tag", default="global_context_quality")
    args = parser.parse_args(argv)
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    result = {"machine": info, "digits": digits_study(args.digits)}
    result["stress"] = [] if args.no_stress else stress_study(args.photos)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
