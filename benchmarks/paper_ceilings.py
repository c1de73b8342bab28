"""The static cost model against the paper's theoretical speedups ([TR] Fig. 3 and 7a).

No inference and no timing: for each model and patch size (patch at the centre) it prints the
paper's value read off its plots (docs/design.md §8), kfx's exact ceiling (``engine.cost()``,
concatenations merge the union of their inputs' boxes, [TR] Eq. 20) and ``kfx.paper_cost`` (a
concatenation takes its last input's box, the accounting that reproduces the paper's Inception3
numbers; not exact). Writes benchmarks/results/paper_ceilings.md.

    python benchmarks/paper_ceilings.py     # about a minute on a 2-core CPU
"""

from __future__ import annotations

from pathlib import Path

import torchvision

import kfx

RESULTS = Path(__file__).parent / "results"

# (model, image size, patch, tau) -> the paper's theoretical speedup, read off [TR] Fig. 3 / Fig. 7a.
PAPER = {
    ("vgg16", 224, 16, 1.0): 6.5,
    ("vgg16", 224, 4, 1.0): 8.6,
    ("vgg16", 224, 32, 1.0): 5.05,
    ("vgg19", 224, 16, 1.0): 5.0,
    ("alexnet", 224, 16, 1.0): 2.35,
    ("squeezenet1_0", 224, 16, 1.0): 4.85,
    ("resnet18", 224, 16, 1.0): 2.2,
    ("densenet121", 224, 4, 1.0): 2.05,
    ("densenet121", 224, 32, 1.0): 1.9,
    ("inception_v3", 299, 4, 1.0): 2.3,
    ("inception_v3", 299, 16, 1.0): 2.27,
    ("inception_v3", 299, 20, 1.0): 2.2,
    ("inception_v3", 299, 32, 1.0): 2.1,
    ("vgg16", 224, 16, 0.4): 11.4,
    ("resnet18", 224, 16, 0.4): 7.7,
    ("inception_v3", 299, 16, 0.8): 3.05,
    ("inception_v3", 299, 16, 0.5): 5.8,
    ("inception_v3", 299, 16, 0.4): 8.5,
}


def build(name: str):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def main() -> None:
    rows = [
        "| model | image | patch | tau | paper | kfx exact (`engine.cost()`) | paper's accounting (`kfx.paper_cost`) |",
        "|---|---|---|---|---|---|---|",
    ]
    models = {}
    for (name, size, patch, tau), published in PAPER.items():
        model = models.setdefault(name, build(name))
        exact = kfx.compile(model, (3, size, size), patch, tau=tau).cost().theoretical_speedup
        paper = kfx.paper_cost(model, (3, size, size), patch, tau=tau).theoretical_speedup
        rows.append(f"| {name} | {size} | {patch} | {tau:g} | {published:g} | {exact:.2f} | {paper:.2f} |")
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "paper_ceilings.md").write_text("\n".join(rows) + "\n")
    print(f"wrote {RESULTS / 'paper_ceilings.md'}")


if __name__ == "__main__":
    main()
