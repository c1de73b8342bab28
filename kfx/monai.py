"""A MONAI drop-in: ``kfx.monai.OcclusionSensitivity`` returns what ``monai.visualize.OcclusionSensitivity``
returns, computed incrementally.

>>> import kfx.monai  # doctest: +SKIP
>>> occ_sens = kfx.monai.OcclusionSensitivity(nn_module=model, mask_size=16, n_batch=16)  # doctest: +SKIP
>>> occ_map, most_probable_class = occ_sens(volume, b_box=[8, 56, -1, -1, -1, -1])  # doctest: +SKIP
>>> occ_sens.last_fallback_reason is None  # the kfx fast path was taken  # doctest: +SKIP
True

Semantics (MONAI 1.6.1, ``monai/visualize/occlusion_sensitivity.py`` and the
``sliding_window_inference`` it calls, ``monai/inferers/utils.py``):

- Windows: ``sliding_window_inference`` over a coordinate grid of the image (cropped to ``b_box``
  widened by ``(mask - 1) // 2`` per side, the mask clipped to the crop). Along each axis the
  windows start every ``int(mask * (1 - overlap))`` voxels (at least 1; the whole axis when the mask
  spans it), and the last one is moved back to end at the border: every window has the full mask
  size, so one engine serves them all, at arbitrary corners (:meth:`kfx.Engine.outputs`).
- Occlusion, per ``mode``: a float paints that value; "mean_img" the image's mean over all channels
  (:class:`kfx.fills.MeanImage` with ``per_channel=False``, so one engine serves every image); "gaussian" multiplies the window by MONAI's ``1 - gaussian``
  (:meth:`kfx.fills.Multiply.gaussian`); "mean_patch" multiplies the window by its own mean over all
  channels. That last one is what MONAI 1.6.1 computes, not what its docs say (the window replaced by
  its mean): its predictor unpacks ``constant_occlusion``'s ``(mul, add)`` as ``(add, mul)``. kfx
  reproduces it, as a drop-in must; :class:`kfx.fills.MeanPatch` is the fill the name promises.
- Each window's output row goes through ``activate`` (True: sigmoid if the *input* has one channel,
  else softmax over classes; a callable is called on each batch of ``n_batch`` rows, in MONAI's
  order) and is spread over the window with MONAI's importance weights (ones, or a Gaussian with
  sigma 0.125 * mask for mode "gaussian"), summed in MONAI's order and divided by the summed
  weights. The map is then cropped to ``b_box`` as MONAI crops it (zeros where MONAI leaves zeros).
- Result: ``(occ_map [1, K, *spatial], most_probable_class [1, 1, *spatial])`` as plain tensors
  (MONAI returns MetaTensors with the crop's metadata). The map is accumulated in the input's dtype
  and returned in float32 whatever that dtype, as MONAI's is (``sliding_window_inference`` converts
  its result to the dtype of an empty MetaTensor).

Fallback rules: these calls run ``monai.visualize.OcclusionSensitivity`` itself (one
:class:`NotAcceleratedWarning` per reason and object; ``last_fallback_reason`` says why), or, without
MONAI installed, raise the :class:`kfx.KfxError` subclass that fits the reason:

- ``mode`` is a callable (kfx cannot see what it paints)                        (PatchError)
- ``nn_module`` is not an ``nn.Module``, or its output for ``x`` is not [1, K]   (ModelError)
- module keyword arguments are given (kfx models take the image only)           (InputError)
- ``x`` is not float32/float64 (MONAI's grid holds coordinates in x's dtype and
  rounds them in half precision), holds NaN or infinity, or differs from the
  model's parameters in dtype or device                                         (InputError)
- ``b_box`` is not 2 ints per spatial axis, or crops the image to nothing       (InputError)
- ``activate`` returns something other than one row per window                  (InputError)
- ``kfx.compile`` cannot handle the model, the input's rank or the fill
  (TraceError, ModelError, PatchError)                                          (that error)

Bad geometry raises :class:`kfx.PatchError` on every path (MONAI raises ValueError or
NotImplementedError): a mode string MONAI does not know, a mask size below 1 or not one per axis,
an overlap outside [0, 1), a mask larger than the (cropped) image. A batch of more than one image
raises :class:`kfx.InputError` (a ValueError, as MONAI's).

Batch size: MONAI runs ``n_batch`` occluded copies per forward call (default 16). kfx's speed comes
from batching positions, so it evaluates ``max(n_batch, DEFAULT_BATCH_SIZE)`` positions per batch
(``kfx.common.DEFAULT_BATCH_SIZE``, 64, as ``kfx.captum`` does); an incremental position costs far
less memory than a full forward pass. To cap memory anyway, pass
``OcclusionSensitivity(..., batch_size=...)``. ``n_batch`` still sets the batches a callable
``activate`` sees, as in MONAI. Like MONAI, the module is put in eval
mode for the call (and back in training mode after it, if it was).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kfx.common import DEFAULT_BATCH_SIZE, model_dtype_device, progress_bar
from kfx.dropin import NotAccelerated, NotAcceleratedWarning, fall_back, weights_version
from kfx.engine import Engine, compile
from kfx.errors import InputError, KfxError, ModelError, PatchError
from kfx.fills import MeanImage, Multiply, PositionalFill, windows
from kfx.patch import Patch
from kfx.validation import as_int

__all__ = ["OcclusionSensitivity", "NotAcceleratedWarning"]

MODES = ("gaussian", "mean_patch", "mean_img")
# Engines kept per object (least recently used dropped): each image shape, mask (b_box may clip it)
# and mode compiles its own.
MAX_CACHED_ENGINES = 8


@dataclass(frozen=True)
class MonaiMeanPatch(PositionalFill):
    """MONAI 1.6.1's "mean_patch": the window times its own mean over all channels (see the module
    docstring for why that, and not the mean itself)."""

    def content(self, image, positions, size):
        region = windows(image, positions, size)
        means = region.mean(dim=tuple(range(1, region.dim())), keepdim=True)
        return region * means

    def name(self) -> str:
        return "monai_mean_patch"


# -- MONAI's window placement and weights ------------------------------------------------------------


def _axis_starts(length: int, mask: int, overlap: float) -> list[int]:
    """Window starts along one axis, as ``sliding_window_inference`` places them
    (``_get_scan_interval`` and ``dense_patch_slices``): every ``int(mask * (1 - overlap))``, the last
    one moved back so that it ends at the border.

    >>> _axis_starts(10, 4, 0.6), _axis_starts(10, 4, 0.0), _axis_starts(4, 4, 0.5)
    ([0, 1, 2, 3, 4, 5, 6], [0, 4, 6], [0])
    """
    interval = mask if mask == length else max(int(mask * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(length / interval)) if d * interval + mask >= length), 0) + 1
    return [i * interval - max(i * interval + mask - length, 0) for i in range(count)]


def _importance_map(size: tuple[int, ...], gaussian: bool, dtype: torch.dtype) -> torch.Tensor:
    """MONAI's ``compute_importance_map`` (sigma_scale 0.125), computed in float32 as MONAI does, then
    cast to ``dtype``."""
    if not gaussian:
        weights = torch.ones(size, dtype=torch.float)
    else:
        weights = None
        for extent in size:
            x = torch.arange(-(extent - 1) / 2.0, (extent - 1) / 2.0 + 1, dtype=torch.float)
            x = torch.exp(x**2 / (-2 * (extent * 0.125) ** 2))
            weights = x if weights is None else weights.unsqueeze(-1) * x
    floor = max(torch.min(weights).item(), 1e-3)
    return weights.clamp(min=floor).to(dtype)


@dataclass(frozen=True)
class _Crop:
    """The region MONAI's coordinate grid is cropped to (per axis: start, stop), the mask clipped to
    it, and the slices of MONAI's final crop of the full-size map."""

    region: tuple[tuple[int, int], ...]
    mask: tuple[int, ...]
    final: tuple[slice, ...]


