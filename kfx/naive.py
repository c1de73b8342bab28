"""The naive reference: occlusion maps by full inference, one forward pass per patch position.

What every other occlusion library computes, and what kfx's exact engine must equal. It shares the
run-time loop with :class:`kfx.Engine` (:class:`kfx.runner.OcclusionRunner`), so the CLI's and the
explorer's "naive" mode, the benchmarks' baseline and the tests' brute force stream, select cells and
drill down exactly as the engine does; only the evaluation of a batch differs:
``model(kfx.occlude(image, positions, patch))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import torch
from torch import nn

from kfx.common import DEFAULT_BATCH_SIZE, model_dtype_device
from kfx.engine import check_compile_arguments
from kfx.errors import InputError
from kfx.passes.trace import require_eval_module
from kfx.patch import Patch, image_has_batch, occlude
from kfx.results import Heatmap
from kfx.runner import OcclusionRunner
from kfx.validation import check_batch_size

__all__ = ["NaiveEngine", "naive_heatmap"]


class _Unoccluded:
    """The unoccluded image; its output is computed when first asked for, so ``outputs()`` runs
    exactly one forward pass per position (a fair baseline), while maps get the base probability."""

    def __init__(self, model: nn.Module, image: torch.Tensor):
        self.model, self.image = model, image  # image: [1, C, H, W] on the model's device

    @cached_property
    def output(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.image.clone())


class NaiveEngine(OcclusionRunner):
    """Occlusion maps of ``model`` by batched full inference: the same interface as :class:`kfx.Engine`.

    ``NaiveEngine(model, image_shape, patch)`` needs no compilation and works with any model that
    maps [N, C, H, W] to [N, num_classes]; ``outputs``, ``stream``, ``__call__`` (``cells``,
    ``drill_down``, ``show_progress``) and ``cells_overlapping`` behave as the engine's.

    >>> naive = kfx.NaiveEngine(model.eval(), (3, 224, 224), kfx.Patch(16, stride=8))  # doctest: +SKIP
    >>> exact = kfx.compile(model, (3, 224, 224), naive.patch)  # doctest: +SKIP
    >>> torch.allclose(naive(image).values, exact(image).values)  # doctest: +SKIP
    True
    """

    description = "full inference"

    def __init__(
        self,
        model: nn.Module,
        image_shape: tuple[int, int, int],
        patch: Patch | int,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dtype: torch.dtype | None = None,
    ):
        require_eval_module(model, "kfx.NaiveEngine")
        shape, patch = check_compile_arguments(model, image_shape, patch, 1.0, "kfx.NaiveEngine")
        patch.check_fits(shape[1:])
        model_dtype, self.device = model_dtype_device(model, (torch.get_default_dtype(), torch.device("cpu")))
        self.model = model
        self.image_shape = shape
        self.patch = patch
        self.dtype = dtype or model_dtype
        self.batch_size = check_batch_size(batch_size)

    def _prepare(self, image: torch.Tensor) -> _Unoccluded:
        return _Unoccluded(self.model, image)

    def _batches(
        self, prepared: _Unoccluded, positions: torch.Tensor, batch_size: int | None
    ) -> Iterator[torch.Tensor]:
        step = self._step(batch_size)
        for start in range(0, positions.shape[0], step):
            # no_grad per batch, never held across the yield: grad mode is per thread, so a stream left
            # suspended (or resumed on another thread by a server) must not leave it switched off.
            with torch.no_grad():
                out = self.model(occlude(prepared.image, positions[start : start + step], self.patch))
            yield out


def naive_heatmap(
    model: nn.Module, image: torch.Tensor, patch: Patch | int, target: int | None = None, **options
) -> Heatmap:
    """The occlusion map of ``image`` by full inference at every position (``NaiveEngine``).

    >>> kfx.naive_heatmap(model.eval(), image, kfx.Patch(16, stride=8)).values.shape  # doctest: +SKIP
    torch.Size([27, 27])
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a torch.Tensor [C, H, W], got {type(image).__name__}")
    shape = tuple(image.shape[1:] if image_has_batch(image, patch) else image.shape)
    batch_options = {k: options.pop(k) for k in ("batch_size", "dtype") if k in options}
    return NaiveEngine(model, shape, patch, **batch_options)(image, target, **options)
