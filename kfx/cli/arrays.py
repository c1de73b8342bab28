"""Arrays for ``kfx explain``: .npy arrays and NIfTI volumes, taken as the model's input as they are.

Conventions (the README's "Signals and volumes" says the same):

- ``.npy``: an array [C, *S], channels first, with one to three spatial axes: a signal [C, L], an
  image [C, H, W] or a volume [C, D, H, W]. A single channel still needs its axis ([1, L]).
- NIfTI (``.nii``, ``.nii.gz``, read with nibabel): a 2-D [X, Y] or 3-D [X, Y, Z] image gets one
  channel in front ([1, X, Y, Z]); a 4-D one [X, Y, Z, C] has its last axis taken as channels
  ([C, X, Y, Z], as MONAI's EnsureChannelFirst does), and so does a 5-D one [X, Y, Z, 1, C] (the
  standard's place for vector components). Values are the scaled ones (scl_slope and scl_inter
  applied); voxel axes are kept as stored, not reoriented.
- Neither is resized nor normalised: it is the model's input, cast to the model's dtype. Values
  must be finite numbers (bool, integer or float).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kfx
from kfx.cli.common import DEFAULT_PATCH, UsageError
from kfx.common import model_dtype_device
from kfx.errors import InputError, KfxError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ARRAY_SUFFIXES = (".npy", *NIFTI_SUFFIXES)
KINDS = {1: "signal [C, L]", 2: "image [C, H, W]", 3: "volume [C, D, H, W]"}
NIBABEL_MISSING = 'NIfTI files need nibabel, which is not installed; pip install "kfx[medical]"'


@dataclass(frozen=True)
class ArrayInput:
    """One array input: its values [C, *S] as read, and for NIfTI what places them in the scanner."""

    name: str
    values: np.ndarray  # [C, *S]
    nifti: object | None = None  # the nibabel image read (its affine and header), for NIfTI inputs

    @property
    def axes(self) -> int:
        return self.values.ndim - 1

    @property
    def axis_names(self) -> tuple[str, ...]:
        """What the spatial axes are called in pictures: voxel axes X, Y, Z for NIfTI."""
        if self.nifti is not None:
            return ("X", "Y", "Z")[: self.axes]
        return {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}[self.axes]

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """Voxel sizes along the spatial axes (NIfTI: from the header), for true proportions."""
        if self.nifti is None:
            return None
        zooms = tuple(float(z) for z in self.nifti.header.get_zooms()[: self.axes])
        return zooms if all(z > 0 for z in zooms) else None


def is_array_file(name: str) -> bool:
    return name.lower().endswith(ARRAY_SUFFIXES)


def is_nifti_file(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _nibabel(name: str):
    try:
        import nibabel
    except ImportError:
        raise UsageError(f"{name}: {NIBABEL_MISSING}") from None
    return nibabel


def check_readers(names) -> None:
    """Before any work: NIfTI inputs need nibabel (a UsageError naming the first when it is missing)."""
    first = next((name for name in names if is_nifti_file(name)), None)
    if first is not None:
        _nibabel(first)


def read_array(name: str) -> ArrayInput:
    """The .npy or NIfTI file ``name`` as [C, *S]; every failure is an InputError naming it (a
    missing nibabel: a UsageError, as for any part this installation lacks)."""
    path = Path(name)
    if not path.exists():
        raise InputError(f"{name}: no such file")
    if path.is_dir():
        raise InputError(f"{name}: is a directory, not a .npy or NIfTI file")
    if is_nifti_file(name):
        nifti, values = _read_nifti(name)
        return ArrayInput(name, _checked(_nifti_channels_first(values, name), name), nifti)
    return ArrayInput(name, _checked(_read_npy(name), name))


def _read_npy(name: str) -> np.ndarray:
    try:
        values = np.load(name, allow_pickle=False)
    except Exception as exc:  # not a .npy file, a truncated one, object arrays (pickles)
        raise InputError(f"{name}: cannot read it as a NumPy .npy array ({_first_line(exc)})") from None
    if not isinstance(values, np.ndarray):  # a .npz archive under a .npy name
        raise InputError(f"{name}: holds several arrays (a .npz archive); save one array with np.save")
    return values


def _read_nifti(name: str):
    """The nibabel image and its values (scl_slope and scl_inter applied), all read now."""
    nibabel = _nibabel(name)
    try:
        image = nibabel.load(name)
        return image, image.get_fdata(dtype=np.float64)
    except Exception as exc:  # not NIfTI, a truncated gzip stream, a header nibabel rejects
        raise InputError(f"{name}: cannot read it as a NIfTI image ({_first_line(exc)})") from None


def _nifti_channels_first(values: np.ndarray, name: str) -> np.ndarray:
    """NIfTI's [X, Y(, Z)(, 1)(, C)] as [C, X, Y(, Z)] (see the module's conventions)."""
    if values.ndim in (2, 3):
        return values[None]
    if values.ndim == 5 and values.shape[3] == 1:
        values = values[:, :, :, 0]
    if values.ndim == 4:
        return np.moveaxis(values, -1, 0)
    raise InputError(
        f"{name}: a NIfTI image of shape {list(values.shape)}; kfx takes [X, Y], [X, Y, Z], "
        "[X, Y, Z, C] (last axis: channels) or [X, Y, Z, 1, C]"
    )


def _checked(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` if it is a [C, *S] array of finite numbers with one to three spatial axes."""
    if values.dtype.kind not in "biuf":
        raise InputError(
            f"{name}: an array of dtype {values.dtype} is not a model input; save numbers (float, int or bool)"
        )
    if not 2 <= values.ndim <= 4:
        hint = " (a single channel still needs its axis: save it as [1, L])" if values.ndim == 1 else ""
        raise InputError(
            f"{name}: an array of shape {list(values.shape)}; kfx takes [C, L] (signal), [C, H, W] "
            f"(image) or [C, D, H, W] (volume), channels first{hint}"
        )
    if 0 in values.shape:
        raise InputError(f"{name}: the array is empty (shape {list(values.shape)})")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"{name}: the array holds NaN or infinite values; kfx needs finite inputs")
    return values


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