def _crop(b_box, spatial: tuple[int, ...], mask: tuple[int, ...]) -> _Crop:
    """MONAI's ``crop_meshgrid`` and its final ``SpatialCrop`` for ``b_box`` (None: no crop)."""
    if b_box is None:
        return _Crop(tuple((0, s) for s in spatial), mask, tuple(slice(None) for _ in spatial))
    values = [as_int(b) for b in b_box] if isinstance(b_box, Sequence) else None
    if values is None or len(values) != 2 * len(spatial) or None in values:
        raise NotAccelerated(
            f"b_box {b_box!r} is not 2 ints per spatial axis ([min1, max1, min2, max2, ...])"
        )
    lows, highs = values[::2], values[1::2]
    edges = [(m - 1) // 2 for m in mask]
    grid = [
        slice(max(low - edge, 0), size if high == -1 else min(high + edge, size))
        for low, high, edge, size in zip(lows, highs, edges, spatial)
    ]
    region = tuple(g.indices(size)[:2] for g, size in zip(grid, spatial))
    if any(stop <= start for start, stop in region):
        raise NotAccelerated(f"b_box {b_box!r} crops the image {list(spatial)} to nothing")
    clipped = tuple(min(stop - start, m) for (start, stop), m in zip(region, mask))
    final = tuple(
        slice(max(low, 0), max(high if high > 0 else size, max(low, 0)))
        for low, high, size in zip(lows, highs, spatial)
    )
    return _Crop(region, clipped, final)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """MONAI's ``eval_mode``: no gradients, the module in eval mode, and back in training mode after
    if its top level was."""
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()
            yield
    finally:
        if was_training:
            module.train()


def _monai_occlusion_sensitivity():
    """``monai.visualize.OcclusionSensitivity``, or None when MONAI is not installed."""
    try:
        return importlib.import_module("monai.visualize").OcclusionSensitivity
    except ImportError:
        return None


# -- the drop-in -------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything one accelerated call needs, checked."""

    image: torch.Tensor  # [C, *S]
    crop: _Crop
    positions: torch.Tensor  # [N, n] corners in the image, in MONAI's window order
    starts: tuple[list[int], ...]  # per axis, window starts within the crop
    fill: float | PositionalFill


class OcclusionSensitivity:
    """MONAI's ``OcclusionSensitivity`` on kfx: the same arguments, the same maps, computed incrementally.

    Args:
        nn_module, mask_size, n_batch, verbose, mode, overlap, activate: as in MONAI 1.6 (see the module
            docstring for the semantics). ``mode`` may also be an int (MONAI fails on one).
        batch_size: positions per kfx batch; default ``max(n_batch, DEFAULT_BATCH_SIZE)``.

    Attributes:
        last_fallback_reason: None when the last call took the kfx fast path, otherwise why it ran on
            MONAI instead.
    """

    def __init__(
        self,
        nn_module: nn.Module,
        mask_size: int | Sequence = 16,
        n_batch: int = 16,
        verbose: bool = True,
        mode: str | float | Callable = "gaussian",
        overlap: float = 0.6,
        activate: bool | Callable = True,
        *,
        batch_size: int | None = None,
    ):
        if isinstance(mode, str) and mode not in MODES:
            raise PatchError(
                f"mode must be one of {', '.join(map(repr, MODES))}, a float or a callable, got {mode!r}"
            )
        if isinstance(mode, int) and not isinstance(mode, bool):
            mode = float(mode)
        if not isinstance(mode, (str, float)) and not callable(mode):
            raise PatchError(
                f"mode must be one of {', '.join(map(repr, MODES))}, a float or a callable, got {mode!r}"
            )
        for name, value in (("n_batch", n_batch), ("batch_size", batch_size)):
            if value is not None and (as_int(value) is None or value < 1):
                raise InputError(f"{name} must be a positive int, got {value!r}")
        self.nn_module = nn_module
        self.mask_size = mask_size
        self.n_batch = n_batch
        self.verbose = verbose
        self.mode = mode
        self.overlap = overlap
        self.activate = activate
        self.batch_size = batch_size
        self.last_fallback_reason: str | None = None
        self._engines: OrderedDict[tuple, Engine] = OrderedDict()
        self._engines_version: tuple | None = None
        self._warned: set[str] = set()

    def __call__(
        self, x: torch.Tensor, b_box: Sequence | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(occ_map, most_probable_class)`` for one image batch ``x`` [1, C, *spatial], as MONAI's."""
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[0] != 1:
            raise InputError(
                f"x must be one image as a batch [1, C, *spatial], got {_describe(x)}; MONAI's "
                "OcclusionSensitivity explains one image per call"
            )
        spatial = tuple(x.shape[2:])
        mask = self._mask(len(spatial))
        overlaps = self._overlaps(len(spatial))
        try:
            crop = _crop(b_box, spatial, mask)
        except NotAccelerated as why:
            return self._fallback(why, x, b_box, kwargs)
        grid = tuple(stop - start for start, stop in crop.region)
        if any(m > g for m, g in zip(crop.mask, grid)):
            raise PatchError(
                f"the mask {crop.mask} is larger than the image {list(grid)}"
                f"{' cropped to b_box' if b_box is not None else ''}; use a smaller mask_size"
            )
        in_eval_mode = (
            _eval_mode(self.nn_module) if isinstance(self.nn_module, nn.Module) else contextlib.nullcontext()
        )
        try:
            with in_eval_mode:
                # A plain tensor: MONAI's loaders give MetaTensors, whose bookkeeping the engine needs not.
                plan = self._plan(x.detach().as_subclass(torch.Tensor), crop, overlaps, kwargs)
                occ_map = self._accelerated(plan)
        except NotAccelerated as why:
            return self._fallback(why, x, b_box, kwargs)
        self.last_fallback_reason = None
        return occ_map, occ_map.argmax(dim=1, keepdim=True)

    # -- arguments -------------------------------------------------------------------------------------
    def _mask(self, axes: int) -> tuple[int, ...]:
        values = (self.mask_size,) * axes if as_int(self.mask_size) is not None else self.mask_size
        mask = tuple(as_int(v) for v in values) if isinstance(values, Sequence) else ()
        if len(mask) != axes or None in mask or min(mask) < 1:
            raise PatchError(
                f"mask_size must be a positive int or one per spatial axis ({axes}), got {self.mask_size!r}"
            )
        return mask

    def _overlaps(self, axes: int) -> tuple[float, ...]:
        values = self.overlap if isinstance(self.overlap, Sequence) else (self.overlap,) * axes
        ok = len(values) == axes and all(
            isinstance(o, (int, float)) and not isinstance(o, bool) and 0 <= o < 1 for o in values
        )
        if not ok:
            raise PatchError(
                f"overlap must be in [0, 1) (one value, or one per spatial axis), got {self.overlap!r}"
            )
        return tuple(values)

    # -- planning --------------------------------------------------------------------------------------
    def _plan(self, x: torch.Tensor, crop: _Crop, overlaps: tuple[float, ...], kwargs: dict) -> _Plan:
        """Check that kfx can compute this call; raise NotAccelerated otherwise."""
        model = self.nn_module
        if callable(self.mode):
            raise NotAccelerated("mode is a callable (kfx cannot see what it paints)", PatchError)
        if not isinstance(model, nn.Module):
            raise NotAccelerated(f"nn_module is a {type(model).__name__}, not a torch.nn.Module", ModelError)
        if kwargs:
            raise NotAccelerated(
                f"module keyword arguments {sorted(kwargs)} are given (kfx models take the image only)"
            )
        if x.dtype not in (torch.float32, torch.float64):
            raise NotAccelerated(
                f"x is {x.dtype}; kfx follows MONAI's placement exactly for float32 and float64 inputs only"
            )
        if not torch.isfinite(x).all():
            raise NotAccelerated("x holds NaN or infinite values")
        model_dtype, model_device = model_dtype_device(model)
        if model_dtype is not None and (model_dtype, model_device) != (x.dtype, x.device):
            raise NotAccelerated(
                f"x is {x.dtype} on {x.device} but the model is {model_dtype} on {model_device}"
            )
        output = model(x)
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 1:
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise NotAccelerated(
                f"the model's output for x is {shape}, not one row of class scores [1, K]", ModelError
            )
        starts = tuple(
            _axis_starts(stop - start, m, o) for (start, stop), m, o in zip(crop.region, crop.mask, overlaps)
        )
        offsets = [torch.tensor(s) + start for s, (start, _) in zip(starts, crop.region)]
        positions = torch.cartesian_prod(*offsets).view(-1, len(offsets))
        return _Plan(x[0], crop, positions, starts, self._fill(x, crop.mask))

    def _fill(self, x: torch.Tensor, mask: tuple[int, ...]) -> float | PositionalFill:
        if isinstance(self.mode, float):
            return self.mode
        if self.mode == "mean_img":
            # MONAI paints x.mean().item(); the same full reduction, from each image, so one engine
            # serves every image.
            return MeanImage(per_channel=False)
        if self.mode == "gaussian":
            return Multiply.gaussian(mask)
        return MonaiMeanPatch()

    def _engine(self, plan: _Plan) -> Engine:
        """The cached engine for this image shape, mask and fill (compiled on first use)."""
        version = weights_version(self.nn_module)
        if version != self._engines_version:
            self._engines.clear()
            self._engines_version = version
        image = plan.image
        key = (tuple(image.shape), image.dtype, image.device, plan.crop.mask, plan.fill)
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        dtype = None if model_dtype_device(self.nn_module)[0] is not None else image.dtype
        try:
            patch = Patch(plan.crop.mask, stride=1, fill=plan.fill)
            engine = compile(self.nn_module, tuple(image.shape), patch, dtype=dtype)
        except KfxError as err:
            raise NotAccelerated(f"kfx cannot compile this call: {err}", type(err)) from None
        self._engines[key] = engine
        while len(self._engines) > MAX_CACHED_ENGINES:
            self._engines.popitem(last=False)
        return engine

    # -- computing -------------------------------------------------------------------------------------
    def _outputs(self, plan: _Plan) -> torch.Tensor:
        """The model's raw outputs [N, K] with each window occluded, in MONAI's window order."""
        engine = self._engine(plan)
        batch = self.batch_size or max(self.n_batch, DEFAULT_BATCH_SIZE)
        total = len(plan.positions)
        # Each engine call runs the unoccluded image once: a progress bar takes at most 20 calls.
        step = max(4 * batch, math.ceil(total / 20)) if self.verbose else total
        bar = progress_bar("kfx OcclusionSensitivity", total=total, show=bool(self.verbose), unit="win")
        parts = []
        try:
            for first in range(0, total, step):
                chunk = plan.positions[first : first + step]
                parts.append(engine.outputs(plan.image, chunk, batch_size=batch))
                bar.update(len(chunk))
        finally:
            bar.close()
        return torch.cat(parts)

    def _activated(self, outputs: torch.Tensor, channels: int) -> torch.Tensor:
        """MONAI's activation of each batch of ``n_batch`` window outputs."""
        if callable(self.activate):
            rows = [
                self.activate(outputs[i : i + self.n_batch]) for i in range(0, len(outputs), self.n_batch)
            ]
            if not all(isinstance(r, torch.Tensor) and r.dim() == 2 for r in rows) or (
                sum(len(r) for r in rows) != len(outputs) or len({r.shape[1] for r in rows}) != 1
            ):
                raise NotAccelerated("activate does not return one row of scores per window")
            return torch.cat(rows)
        if self.activate:
            return outputs.sigmoid() if channels == 1 else outputs.softmax(1)
        return outputs

    def _accelerated(self, plan: _Plan) -> torch.Tensor:
        """MONAI's map: each window's scores spread with its weights, summed in MONAI's order, averaged."""
        image, crop = plan.image, plan.crop
        scores = self._activated(self._outputs(plan), image.shape[0]).to(image.device)
        grid = tuple(stop - start for start, stop in crop.region)
        weights = _importance_map(crop.mask, self.mode == "gaussian", image.dtype).to(image.device)
        total = torch.zeros((scores.shape[1], *grid), dtype=image.dtype, device=image.device)
        counts = torch.zeros(grid, dtype=image.dtype, device=image.device)
        corners = torch.cartesian_prod(*(torch.tensor(s) for s in plan.starts)).view(-1, len(grid)).tolist()
        window_slices = [tuple(slice(c, c + m) for c, m in zip(corner, crop.mask)) for corner in corners]
        for window in window_slices:
            counts[window] += weights
        spread = (-1,) + (1,) * len(grid)
        for row, window in zip(scores, window_slices):
            # MONAI multiplies in place in the scores' dtype, then adds into the input's dtype.
            total[(slice(None), *window)] += (row.view(spread) * weights).to(row.dtype)
        total /= counts
        full = torch.zeros((scores.shape[1], *image.shape[1:]), dtype=image.dtype, device=image.device)
        full[(slice(None), *(slice(start, stop) for start, stop in crop.region))] = total
        # MONAI's sliding_window_inference returns its map in the dtype of an empty MetaTensor: float32.
        return full[(slice(None), *crop.final)][None].to(torch.float32)

    def _fallback(self, why: NotAccelerated, x, b_box, kwargs):
        """Run MONAI's OcclusionSensitivity itself, or raise why.error when MONAI is not installed."""
        monai_class = fall_back(
            self, why, _monai_occlusion_sensitivity(), call="OcclusionSensitivity",
            ours="kfx.monai.OcclusionSensitivity", theirs="monai.visualize.OcclusionSensitivity", package="MONAI",
        )  # fmt: skip
        occlusion = monai_class(
            nn_module=self.nn_module,
            mask_size=self.mask_size,
            n_batch=self.n_batch,
            verbose=self.verbose,
            mode=self.mode,
            overlap=self.overlap,
            activate=self.activate,
        )
        return occlusion(x, b_box, **kwargs)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__
