"""kfx: exact and fast occlusion heat maps for PyTorch CNNs (KRYPTON as a torch.fx compiler pass).

>>> import kfx  # doctest: +SKIP
>>> engine = kfx.compile(model.eval(), (3, 224, 224), kfx.Patch(16, stride=4))  # doctest: +SKIP
>>> heatmap = engine(image)  # heatmap.values[i, j]: P(target) with the patch at (4i, 4j)  # doctest: +SKIP
"""

from kfx.approx import DrillDown, heatmap_ssim
from kfx.cost import CostReport, LayerCost
from kfx.engine import Engine, compile, paper_cost
from kfx.errors import InputError, KfxError, ModelError, PatchError, TraceError
from kfx.loading import load
from kfx.naive import NaiveEngine, naive_heatmap
from kfx.neuromask import neuromask
from kfx.patch import Patch, grid_positions, occlude
from kfx.results import DenseNode, Heatmap, Progress
from kfx.tuning import Tuning, tune

__all__ = [
    "compile",
    "load",
    "paper_cost",
    "tune",
    "DrillDown",
    "Tuning",
    "heatmap_ssim",
    "Engine",
    "NaiveEngine",
    "naive_heatmap",
    "Heatmap",
    "Progress",
    "Patch",
    "occlude",
    "neuromask",
    "grid_positions",
    "CostReport",
    "LayerCost",
    "DenseNode",
    "KfxError",
    "InputError",
    "ModelError",
    "PatchError",
    "TraceError",
    "explain_dataset",
    "read_results",
]


def __getattr__(name: str):
    # kfx.dataset imports the command line's image reading and pyarrow: loaded on first use only.
    if name in ("explain_dataset", "read_results"):
        from kfx import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'kfx' has no attribute {name!r}")


__version__ = "0.1.0"
