"""A Captum drop-in: ``kfx.captum.Occlusion`` returns what ``captum.attr.Occlusion`` returns, faster.

>>> import kfx.captum  # doctest: +SKIP
>>> occlusion = kfx.captum.Occlusion(model.eval())  # doctest: +SKIP
>>> attributions = occlusion.attribute(images, (3, 16, 16), strides=(3, 4, 4), target=281)  # doctest: +SKIP
>>> occlusion.last_fallback_reason is None  # the kfx fast path was taken  # doctest: +SKIP
True

Semantics (Captum 0.9, ``captum/attr/_core/occlusion.py`` and ``feature_ablation.py``; docs/design.md §7.1):
windows start at 0 and step by the stride until the axis is covered, ``ceil((D - w) / s) + 1`` per
axis (:func:`kfx.geometry.captum_heatmap_size`), the last one clipped at the border. The occluded
input is ``input * (1 - mask) + baseline * mask``, and every element gets the mean, over the windows
covering it, of (original output - occluded output) for ``target`` (raw outputs, no softmax). Like
Captum 0.9, the result has the inputs' shape but Captum's dtype: the totals are summed in the output's
dtype, then divided as ``total.float() / counts`` with counts in torch's default dtype, so float64
models give float32 attributions.

Fast path: for a single image batch [N, C, H, W] whose window spans all C channels, each distinct
clipped window shape (at most four: full, clipped at the bottom, at the right, at both) is a
:class:`kfx.Patch`; one engine per shape and fill evaluates every window of that shape
incrementally (:meth:`kfx.Engine.outputs`). Engines are cached on the object and reused by later
calls; the cache is dropped when the model's parameters or buffers change in place.

Fallback rules: these calls run ``captum.attr.Occlusion`` itself (one :class:`NotAcceleratedWarning`
per reason and object; ``last_fallback_reason`` says why), or, without captum installed, raise the
:class:`kfx.KfxError` subclass that fits the reason:

- ``inputs`` is not one 4-D tensor [N, C, H, W] (or a 1-tuple holding one), or holds non-finite
  or non-floating-point values, or is empty                                      (InputError)
- ``forward_func`` is not an ``nn.Module`` with every submodule in eval mode     (ModelError)
- ``additional_forward_args`` is given                                           (InputError)
- the window does not span all channels (Captum then slides it across channels)  (PatchError)
- the inputs' dtype or device differs from the model's parameters               (InputError)
- ``target`` does not pick one value per example from the model's output         (InputError)
- ``kfx.compile`` cannot handle the model (TraceError, ModelError, PatchError)  (that error)

For an image batch, bad window geometry raises :class:`kfx.PatchError` whichever path the call would
take (Captum raises AssertionError for the same calls): a window or stride below 1, a window larger
than the input, or a stride larger than the window along an axis the window does not cover whole.
A ``perturbations_per_eval`` below 1 raises :class:`kfx.InputError`.

Batch size: Captum's ``perturbations_per_eval`` (default 1) is the number of occluded copies per
forward call, N of them each. kfx evaluates positions of one image per call, and its speed comes from
batching them, so it uses ``max(perturbations_per_eval * N, DEFAULT_BATCH_SIZE)`` positions per
batch (``kfx.common.DEFAULT_BATCH_SIZE``, 64, is ``kfx.compile``'s default): Captum's default of 1
would run one position per call, and a larger value still gets at least Captum's number of samples
per call. An incremental position costs far less memory than a full forward pass; to cap memory
anyway, pass ``Occlusion(model, batch_size=...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kfx.common import DEFAULT_BATCH_SIZE, model_dtype_device, progress_bar
from kfx.dropin import NotAccelerated, NotAcceleratedWarning, fall_back, weights_version
from kfx.engine import Engine, compile
from kfx.errors import InputError, KfxError, ModelError, PatchError
from kfx.fills import Baseline, PositionalFill
from kfx.geometry import captum_heatmap_size
from kfx.passes.trace import require_eval_module
from kfx.patch import Patch

__all__ = ["Occlusion", "NotAcceleratedWarning"]

Fill = float | tuple[float, ...] | Baseline


# -- geometry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Windows:
    """Captum's windows over one image: per axis, the (start, clipped size) of every window."""

    size: tuple[int, int]
    stride: tuple[int, int]
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    def by_shape(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """Grid cells (i, j) grouped by their clipped (h, w): one engine serves each group."""
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, (_, height) in enumerate(self.rows):
            for j, (_, width) in enumerate(self.cols):
                groups.setdefault((height, width), []).append((i, j))
        return groups


def _axis_windows(length: int, window: int, stride: int) -> tuple[tuple[int, int], ...]:
    """(start, clipped size) of Captum's windows along one axis: starts 0, s, 2s, ... until covered.

    >>> _axis_windows(20, 6, 4)
    ((0, 6), (4, 6), (8, 6), (12, 6), (16, 4))
    """
    starts = (k * stride for k in range(captum_heatmap_size(length, window, stride)))
    return tuple((start, min(window, length - start)) for start in starts)


def _captum_windows(image_hw: tuple[int, int], size: tuple[int, int], stride: tuple[int, int]) -> _Windows:
    """All of Captum's windows over an image of size ``image_hw``."""
    rows, cols = (_axis_windows(image_hw[a], size[a], stride[a]) for a in (0, 1))
    return _Windows(size, stride, rows, cols)


def _per_axis(value, name: str, ndim: int) -> tuple[int, ...]:
    """An int or a tuple of ``ndim`` ints, as a tuple; PatchError otherwise."""
    values = (value,) * ndim if isinstance(value, int) else value
    if (
        not isinstance(values, tuple)
        or len(values) != ndim
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise PatchError(f"{name} must be an int or a tuple of {ndim} ints (C, h, w), got {value!r}")
    return values


def _window_and_strides(sliding_window_shapes, strides, input_shape: tuple[int, ...]):
    """Captum's window and strides for one [N, C, H, W] input, checked, as two (C, h, w) tuples.

    Accepts Captum's spellings: a window (C, h, w) or ((C, h, w),); strides None (1 everywhere),
    an int, (C, h, w), (int,) or ((C, h, w),). Raises PatchError where Captum would assert.
    """
    shape = tuple(input_shape[1:])
    window = sliding_window_shapes
    if isinstance(window, tuple) and len(window) == 1 and isinstance(window[0], tuple):
        window = window[0]
    if not isinstance(window, tuple):
        raise PatchError(f"sliding_window_shapes must be a tuple (C, h, w), got {sliding_window_shapes!r}")
    window = _per_axis(window, "sliding_window_shapes", len(shape))
    if strides is None:
        strides = 1
    if isinstance(strides, tuple) and len(strides) == 1:
        strides = strides[0]  # Captum's one-entry-per-input form
    stride = _per_axis(strides, "strides", len(shape))
    if min(window) < 1 or min(stride) < 1:
        raise PatchError(f"window {window} and strides {stride} must be at least 1 along every axis")
    if any(w > d for w, d in zip(window, shape)):
        raise PatchError(f"sliding window {window} is larger than the input {shape}; use a smaller window")
    if any(s > w and w < d for s, w, d in zip(stride, window, shape)):
        raise PatchError(
            f"strides {stride} exceed the window {window} along an axis the window does not cover whole "
            f"(input {shape}); some elements would never be occluded. Use strides <= the window"
        )
    return window, stride


def _spread_over_pixels(drops: torch.Tensor, windows: _Windows, image_hw: tuple[int, int]) -> torch.Tensor:
    """Sum, at every pixel, the per-window values [rows, cols] of the windows covering it.

    A transposed convolution with a ones kernel paints each window's value over its full size;
    cropping to the image is exactly Captum's clipping of the border windows.
    """
    ones = torch.ones(1, 1, *windows.size, dtype=drops.dtype)
    painted = F.conv_transpose2d(drops[None, None], ones, stride=windows.stride)
    return painted[0, 0, : image_hw[0], : image_hw[1]]


# -- baselines and targets -----------------------------------------------------------------------


def _fills_per_example(baselines, inputs: torch.Tensor) -> list[Fill]:
    """Each example's patch fill: Captum's baseline, broadcast to the inputs' shape.

    Captum paints ``baseline * mask`` with the baseline broadcast to the inputs. One constant over
    space is a float (channels agree) or one value per channel, so such examples share engines; one
    that varies over space (a blurred image, a mean image) is a :class:`kfx.fills.Baseline`, run
    through one engine for every example (:class:`_ExampleBaseline`).
    """
    if isinstance(baselines, tuple):
        if len(baselines) != 1:
            raise NotAccelerated(f"{len(baselines)} baselines were given for one input")
        baselines = baselines[0]
    n = inputs.shape[0]
    if baselines is None:
        return [0.0] * n
    if isinstance(baselines, (int, float)):
        return [float(baselines)] * n
    if not isinstance(baselines, torch.Tensor):
        raise NotAccelerated(f"baselines of type {type(baselines).__name__} is not a number or tensor")
    if torch.promote_types(baselines.dtype, inputs.dtype) != inputs.dtype:
        raise NotAccelerated(
            f"the baseline's dtype {baselines.dtype} would promote the {inputs.dtype} inputs"
        )
    if baselines.numel() > 1 and baselines.device != inputs.device:
        raise NotAccelerated(f"the baseline is on {baselines.device} but the inputs are on {inputs.device}")
    try:
        if baselines.dim() > inputs.dim():
            raise RuntimeError("more dimensions than the inputs")
        full = baselines.detach().cpu().broadcast_to(inputs.shape)
    except RuntimeError:
        raise NotAccelerated(
            f"baseline shape {list(baselines.shape)} does not broadcast to the inputs {list(inputs.shape)}"
        ) from None
    if not torch.isfinite(full).all():
        raise NotAccelerated("the baseline holds NaN or infinite values")
    corner = full[:, :, :1, :1]
    if not torch.equal(full, corner.expand_as(full)):  # e.g. a blurred image: each window shows its part
        return [Baseline(full[i].to(inputs.dtype)) for i in range(n)]
    fills: list[Fill] = []
    for values in corner.reshape(n, -1).tolist():
        fills.append(values[0] if len(set(values)) == 1 else tuple(values))
    return fills


class _ExampleBaseline(PositionalFill):
    """The window of the baseline of the example being explained now: Occlusion sets it around each
    example's engine calls (:meth:`showing`), so one compiled engine per window shape serves every
    example's spatially varying baseline instead of a compile per example. Per context (a
    ``ContextVar``), so threads sharing an Occlusion object each see their own example's baseline.
    The unoccluded image's activations do not depend on the fill, so the engine's cache stays valid."""

    def __init__(self):
        object.__setattr__(self, "_current", contextvars.ContextVar("kfx_captum_baseline"))

    @contextlib.contextmanager
    def showing(self, baseline: Baseline | None) -> Iterator[None]:
        token = self._current.set(baseline)
        try:
            yield
        finally:
            self._current.reset(token)

    def content(self, image, positions, size):
        baseline = self._current.get(None)
        if baseline is None:  # an engine of this fill used outside Occlusion.attribute
            raise InputError(
                "this engine shows the baseline kfx.captum.Occlusion sets per example; use it there"
            )
        return baseline.content(image, positions, size)

    def name(self) -> str:
        return "the example's baseline"


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target_indices(target, n: int) -> list[tuple]:
    """Each example's index into its own output row (Captum's ``_select_targets``, per example).

    None selects the whole row; an int or integer scalar tensor one column for every example; a
    tuple of ints a position in a multi-dimensional output; a list of N ints or tuples, or an
    integer tensor of N values, one per example.
    """
    if target is None:
        return [()] * n
    if _is_index(target):
        return [(target,)] * n
    if isinstance(target, tuple) and all(_is_index(t) for t in target):
        return [target] * n
    if isinstance(target, torch.Tensor) and not target.dtype.is_floating_point and target.dtype != torch.bool:
        if target.numel() == 1:
            return [(int(target.item()),)] * n
        if target.dim() == 1 and target.numel() == n:
            return [(int(t),) for t in target.tolist()]
    if isinstance(target, list) and len(target) == n:
        if all(_is_index(t) for t in target):
            return [(t,) for t in target]
        if all(isinstance(t, tuple) and all(_is_index(i) for i in t) for t in target):
            return list(target)
    raise NotAccelerated(f"target {target!r} is not an int, a tuple, or one per example")


def _select(outputs: torch.Tensor, index: tuple) -> torch.Tensor:
    """The target's value in each output row [P, ...] -> [P]; one value per row or NotAccelerated."""
    try:
        selected = outputs[(slice(None), *index)]
    except IndexError as err:
        raise NotAccelerated(f"target index {index} does not fit the model output: {err}") from None
    if selected.numel() != outputs.shape[0]:
        raise NotAccelerated(
            f"target {index or None} picks {selected.numel() // max(outputs.shape[0], 1)} values per example "
            f"from outputs of shape {list(outputs.shape[1:])}; Occlusion needs one (pass target=)"
        )
    return selected.reshape(-1)


# -- the model -----------------------------------------------------------------------------------


def _captum_occlusion():
    """``captum.attr.Occlusion``, or None when captum is not installed."""
    try:
        return importlib.import_module("captum.attr").Occlusion
    except ImportError:
        return None


def _single_image_batch(inputs) -> tuple[torch.Tensor, bool]:
    """The one [N, C, H, W] tensor in ``inputs`` and whether it came in a 1-tuple."""
    as_tuple = isinstance(inputs, tuple)
    if as_tuple and len(inputs) == 1:
        inputs = inputs[0]
    if not isinstance(inputs, torch.Tensor):
        raise NotAccelerated("inputs is not a single tensor (kfx explains one image input)")
    if inputs.dim() != 4:
        raise NotAccelerated(f"inputs has shape {list(inputs.shape)}, not an image batch [N, C, H, W]")
    return inputs, as_tuple


# -- the drop-in ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything one accelerated call needs, checked."""

    model: nn.Module
    inputs: torch.Tensor
    windows: _Windows
    fills: list[Fill]
    indices: list[tuple]
    initial: torch.Tensor  # [N], the target's original output per example
    dtype: torch.dtype | None  # for compile, only when the model has no floating-point tensors
    batch_size: int


class Occlusion:
    """Captum's ``Occlusion`` on kfx: the same arguments, the same attributions, computed incrementally.

    Args:
        forward_func: the model. An ``nn.Module`` in eval mode that ``kfx.compile`` handles is
            accelerated; anything else runs ``captum.attr.Occlusion`` (see the module docstring).
        batch_size: positions per kfx batch; default ``max(perturbations_per_eval * N, DEFAULT_BATCH_SIZE)``.

    Attributes:
        last_fallback_reason: None when the last :meth:`attribute` call took the kfx fast path,
            otherwise why it ran on Captum instead.
    """

    def __init__(self, forward_func: Callable, *, batch_size: int | None = None):
        if batch_size is not None and (not _is_index(batch_size) or batch_size < 1):
            raise InputError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.forward_func = forward_func
        self.batch_size = batch_size
        self.last_fallback_reason: str | None = None
        self._engines: dict[tuple, Engine] = {}
        self._engines_version: tuple | None = None
        self._warned: set[str] = set()
        self._example_baseline = _ExampleBaseline()  # the fill of every spatially varying baseline

    def attribute(
        self,
        inputs,
        sliding_window_shapes,
        strides=None,
        baselines=None,
        target=None,
        additional_forward_args=None,
        perturbations_per_eval: int = 1,
        show_progress: bool = False,
    ):
        """Occlusion attributions with ``captum.attr.Occlusion.attribute``'s arguments and result.

        Returns a tensor of the inputs' shape (a 1-tuple if ``inputs`` was one), in Captum's dtype.
        """
        if not _is_index(perturbations_per_eval) or perturbations_per_eval < 1:
            raise InputError(f"perturbations_per_eval must be a positive int, got {perturbations_per_eval!r}")
        arguments = dict(
            inputs=inputs,
            sliding_window_shapes=sliding_window_shapes,
            strides=strides,
            baselines=baselines,
            target=target,
            additional_forward_args=additional_forward_args,
            perturbations_per_eval=perturbations_per_eval,
            show_progress=show_progress,
        )
        try:
            plan, as_tuple = self._plan(
                inputs,
                sliding_window_shapes,
                strides,
                baselines,
                target,
                additional_forward_args,
                perturbations_per_eval,
            )
            attributions = self._accelerated(plan, show_progress)
        except NotAccelerated as why:
            return self._fallback(why, arguments)
        self.last_fallback_reason = None
        return (attributions,) if as_tuple else attributions

    # -- planning ---------------------------------------------------------------------------------
    def _plan(
        self,
        inputs,
        sliding_window_shapes,
        strides,
        baselines,
        target,
        additional_forward_args,
        perturbations_per_eval: int,
    ) -> tuple[_Plan, bool]:
        """Check that kfx can compute this call; raise NotAccelerated (or PatchError) otherwise."""
        images, as_tuple = _single_image_batch(inputs)
        # Geometry first: bad windows are errors on every path, not reasons to fall back.
        window, stride = _window_and_strides(sliding_window_shapes, strides, tuple(images.shape))
        if additional_forward_args is not None:
            raise NotAccelerated("additional_forward_args is given (kfx models take the image only)")
        model = self.forward_func
        try:
            require_eval_module(model, "kfx.captum.Occlusion")
        except ModelError as err:
            raise NotAccelerated(str(err), ModelError) from None
        n, channels = images.shape[:2]
        if window[0] != channels:
            raise NotAccelerated(
                f"the window {window} does not span all {channels} channels (Captum slides it across them)",
                PatchError,
            )
        if n == 0 or not images.dtype.is_floating_point or not torch.isfinite(images).all():
            raise NotAccelerated("inputs is empty, not floating point, or holds NaN or infinite values")
        model_dtype, model_device = model_dtype_device(model)
        if model_dtype is not None and (model_dtype, model_device) != (images.dtype, images.device):
            raise NotAccelerated(
                f"inputs are {images.dtype} on {images.device} but the model is {model_dtype} on {model_device}"
            )
        fills = _fills_per_example(baselines, images)
        indices = _target_indices(target, n)
        with torch.no_grad():
            outputs = model(images)
        if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or outputs.shape[0] != n:
            raise NotAccelerated("the model does not return one output row per example")
        initial = torch.stack([_select(outputs[i : i + 1], indices[i])[0] for i in range(n)])
        return (
            _Plan(
                model=model,
                inputs=images,
                windows=_captum_windows(tuple(images.shape[2:]), window[1:], stride[1:]),
                fills=fills,
                indices=indices,
                initial=initial,
                dtype=None if model_dtype is not None else images.dtype,
                batch_size=self.batch_size or max(perturbations_per_eval * n, DEFAULT_BATCH_SIZE),
            ),
            as_tuple,
        )

    def _engine(self, plan: _Plan, size: tuple[int, int], fill: Fill) -> Engine:
        """The cached engine for this patch shape and fill (compiled on first use)."""
        version = weights_version(plan.model)
        if version != self._engines_version:
            self._engines.clear()
            self._engines_version = version
        image_shape = tuple(plan.inputs.shape[1:])
        # The stride is not part of the key: engine.outputs() takes any corner where the patch fits.
        key = (image_shape, plan.inputs.dtype, plan.inputs.device, size, fill)
        if key not in self._engines:
            try:
                self._engines[key] = compile(
                    plan.model, image_shape, Patch(size, stride=1, fill=fill), dtype=plan.dtype
                )
            except KfxError as err:
                raise NotAccelerated(f"kfx.compile failed: {err}", type(err)) from None
        return self._engines[key]

    # -- computing --------------------------------------------------------------------------------
    def _accelerated(self, plan: _Plan, show_progress: bool) -> torch.Tensor:
        """Captum's attributions: per-window drops from kfx engines, averaged over covering windows."""
        windows, images = plan.windows, plan.inputs
        n, channels, height, width = images.shape
        groups = windows.by_shape()
        progress = progress_bar("kfx Occlusion", total=n * len(groups), show=show_progress, unit="it")
        per_example = []
        try:
            for i in range(n):
                drops = torch.zeros(len(windows.rows), len(windows.cols), dtype=torch.float64)
                fill = plan.fills[i]
                baseline = fill if isinstance(fill, Baseline) else None
                if baseline is not None:  # one engine for all examples, each showing its own baseline
                    fill = self._example_baseline
                for size, cells in groups.items():
                    engine = self._engine(plan, size, fill)
                    corners = torch.tensor([(windows.rows[r][0], windows.cols[c][0]) for r, c in cells])
                    with self._example_baseline.showing(baseline):
                        outputs = engine.outputs(images[i], corners, batch_size=plan.batch_size)
                    # Subtract in the output's dtype, as Captum does. Captum then sums in that dtype
                    # too; kfx sums in float64, so float32 models may differ in the last bits.
                    drop = plan.initial[i] - _select(outputs, plan.indices[i])
                    rows, cols = zip(*cells)
                    drops[list(rows), list(cols)] = drop.to(device="cpu", dtype=torch.float64)
                    progress.update()
                per_example.append(_spread_over_pixels(drops, windows, (height, width)))
        finally:
            progress.close()
        every_window = torch.ones(len(windows.rows), len(windows.cols), dtype=torch.float64)
        counts = _spread_over_pixels(every_window, windows, (height, width))
        # Captum 0.9 returns ``total.float() / weights`` with weights in torch's default dtype.
        attributions = torch.stack(per_example).float() / counts.to(torch.get_default_dtype())
        return attributions[:, None].expand(n, channels, height, width).contiguous().to(images.device)

    def _fallback(self, why: NotAccelerated, arguments: dict):
        """Run captum.attr.Occlusion itself, or raise why.error when captum is not installed."""
        captum_occlusion = fall_back(
            self, why, _captum_occlusion(), call="Occlusion", ours="kfx.captum.Occlusion",
            theirs="captum.attr.Occlusion", package="captum",
        )  # fmt: skip
        return captum_occlusion(self.forward_func).attribute(**arguments)
