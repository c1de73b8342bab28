"""How approximate is ``global_context="local"``? Map SSIM against the exact map, and the ceilings.

Squeeze-excitation gates change every cell of their output, so the exact engine runs densely after
the first one; ``kfx.compile(..., global_context="local")`` applies each gate's change inside the
changed box only (docs/design.md §4.4). This measures what that costs in map quality:

  - digits: small CNNs trained here for a few seconds each on scikit-learn's 8x8 digits (upscaled
    to 32x32, the split of benchmarks/approx_quality.py: trained on the first 1300), maps on
    --digits held-out digits at patch 8, strides 1 and 2. One family per kind of global context
    (--families): ``se`` squeeze-excitation gates, ``gn`` GroupNorm, ``grn`` a ConvNeXt-V2 block
    with timm's GlobalResponseNorm, and ``grn_gamma1``, the same block with GRN's gamma initialised
    to 1 instead of timm's 0 (trained from 0, GRN stays near the identity on this small task, which
    says little about the approximation);
  - stress: torchvision EfficientNet-B0 and MobileNetV3-Large with random weights (a gate's change
    is then arbitrary, not learned) on scikit-image's sample photos at 224, patch 16, stride 16;
    once with the BatchNorm statistics torchvision initialises (flat maps, see
    recalibrate_batch_norm) and once with them recalibrated on the photos.

SSIM is kfx.approx.heatmap_ssim (data_range = the exact map's range). Ceilings are the static
``engine.cost().theoretical_speedup``, exact vs local vs the same model with its global context
removed (gates, norms, GRN replaced by identities). Results: JSON and Markdown in
benchmarks/results/ with machine, command and the load average (the CPU may be shared). Training
repeats exactly for a given torch thread count (recorded); another count trains slightly different
models. Never run by the tests.

    python benchmarks/global_context_quality.py             # digits 7 min on our shared 2-core CPU,
                                                            # the float64 stress cases 30 min or more
    python benchmarks/global_context_quality.py --digits 20 --families gn grn --no-stress
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

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


def gn_digits_cnn(normed: bool = True) -> nn.Module:
    """The same digits CNN with a GroupNorm (4 channels a group) after each early conv, before the ReLU."""

    def norm(channels: int) -> nn.Module:
        return nn.GroupNorm(channels // 4, channels) if normed else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),
        norm(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


class ConvNeXtV2Block(nn.Module):
    """ConvNeXt-V2's block: depthwise 7x7, then channels last: LayerNorm, Linear to 4C, GELU,
    timm's GlobalResponseNorm (or an identity), Linear back to C; permuted back and added to x."""

    def __init__(self, channels: int, grn: bool = True, gamma: float = 0.0):
        super().__init__()
        from timm.layers.grn import GlobalResponseNorm

        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.expand = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(4 * channels, channels_last=True) if grn else nn.Identity()
        if grn:
            nn.init.constant_(self.grn.weight, gamma)  # timm's init is 0: GRN starts as the identity
        self.project = nn.Linear(4 * channels, channels)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.project(self.grn(self.act(self.expand(y))))
        return x + y.permute(0, 3, 1, 2)


