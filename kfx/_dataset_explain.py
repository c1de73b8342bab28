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

        started = time.perf_counter()
        requested = self.setup.requested(item)
        try:
            content = content or io.content_hash(item.path)
            image = self._read(item)
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

    def _read(self, item: io.Item) -> torch.Tensor:
        """The model input of ``item``, read and resized as ``kfx explain`` does."""
        from kfx.cli.images import _model_input, read_image

        pixels = read_image(item.path)
        return _model_input(self.setup.loaded, pixels, item.path, self.setup.size, self.device)

    @property
    def group_size(self) -> int:
        """How many inputs :meth:`explain_many` runs together (1: one at a time)."""
        from kfx._multi_image import group_size

        return group_size(self.engine, self.setup.run_options)

    def explain_many(self, items: list[tuple[io.Item, str | None]]) -> list[dict]:
        """The rows for ``items`` ((item, content hash or None) pairs), in order, with positions
        of several images in one batch when the engine allows it (kfx/_multi_image.py). Each map
        is the one :meth:`explain` gives; a bad input is its own error row, the others go on."""
        if self.group_size < 2 or len(items) < 2:
            return [self.explain(item, content) for item, content in items]
        rows: list[dict | None] = [None] * len(items)
        ready = []
        for index, (item, content) in enumerate(items):
            prepared = self._prepare(index, item, content)
            if isinstance(prepared, dict):
                rows[index] = prepared
            else:
                ready.append(prepared)
        for prepared, row in zip(ready, self._grouped_rows(ready), strict=True):
            rows[prepared.index] = row
        return rows

    def _prepare(self, index: int, item: io.Item, content: str | None):
        """A _Prepared input (read, checked, its unoccluded run and target), or its error row."""
        started = time.perf_counter()
        requested = self.setup.requested(item)
        engine = self.engine
        try:
            content = content or io.content_hash(item.path)
            image = self._read(item)
            base = engine._prepare(engine._check_image(image))
            target, probabilities = engine._check_target(
                base.output, _class_index(self.setup.loaded, requested)
            )
        except Exception as exc:  # a bad input becomes an error row; the run goes on
            return self._row(item, content, requested, started, error=_message(exc))
        seconds = time.perf_counter() - started
        return _Prepared(index, item, content, requested, base, target, float(probabilities[target]), seconds)

    def _grouped_rows(self, ready: list[_Prepared]) -> list[dict]:
        """The rows of inputs whose unoccluded run went well, their positions batched together. If
        the batched run fails, each input runs alone, so each gets its own row or error."""
        from kfx._multi_image import grid_outputs

        if not ready:
            return []
        started = time.perf_counter()
        try:
            outputs = grid_outputs(self.engine, [prepared.base for prepared in ready])
        except Exception:
            return [self.explain(prepared.item, prepared.content) for prepared in ready]
        share = (time.perf_counter() - started) / len(ready)  # each row's part of the batched run
        return [self._grouped_row(prepared, out, share) for prepared, out in zip(ready, outputs, strict=True)]

    def _grouped_row(self, prepared: _Prepared, out: torch.Tensor, share: float) -> dict:
        """One input's row from its own outputs; its seconds: its reading and unoccluded run plus
        its share of the batched run."""
        started = time.perf_counter() - prepared.seconds - share
        item, content, requested = prepared.item, prepared.content, prepared.requested
        try:
            heatmap = self._heatmap(prepared, out)
        except Exception as exc:  # NaN in this image's map: its error row, the others go on
            return self._row(item, content, requested, started, error=_message(exc))
        return self._row(item, content, requested, started, result=heatmap)

    def _heatmap(self, prepared: _Prepared, out: torch.Tensor) -> Heatmap:
        """The map :func:`kfx.cli.explain.run_occlusion` gives from the same outputs: the engine's
        grid filled with softmax(target) (as OcclusionRunner._fill), NaN refused."""
        from kfx.cli.explain import check_no_nan

        engine = self.engine
        grid = engine.patch.grid_shape(tuple(engine.image_shape[1:]))
        values = torch.softmax(out, dim=1)[:, prepared.target].cpu().to(engine.dtype).reshape(grid)
        check_no_nan(values, prepared.item.path)
        return engine._heatmap(values, prepared.target, prepared.base_probability)

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


@dataclass(frozen=True)
class _Prepared:
    """One input of :meth:`Explainer.explain_many` ready for its positions: where its row goes,
    its unoccluded run (kfx.engine._Base), the target and its probability, seconds spent so far."""

    index: int
    item: io.Item
    content: str
    requested: str | None
    base: object
    target: int
    base_probability: float
    seconds: float


def _class_index(loaded, requested: str | None) -> int | None:
    if requested is None:
        return None
    return loaded.class_index(requested)


def _message(exc: BaseException) -> str:
    """One line: kfx's own messages as they are, anything else with its type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, KfxError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")
