"""The run-time loop every occlusion engine shares: check input, evaluate positions in batches,
accumulate the map.

:class:`OcclusionRunner` holds the one perturb-run-accumulate loop (:meth:`~OcclusionRunner.stream`,
``_fill``); a subclass says only how the unoccluded image is prepared (``_prepare``, returning an
object with the model's ``output``) and how a batch of positions is evaluated (``_batches``). The
incremental :class:`kfx.Engine` and the full-inference :class:`kfx.NaiveEngine` are the two, so the
naive reference and the exact engine fill maps, stream, select cells and drill down by the same code
(as Captum's Occlusion reuses FeatureAblation's loop).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kfx.common import follow_progress, progress_bar
from kfx.errors import InputError, ModelError
from kfx.patch import Patch, check_positions, grid_positions
from kfx.results import Heatmap, Progress
from kfx.validation import check_batch_size, check_class_index

__all__ = ["OcclusionRunner"]


def _layout(rank: int) -> str:
    """How an input of ``rank`` dims (channels included) is laid out, for messages."""
    return {2: "[C, L]", 3: "[C, H, W]", 4: "[C, D, H, W]"}.get(rank, f"of {rank} dims")


class OcclusionRunner:
    """Occlusion maps for one (image shape, patch); subclasses evaluate the positions."""

    image_shape: tuple[int, int, int]
    patch: Patch
    dtype: torch.dtype
    device: torch.device
    batch_size: int
    tau: float = 1.0
    global_context: str = "exact"
    description = "occlusion"  # the progress bar's label

    def _prepare(self, image: torch.Tensor):
        """Run the unoccluded image [1, C, H, W]; an object whose ``.output`` is the model's output."""
        raise NotImplementedError

    def _batches(self, prepared, positions: torch.Tensor, batch_size: int | None) -> Iterator[torch.Tensor]:
        """The model's outputs for ``positions`` [N, 2], one tensor per batch, in order."""
        raise NotImplementedError

    def _step(self, batch_size: int | None) -> int:
        return self.batch_size if batch_size is None else check_batch_size(batch_size)

    def _check_image(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            layout = _layout(len(self.image_shape))
            raise InputError(f"image must be a torch.Tensor {layout}, got {type(image).__name__}")
        if image.dim() == len(self.image_shape) + 1 and image.shape[0] == 1:
            image = image[0]
        if tuple(image.shape) != tuple(self.image_shape):
            raise InputError(
                f"image has shape {list(image.shape)} but the engine was compiled for {list(self.image_shape)} "
                f"({_layout(len(self.image_shape))}, or with a batch of 1 in front); compile another engine "
                "for this shape"
            )
        if image.dtype != self.dtype:
            raise InputError(
                f"image dtype is {image.dtype} but the model computes in {self.dtype}; "
                f"convert it with image.to({self.dtype})"
            )
        if image.is_meta:
            raise InputError("the image is on the meta device (a shape without values); pass a real tensor")
        if not torch.isfinite(image).all():
            raise InputError("image holds NaN or infinite values; occlusion maps need finite pixels")
        return image.to(self.device).unsqueeze(0)

    def outputs(self, image: torch.Tensor, positions, *, batch_size: int | None = None) -> torch.Tensor:
        """The model's raw outputs [N, ...] for ``image`` occluded at each of ``positions``.

        Equal to ``model(kfx.occlude(image, positions, patch))``. ``positions`` is an integer tensor
        [N, axes] of top-left corners ((y, x) for images, (z, y, x) for volumes); any corner where the patch fits is allowed (interactive
        mode), not only the heat-map grid.

        >>> engine.outputs(image, torch.tensor([[0, 0], [8, 12]])).shape  # doctest: +SKIP
        torch.Size([2, 1000])
        """
        image = self._check_image(image)
        positions = check_positions(positions, self.image_shape[1:], self.patch)
        base = self._prepare(image)
        batches = list(self._batches(base, positions, batch_size))
        if not batches:  # no positions: an empty batch of the model's output shape
            return base.output.new_empty((0, *base.output.shape[1:]))
        return torch.cat(batches)

    def cells_overlapping(self, pixels: torch.Tensor) -> torch.Tensor:
        """Grid cells (the heat map's shape) whose patch window touches a True pixel of ``pixels``
        (a mask of the image's spatial shape, e.g. [H, W]).

        Turns a user's selection (a rectangle or brush strokes, as a pixel mask) into the ``cells``
        argument of :meth:`__call__` / :meth:`stream`.
        """
        size = tuple(self.image_shape[1:])
        if not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != size:
            raise InputError(f"the selection must be a mask tensor of the image's spatial shape {list(size)}")
        mask = pixels.detach().to("cpu", torch.float32)[None, None]
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(size) - 1]
        return pool(mask, self.patch.size, self.patch.stride)[0, 0] > 0

    def _check_cells(self, cells) -> torch.Tensor:
        grid = self.patch.grid_shape(tuple(self.image_shape[1:]))
        if cells is None:
            return torch.ones(grid, dtype=torch.bool)
        if not isinstance(cells, torch.Tensor) or cells.dtype != torch.bool or tuple(cells.shape) != grid:
            raise InputError(
                f"cells must be a bool tensor of the heat-map shape {list(grid)} (True = evaluate); "
                "engine.cells_overlapping(pixel_mask) builds one from a pixel selection"
            )
        return cells.cpu()

    def _check_target(self, base_output: torch.Tensor, target) -> tuple[int, torch.Tensor]:
        if base_output.dim() != 2 or base_output.shape[0] != 1:
            raise ModelError(
                f"heat maps need a model that returns [1, num_classes] scores; this one returns shape "
                f"{list(getattr(base_output, 'shape', []))}. Use engine.outputs(image, positions) instead"
            )
        num_classes = base_output.shape[1]
        base_probs = torch.softmax(base_output, dim=1)[0]
        if not torch.isfinite(base_probs).all():
            raise ModelError(
                "the model's scores for the unoccluded image hold NaN or infinite values, so no map can be "
                "read from them; check the model's weights and the image's scaling"
            )
        target = int(base_probs.argmax()) if target is None else check_class_index(target, num_classes)
        return target, base_probs

    def stream(
        self,
        image: torch.Tensor,
        target: int | None = None,
        *,
        cells: torch.Tensor | None = None,
        batch_size: int | None = None,
        drill_down=None,
    ) -> Iterator[Progress]:
        """The heat map filling in: one :class:`Progress` after each batch of positions.

        Unevaluated cells are NaN. ``cells`` (bool [H_M, W_M]) restricts the run to a selection
        (interactive mode). ``drill_down`` (a :class:`kfx.DrillDown`) streams the two-stage
        approximate map instead (``drill_down.stream(engine, ...)``). To cancel, stop iterating
        (``break``, or ``close()`` the generator): no further batch runs. Input is checked before
        the first batch.

        >>> for step in engine.stream(image):  # doctest: +SKIP
        ...     print(f"{step.done}/{step.total}")
        """
        if drill_down is not None:
            if cells is not None:
                raise InputError(
                    "drill_down chooses its own cells; pass either cells (interactive mode) or drill_down"
                )
            if not callable(getattr(drill_down, "stream", None)):
                raise InputError(f"drill_down must be a kfx.DrillDown, got {type(drill_down).__name__}")
            return drill_down.stream(self, image, target, batch_size)
        started = time.perf_counter()
        image = self._check_image(image)
        selected = self._check_cells(cells)
        if batch_size is not None:
            check_batch_size(batch_size)
        base = self._prepare(image)
        target, base_probs = self._check_target(base.output, target)
        return self._fill(base, target, float(base_probs[target]), selected, batch_size, started)

    def _fill(self, prepared, target, base, selected, batch_size, started) -> Iterator[Progress]:
        """The one perturb-run-accumulate loop: the selected cells' positions go through
        ``self._batches`` (incremental or full inference), softmax(target) lands in the map."""
        hw = tuple(self.image_shape[1:])
        values = torch.full(selected.shape, float("nan"), dtype=self.dtype)
        flat = values.view(-1)
        indices = selected.view(-1).nonzero()[:, 0]
        positions = grid_positions(hw, self.patch)[indices]
        done = 0
        for out in self._batches(prepared, positions, batch_size):
            flat[indices[done : done + out.shape[0]]] = torch.softmax(out, dim=1)[:, target].cpu()
            done += out.shape[0]
            yield Progress(
                self._heatmap(values.clone(), target, base), done, len(indices), time.perf_counter() - started
            )
        if not len(indices):
            yield Progress(self._heatmap(values, target, base), 0, 0, time.perf_counter() - started)

    def _heatmap(self, values: torch.Tensor, target: int, base: float) -> Heatmap:
        """A map of this runner's: its patch, image size and approximation modes recorded with it."""
        hw = tuple(self.image_shape[1:])
        return Heatmap(values, target, base, self.patch, hw, tau=self.tau, global_context=self.global_context)

    def __call__(
        self,
        image: torch.Tensor,
        target: int | None = None,
        *,
        cells: torch.Tensor | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        drill_down=None,
    ) -> Heatmap:
        """The occlusion heat map of ``image`` for class ``target`` (default: the predicted class).

        ``cells`` (bool [H_M, W_M]) evaluates only a selection (the rest is NaN);
        ``show_progress`` draws a tqdm bar with positions per second. ``drill_down`` (a
        :class:`kfx.DrillDown`) computes the map approximately in two stages (docs/design.md §4.2): a coarse
        stage 1, then the target stride only in the cells with the largest drops; the rest is
        interpolated from stage 1 and ``heatmap.measured`` marks which cells were queried.
        """
        steps = self.stream(image, target, cells=cells, batch_size=batch_size, drill_down=drill_down)
        description = f"kfx {self.description}" if drill_down is None else "kfx drill-down"
        return follow_progress(steps, progress_bar(description, show=show_progress)).heatmap
