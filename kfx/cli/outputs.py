"""Output files of ``kfx``: where each image's results go (checked before any work), written atomically."""

from __future__ import annotations

import contextlib
import math
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kfx.cli.common import DEFAULT_PICTURE, STEM, OutputError, UsageError

DEFAULT_NIFTI = "{stem}_kfx.nii.gz"

# -- outputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Where one image's results go: the picture always; JSON and .npy when asked (``json == "-"``:
    stdout); for a NIfTI input, the per-voxel map as NIfTI."""

    picture: Path
    json: str | Path | None
    npy: Path | None
    nifti: Path | None = None


def _output_path(option: str, stem: str, suffix: str, count: int, flag: str) -> Path:
    """A file for one image from a file path, a directory or a {stem} pattern."""
    if STEM in option:
        path = Path(option.replace(STEM, stem))
    elif option.endswith(("/", os.sep)) or Path(option).is_dir():
        path = Path(option) / f"{stem}_kfx{suffix}"
    elif count > 1:
        raise UsageError(
            f"{flag} {option} names one file but {count} images were given; give a directory "
            f"(ending in '/') or a pattern with {STEM}"
        )
    else:
        path = Path(option)
    return path if path.suffix else path.with_suffix(suffix)


def _check_picture_format(path: Path) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    extension = path.suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise UsageError(
            f"--out {path}: matplotlib cannot write .{extension} pictures; use .png (or .pdf, .svg, .jpg)"
        )


def plan_outputs(args, stems: Sequence[str], nifti_inputs: Sequence[bool] | None = None) -> list[Outputs]:
    """Every image's output paths, checked before any work: distinct, and in a writable place.
    ``nifti_inputs`` says which inputs are NIfTI files (they also get --nifti, by default
    <stem>_kfx.nii.gz)."""
    count = len(stems)
    if args.npy == "-":
        raise UsageError("--npy needs a file path (a .npy file is binary; use --json - for stdout)")
    nifti_inputs = nifti_inputs or [False] * count
    nifti_option = _nifti_option(getattr(args, "nifti", None), nifti_inputs)
    plans = []
    for stem, nifti_input in zip(stems, nifti_inputs):
        picture = _output_path(args.out or DEFAULT_PICTURE, stem, ".png", count, "--out")
        _check_picture_format(picture)
        json_path = args.json
        if json_path is not None and json_path != "-":
            json_path = _output_path(json_path, stem, ".json", count, "--json")
        npy = _output_path(args.npy, stem, ".npy", count, "--npy") if args.npy else None
        nifti = _nifti_path(nifti_option, stem, sum(nifti_inputs)) if nifti_input else None
        plans.append(Outputs(picture, json_path, npy, nifti))
    files = [
        p for plan in plans for p in (plan.picture, plan.json, plan.npy, plan.nifti) if isinstance(p, Path)
    ]
    clashes = sorted({str(p) for p in files if files.count(p) > 1})
    if clashes:
        raise UsageError(
            f"two outputs would both be written to {clashes[0]}; give images distinct names or use {STEM}"
        )
    for path in files:
        _check_writable_place(path)
    return plans


def _nifti_option(option: str | None, nifti_inputs: Sequence[bool]) -> str:
    """--nifti, checked: it needs a NIfTI input (the map takes its affine) and a NIfTI name."""
    if option is None:
        return DEFAULT_NIFTI
    if not any(nifti_inputs):
        raise UsageError(
            f"--nifti {option}: the NIfTI map takes a NIfTI input's affine, and no input is a .nii or "
            ".nii.gz file; use --npy for the map's values"
        )
    if option == "-":
        raise UsageError("--nifti needs a file path (a NIfTI file is binary; use --json - for stdout)")
    return option


def _nifti_path(option: str, stem: str, count: int) -> Path:
    path = _output_path(option, stem, ".nii.gz", count, "--nifti")
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise UsageError(f"--nifti {option}: gives {path}, and NIfTI files end in .nii or .nii.gz")
    return path


def _check_writable_place(path: Path) -> None:
    """Fail before a long run when an output's folder cannot take it (missing folders are made later)."""
    parent = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), Path("."))
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {parent}")


def _new_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the old file's, or the umask's for a new one."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary path beside ``path`` (same extension, so writers pick the format from it) that
    replaces ``path`` in one step once the block succeeds, and is removed if it fails."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(descriptor)
    try:
        yield temporary
        os.chmod(temporary, _new_file_mode(path))
        os.replace(temporary, path)
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _writing(path, write) -> None:
    """Run ``write(temporary path)`` and move the file onto ``path`` when it is complete, so that a
    failure midway (a full disk, Ctrl-C) leaves no truncated file and an older one intact. OS and
    format errors become one-line OutputErrors naming the file."""
    target = Path(os.path.realpath(path))  # through a symlink, as a plain write would go
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _replacing(target) as temporary:
            write(temporary)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a picture format matplotlib does not know
        raise OutputError(f"cannot write {path}: {exc}") from None


def _numpy_values(values: torch.Tensor):
    """The map as a NumPy array in its own dtype; bfloat16, which NumPy lacks, as float32 (exact)."""
    values = values.detach().cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def _json_values(values: torch.Tensor) -> list:
    """Nested lists of floats for JSON, one level per axis; cells without a value (NaN) become null."""
    return _finite_or_null(values.detach().cpu().double().tolist())


def _finite_or_null(values):
    if isinstance(values, list):
        return [_finite_or_null(v) for v in values]
    return values if math.isfinite(values) else None
