"""Per-image files of ``kfx.explain_dataset(png=True, npy=True)`` (``kfx batch --png --npy``).

Beside the Parquet parts, each ``ok`` row can get the picture ``kfx explain`` draws (the map over
the image) and the raw map as ``.npy``, under ``OUT/config-<fingerprint>/images/``. A file is named
after the input's file name and a hash of its full path and requested target, so two inputs called
``cat.jpg`` in different folders (or one image explained for two classes) never share a file. The
driver writes them (the local run, or the Ray driver as rows come back), each atomically; an input
whose row exists but whose files are missing (a run killed between the two, or ``--png`` added on
a rerun) gets them from its stored row, without computing the map again.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kfx.patch import Patch
from kfx.results import Heatmap

IMAGES_FOLDER = "images"
SUFFIXES = {"png": ".png", "npy": ".npy"}


def file_stem(path: str, requested_target: str | None) -> str:
    """``<file name without extension>-<8 hex digits of sha256(path, requested target)>``."""
    from kfx._dataset_io import _target_text
    from kfx.cli.images import _stem

    # pandas reads a missing target back as NaN: the same input as None
    key = f"{path}\0{_target_text(requested_target) or ''}".encode()
    return f"{_stem(path)}-{hashlib.sha256(key).hexdigest()[:8]}"


def row_heatmap(row) -> Heatmap:
    """The :class:`kfx.Heatmap` of an ok row (a dict from a part, or a pandas Series of
    ``read_results``), with ``measured`` set for a drill-down map as the engine sets it."""
    fill = [float(v) for v in row["fill"]]
    patch = Patch(
        tuple(int(v) for v in row["patch"]),
        stride=tuple(int(v) for v in row["stride"]),
        fill=fill[0] if len(fill) == 1 else tuple(fill),
    )
    size = tuple(int(v) for v in row["image_size"])
    shape = tuple(int(v) for v in row["map_shape"])
    # copies (torch.tensor): the arrays pandas reads from Arrow are read-only
    values = torch.tensor(np.asarray(row["map"], dtype=np.float32)).reshape(shape)
    measured = _get(row, "measured")
    if measured is not None:
        measured = torch.tensor(np.asarray(measured, dtype=bool)).reshape(shape)
    target, base = int(row["target"]), float(row["base_probability"])
    return Heatmap(values, target, base, patch, size, measured=measured, tau=float(row["tau"]))


def _get(row, name: str):
    """A column that parts written before it existed lack (a pandas NA or a missing key: None)."""
    value = row.get(name) if hasattr(row, "get") else row[name]
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


@dataclass(frozen=True)
class ImageFiles:
    """Where the per-image files of one configuration go, and how to write them."""

    folder: Path  # OUT/config-<fp>/images
    kinds: tuple[str, ...]  # "png", "npy"
    loaded: object  # kfx.models.LoadedModel: the picture reads and resizes the image as the run did
    size: int

    def paths(self, path: str, requested_target: str | None) -> list[Path]:
        stem = file_stem(path, requested_target)
        return [self.folder / f"{stem}{SUFFIXES[kind]}" for kind in self.kinds]

    def missing(self, path: str, requested_target: str | None) -> bool:
        return not all(p.is_file() for p in self.paths(path, requested_target))

    def remove(self, path: str, requested_target: str | None) -> None:
        from kfx.cli.common import OutputError

        for file in self.paths(path, requested_target):
            try:
                file.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot remove {file}: {exc.strerror or exc}") from None

    def write(self, row) -> None:
        """The files of an ok row, each written beside and renamed into place."""
        from kfx import plot
        from kfx.cli.outputs import _numpy_values, _writing

        heatmap = row_heatmap(row)
        for kind, path in zip(self.kinds, self.paths(row["path"], row["requested_target"])):
            if kind == "npy":
                _writing(path, lambda p: np.save(p, _numpy_values(heatmap.values)))
            else:
                image = self._image(row["path"])
                # the picture kfx explain draws for a 2-D map: the map over the image
                _writing(path, lambda p, image=image: plot.save(heatmap, p, image, label=row["label"]))

    def _image(self, path: str) -> torch.Tensor | None:
        """The model input the map was computed on, to draw the map over (None: the file is gone)."""
        from kfx.cli.images import read_image

        try:
            return self.loaded.prepare(read_image(path), self.size)
        except Exception as exc:  # the map is still right: draw it alone and say why
            warnings.warn(f"{path}: drawing its map without the image ({exc})", stacklevel=2)
            return None