def grn_digits_cnn(grn: bool = True, gamma: float = 0.0) -> nn.Module:
    """The digits CNN with a ConvNeXt-V2 block (GRN inside) after its first conv."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),
        ConvNeXtV2Block(16, grn, gamma),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


@dataclass(frozen=True)
class Family:
    """A digits CNN with one kind of global context; ``build(False)`` is the same net without it."""

    title: str
    build: Callable[[bool], nn.Module]


FAMILIES = {
    "se": Family("squeeze-excitation gates", se_digits_cnn),
    "gn": Family("GroupNorm", gn_digits_cnn),
    "grn": Family("ConvNeXt-V2 block, GRN (gamma init 0, timm's)", grn_digits_cnn),
    "grn_gamma1": Family("ConvNeXt-V2 block, GRN (gamma init 1)", lambda on: grn_digits_cnn(on, gamma=1.0)),
}


def grn_effect(model: nn.Module, images) -> dict | None:
    """How much the trained GRN changes its input: mean |gamma| and ||GRN(x) - x|| / ||x|| per image."""
    from timm.layers.grn import GlobalResponseNorm

    grns = [m for m in model.modules() if isinstance(m, GlobalResponseNorm)]
    if not grns:
        return None
    seen = {}
    hook = grns[0].register_forward_hook(lambda _, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(images)
    hook.remove()
    x, y = seen["x"].flatten(1), seen["y"].flatten(1)
    return {
        "gamma_abs_mean": round(grns[0].weight.abs().mean().item(), 4),
        "relative_change_mean": round(((y - x).norm(dim=1) / x.norm(dim=1)).mean().item(), 4),
    }


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
        "ssim_min_at": int(scores.argmin()),  # an index into ``images``
        "below_0.9_at": [int(i) for i in np.flatnonzero(scores < 0.9)],
    }


HELD_OUT = 1300  # the digits after the first 1300 are held out (benchmarks/approx_quality.py's split)


def digits_study(count: int, name: str) -> dict:
    """Train ``FAMILIES[name]`` for 8 epochs (seed 0) and compare its local maps with the exact ones."""
    family = FAMILIES[name]
    started = time.perf_counter()
    images, labels = digits_data()
    torch.manual_seed(0)
    model = family.build(True)
    accuracy = train_on_digits(model, images, labels, epochs=8)
    held_out = images[HELD_OUT : HELD_OUT + count]
    without = family.build(False).eval()
    rows = []
    for stride in (1, 2):
        patch = kfx.Patch(8, stride=stride)
        row = ssim_study(model, held_out, patch)
        row["ceiling_without"] = round(kfx.compile(without, (1, 32, 32), patch).cost().theoretical_speedup, 2)
        # dataset indices, so one map can be looked at again
        row["ssim_min_at"] += HELD_OUT
        row["below_0.9_at"] = [i + HELD_OUT for i in row["below_0.9_at"]]
        rows.append(row)
        print(json.dumps({name: row}), flush=True)
    study = {"model": family.title, "accuracy": round(accuracy, 3), "rows": rows}
    effect = grn_effect(model, held_out)
    if effect:
        study["grn"] = effect
    study["seconds"] = round(time.perf_counter() - started, 1)
    return study


def stress_study(photos: list[str]) -> list[dict]:
    import torchvision

    from kfx.models import load_image

    images = [load_image(photo, 224) for photo in photos]
    rows = []
    for name in ("efficientnet_b0", "mobilenet_v3_large"):
        for statistics in ("initial", "recalibrated"):
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            inputs = images
            if statistics == "recalibrated":
                # float64: on the random normal batch kfx.compile checks the model with, these
                # statistics make logits of ~2000 whose float32 rounding differs between batch sizes
                # by more than the check allows (it then refuses the model as mixing its batch)
                recalibrate_batch_norm(model, torch.stack(images))
                model, inputs = model.double(), [image.double() for image in images]
            row = {
                "model": name,
                "bn_statistics": statistics,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                **ssim_study(model, inputs, kfx.Patch(16, stride=16)),
            }
            row["ssim_min_at"] = photos[row["ssim_min_at"]]
            row["below_0.9_at"] = [photos[i] for i in row["below_0.9_at"]]
            print(json.dumps({"stress": row}), flush=True)
            rows.append(row)
    return rows


def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor) -> None:
    """BatchNorm's running statistics set to the images' own (one pass in training mode), then eval.

    With its initial statistics (mean 0, variance 1) a random-weight EfficientNet-B0 or MobileNetV3
    shrinks its activations layer by layer to logits of about 1e-14: the softmax is uniform to the
    last float32 digit, every map is flat, and SSIM is 1 whatever the engine computes. With the
    statistics of the inputs, the logits are O(1) again and the maps have structure to compare.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the pass
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def digits_markdown(digits: dict) -> list[str]:
    lines = [
        "",
        "Digits CNNs trained here (8 epochs on the first 1300 digits), maps on held-out digits at patch 8; "
        "'without' is the same model with its global context replaced by identities:",
        "",
        "| model | held-out accuracy | patch / stride | maps | exact map range | SSIM mean | SSIM min "
        "| share >= 0.9 | ceiling exact | local | without |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for study in digits.values():
        for r in study["rows"]:
            lines.append(
                f"| {study['model']} | {study['accuracy']:.3f} | {r['patch']} / {r['stride']} | {r['maps']} "
                f"| {r['exact_map_range_mean']:.3g} | {r['ssim_mean']:.3f} | {r['ssim_min']:.3f} "
                f"| {r['share_at_least_0.9']:.2f} | {r['ceiling_exact']:.2f} | {r['ceiling_local']:.2f} "
                f"| {r['ceiling_without']:.2f} |"
            )
    lines.append("")
    for name, study in digits.items():
        notes = [
            f"stride {r['stride']}: lowest SSIM on digit {r['ssim_min_at']}, below 0.9 on "
            + (", ".join(map(str, r["below_0.9_at"])) or "none")
            for r in study["rows"]
        ]
        if "grn" in study:
            notes.append(
                f"trained GRN: mean |gamma| {study['grn']['gamma_abs_mean']}, "
                f"||GRN(x) - x|| / ||x|| {study['grn']['relative_change_mean']} on the held-out digits"
            )
        lines.append(f"- `{name}` ({study['seconds']:.0f} s): " + "; ".join(notes) + ".")
    return lines


def markdown(result: dict) -> str:
    info, digits = result["machine"], result["digits"]
    lines = [
        "# global_context='local': map SSIM against the exact map",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, commit {info['commit']}. "
        f"Command: `{info['command']}`. Load average (1/5/15 min) at the start "
        f"{' / '.join(f'{v:.2f}' for v in info['load_start'])}, at the end "
        f"{' / '.join(f'{v:.2f}' for v in info['load_end'])} (the CPU may be shared; SSIM and ceilings do not "
        "depend on it).",
    ]
    if digits:
        lines += digits_markdown(digits)
    if result["stress"]:
        lines += [
            "",
            "Stress cases (random weights, sample photos at 224, patch 16, stride 16). BN statistics 'initial' "
            "are torchvision's (mean 0, variance 1): the logits shrink to about 1e-14, every map is flat and "
            "SSIM 1 says nothing; 'recalibrated' sets them from the photos themselves first:",
            "",
            "| model | BN statistics (dtype) | maps | exact map range | SSIM mean | SSIM min | share >= 0.9 | ceiling exact | local |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["stress"]:
            lines.append(
                f"| {r['model']} | {r['bn_statistics']} ({r['dtype']}) | {r['maps']} | {r['exact_map_range_mean']:.3g} "
                f"| {r['ssim_mean']:.3f} | {r['ssim_min']:.3f} "
                f"| {r['share_at_least_0.9']:.2f} | {r['ceiling_exact']:.2f} | {r['ceiling_local']:.2f} |"
            )
        lines.append("")
        for r in result["stress"]:
            lines.append(
                f"- {r['model']}, {r['bn_statistics']}: lowest SSIM on {r['ssim_min_at']}, below 0.9 on "
                + (", ".join(r["below_0.9_at"]) or "none")
                + "."
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=60, help="held-out digits to map")
    parser.add_argument("--photos", nargs="+", default=["chelsea", "coffee", "astronaut", "rocket"])
    parser.add_argument(
        "--families",
        nargs="*",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="digits CNNs to train and map",
    )
    parser.add_argument(
        "--no-stress", action="store_true", help="skip the random-weight torchvision SE models"
    )
    parser.add_argument("--tag", default="global_context_quality")
    args = parser.parse_args(argv)
    info = {**machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    info["load_start"] = [round(v, 2) for v in os.getloadavg()]
    result = {"machine": info, "digits": {name: digits_study(args.digits, name) for name in args.families}}
    result["stress"] = [] if args.no_stress else stress_study(args.photos)
    info["load_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
