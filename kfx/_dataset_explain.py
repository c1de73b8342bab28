"""What one dataset run explains, and how: :class:`Setup` (picklable) and :class:`Explainer`.

Shared by the local run (kfx/dataset.py) and each Ray actor (kfx/_dataset_ray.py), so neither of
those imports the other.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch

from kfx import _dataset_io as io
from kfx.errors import KfxError
from kfx.patch import Patch
from kfx.results import Heatmap


@dataclass(frozen=True)
class Setup:
    """Everything an explainer needs, picklable (Ray ships it to each actor)."""

    loaded: object  # kfx.models.LoadedModel
    patch: Patch
    size: int
    tau: float
    batch_size: int | None
    device: str
    default_target: str | None
    config: dict
    fingerprint: str
    drill_down: object = None  # a kfx.DrillDown: every map approximate, from fewer queries

    @property
    def run_options(self) -> dict:
        """Keyword arguments of each engine run, as ``kfx explain`` passes them."""
        return {} if self.drill_down is None else {"drill_down": self.drill_down}

    def requested(self, item: io.Item) -> str | None:
        return item.target if item.target is not None else self.default_target


class Explainer:
    """Explains inputs one at a time with one engine, compiled here (the local run; each Ray actor)."""

    def __init__(self, setup: Setup):
        from kfx.cli.checks import _device
        from kfx.engine import compile

        self.setup = setup
        choice = setup.device
        self.device = _device(choice) if choice in ("auto", "cpu", "cuda") else torch.device(choice)
        self.model = setup.loaded.model.to(self.device)
        shape = (3, setup.size, setup.size)
        self.engine = compile(self.model, shape, setup.patch, batch_size=setup.batch_size, tau=setup.tau)

    def explain(self, item: io.Item, content: str | None = None) -> dict:
        """The row for ``item``: its map, or status "error" with what went wrong (never raises,
        except KeyboardInterrupt). ``content``: the file's hash when the caller already has it."""
        from kfx.cli.explain import run_occlusion
        from kfx.cli.images import _model_input, read_image

        started = time.perf_counter()
        requested = self.setup.requested(item)
        try:
            content = content or io.content_hash(item.path)
            pixels = read_image(item.path)
            image = _model_input(self.setup.loaded, pixels, item.path, self.setup.size, self.device)
            target = _class_index(self.setup.loaded, requested)
            step = run_occlusion(
                self.engine,
                image,
                target,
                batch_size=None,
                run_options=self.setup.run_options,
                desc=item.path,
                show_bar=False,
            )
        except Exception as exc:  # a bad input becomes an error row; the run goes on
            return self._row(item, content, requested, started, error=_message(exc))
        return self._row(item, content, requested, started, result=step.heatmap)

    def _row(self, item, content, requested, started, *, result: Heatmap | None = None, error=None) -> dict:
        setup, config = self.setup, self.setup.config
        values = None if result is None else result.values.detach().cpu().float().numpy()
        measured = None if result is None or result.measured is None else result.measured.cpu().numpy()
        return {
            "path": item.path,
            "content_hash": content,
            "fingerprint": setup.fingerprint,
            "requested_target": requested,
            "target": None if result is None else result.target,
            "label": None if result is None else setup.loaded.label(result.target),
            "base_probability": None if result is None else float(result.base),
            "map": None if values is None else values.ravel().tolist(),
            "map_shape": None if values is None else list(values.shape),
            "image_size": [setup.size, setup.size],
            "patch": list(setup.patch.size),
            "stride": list(setup.patch.stride),
            "fill": config["fill"],
            "tau": setup.tau,
            "drill_down": io.drill_down_text(config.get("drill_down")),
            "approximate": None if result is None else bool(result.approximate),
            "measured": None if measured is None else measured.ravel().tolist(),
            "model": config["model"],
            "weights_hash": config["weights_sha256"],
            "kfx_version": config["kfx_version"],
            "seconds": time.perf_counter() - started,
            "status": "ok" if result is not None else "error",
            "error": error,
            "finished_at": datetime.datetime.now(datetime.timezone.utc),
        }


def _class_index(loaded, requested: str | None) -> int | None:
    if requested is None:
        return None
    return loaded.class_index(requested)


def _message(exc: BaseException) -> str:
    """One line: kfx's own messages as they are, anything else with its type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, KfxError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")
