"""Explain a real photo with a real model: EfficientNet-Lite0 (ImageNet weights) on scikit-image's cat.

    python examples/heatmap.py [PHOTO] [--stride 8] [--out heatmap.png]

PHOTO is a scikit-image sample name (chelsea, coffee, astronaut, rocket) or an image file.
"""

import argparse
import time

import kfx
from kfx.models import efficientnet_lite0, imagenet_labels, load_image

parser = argparse.ArgumentParser()
parser.add_argument("photo", nargs="?", default="chelsea")
parser.add_argument("--patch", type=int, default=16)
parser.add_argument("--stride", type=int, default=8)
parser.add_argument("--out", default="heatmap.png")
args = parser.parse_args()

model = efficientnet_lite0()
image = load_image(args.photo)  # [3, 224, 224] in [-1, 1]
engine = kfx.compile(model, image.shape, kfx.Patch(args.patch, stride=args.stride, fill=0.0))
start = time.perf_counter()
heatmap = engine(image)
elapsed = time.perf_counter() - start
label = imagenet_labels()[heatmap.target]
print(
    f"{args.photo}: {label} (p = {heatmap.base:.3f}); {heatmap.values.numel()} positions in {elapsed:.1f} s"
)
print(
    f"lowest probability {heatmap.values.min():.3f} at grid cell {divmod(int(heatmap.values.argmin()), heatmap.values.shape[1])}"
)
heatmap.save(args.out, image, label=label)
print(f"wrote {args.out}")