# -- the model's input and patch --------------------------------------------------------------------


def array_model_input(model: torch.nn.Module, source: ArrayInput, device: torch.device) -> torch.Tensor:
    """The array as the model's input [C, *S]: the same values, in the model's dtype, on ``device``."""
    dtype, _ = model_dtype_device(model, default=(torch.get_default_dtype(), device))
    values = source.values.astype(np.float64) if source.values.dtype.kind in "bu" else source.values
    return torch.as_tensor(np.ascontiguousarray(values)).to(device=device, dtype=dtype)


def array_patch(args, source: ArrayInput) -> kfx.Patch:
    """The patch from --patch/--stride/--fill for this array, checked against its spatial axes."""
    shape = source.values.shape
    for flag, value in (("--patch", args.patch), ("--stride", args.stride)):
        given = len(value) if isinstance(value, tuple) else 1
        if given not in (1, source.axes):
            raise UsageError(
                f"{flag} {_axes_text(value)} gives {given} axes but {source.name} is a {KINDS[source.axes]} "
                f"of shape {list(shape)}, with {source.axes} spatial axes; give one number for every "
                f"axis, or {source.axes} ({'x'.join(source.axis_names)})"
            )
    if isinstance(args.fill, tuple) and len(args.fill) != shape[0]:
        raise UsageError(
            f"--fill {','.join(map(str, args.fill))} gives {len(args.fill)} values but {source.name} has "
            f"{shape[0]} channel(s); give one value for every channel"
        )
    size = args.patch if args.patch is not None else DEFAULT_PATCH
    try:
        patch = kfx.Patch(size, stride=args.stride, fill=0.0 if args.fill is None else args.fill)
        patch = patch.for_axes(source.axes)
        patch.check_fits(tuple(shape[1:]))
    except KfxError as exc:
        raise UsageError(f"--patch {_axes_text(size)}: {exc} ({source.name} is {list(shape)})") from None
    return patch


def _axes_text(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def array_advice(model: torch.nn.Module, source: ArrayInput) -> str:
    """What to check when the model fails on this array: its rank or channels against the first
    convolution's, when they differ; the channels-first convention otherwise."""
    shape = list(source.values.shape)
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is not None:
        axes = len(first.kernel_size)
        if axes != source.axes:
            return (
                f"the model's first layer is {type(first).__name__}, for {axes} spatial axes, and "
                f"{source.name} is a {KINDS[source.axes]} of shape {shape}; give the model inputs of its rank"
            )
        if first.in_channels != shape[0]:
            return (
                f"the model's first layer takes {first.in_channels} channels and {source.name} has {shape[0]} "
                f"(shape {shape}; arrays are channels first, [C, *S])"
            )
    return f"check that {source.name}'s shape {shape} (channels first, [C, *S]) is what the model takes"


# -- the map as NIfTI -----------------------------------------------------------------------------


def nifti_bytes(pixels: torch.Tensor, source: ArrayInput, path: Path, description: str) -> bytes:
    """The per-voxel map [X, Y, Z] as a NIfTI file's bytes, with the input's affine and header
    geometry (voxel sizes, units, qform/sform codes), so that a viewer lays it over the scan;
    gzip-compressed when ``path`` ends in .gz. Float32 (float64 maps stay float64)."""
    values = pixels.detach().cpu()
    values = (values if values.dtype == torch.float64 else values.float()).numpy()
    header = source.nifti.header.copy()
    header.set_data_dtype(values.dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("none")
    header["cal_min"], header["cal_max"] = 0.0, 0.0  # 0, 0: let the viewer take the map's range
    header["descrip"] = description.encode("ascii", "replace")[:79]
    image = type(source.nifti)(values, source.nifti.affine, header)
    data = image.to_bytes()
    return gzip.compress(data, mtime=0) if path.name.lower().endswith(".gz") else data
