"""Occlusion maps for whole datasets, resumable: :func:`explain_dataset` and :func:`read_results`.

>>> summary = kfx.explain_dataset("photos/", "efficientnet-lite0", 16, "maps/")  # doctest: +SKIP
>>> table = kfx.read_results("maps/")              # a pandas DataFrame, one row per input  # doctest: +SKIP
>>> kfx.dataset.heatmap(table.iloc[0]).save("first.png")  # doctest: +SKIP
>>> kfx.explain_dataset("photos/", "efficientnet-lite0", 16, "maps/", drill_down=kfx.DrillDown(3), png=True)  # doctest: +SKIP

Images are read and resized as ``kfx explain`` reads them (kfx.cli.images); one engine is compiled
per run, before any image, so a model or patch that cannot work fails before any work. Results go
to Parquet parts under ``OUT/config-<fingerprint>/`` (kfx/_dataset_io.py), each renamed into place
when whole. A rerun with the same configuration skips inputs that have an ``ok`` row (same path,
same content hash, same requested target) and retries error rows. ``drill_down`` computes every
map approximately (kfx.DrillDown, part of the fingerprint); ``png`` and ``npy`` add per-image files
as ``kfx explain`` writes them (kfx/_dataset_files.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kfx import _dataset_io as io
from kfx._dataset_explain import Explainer, Setup
from kfx._dataset_files import IMAGES_FOLDER, SUFFIXES, ImageFiles, file_stem, row_heatmap
from kfx.errors import InputError, PatchError
from kfx.patch import Patch
from kfx.results import Heatmap

__all__ = [
    "explain_dataset",
    "read_results",
    "heatmap",
    "image_files",
    "DatasetSummary",
    "DatasetInterrupted",
]

RUNNERS = ("local", "ray")
PART_ROWS = 16  # a part is written after this many results ...
PART_SECONDS = 30.0  # ... or this long after the previous one, whichever comes first


# -- one run: counts, parts, summary -----------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSummary:
    """What a run did. ``folder`` holds this configuration's parts; ``failures`` lists its error rows."""

    folder: Path
    fingerprint: str
    total: int  # distinct inputs in the source
    done: int  # explained in this run
    skipped: int  # already had an ok row
    failed: int  # error rows written in this run
    duplicates: int  # repeated (path, target) pairs in the source, explained once
    failures: Path | None
    seconds: float
    images: Path | None = None  # the per-image files' folder (png=True or npy=True)
    files_written: int = 0  # inputs whose per-image files this run wrote

    def __str__(self) -> str:
        text = (
            f"{self.done} explained, {self.skipped} skipped (already in {self.folder}), "
            f"{self.failed} failed of {self.total} inputs in {self.seconds:.1f} s"
        )
        if self.duplicates:
            text += f"; {self.duplicates} repeated entries of the source were explained once"
        if self.images is not None:
            text += f"; files of {self.files_written} inputs written to {self.images}"
        if self.failures is not None:
            text += f"; failures are listed in {self.failures} (rows with status 'error')"
        return text


class DatasetInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`explain_dataset`, after every finished result was written; ``.summary``."""

    def __init__(self, summary: DatasetSummary):
        super().__init__(str(summary))
        self.summary = summary


@dataclass
class Recorder:
    """Collects finished rows, writes them as parts, counts what happened."""

    folder: Path
    part_rows: int
    part_seconds: float
    files: ImageFiles | None = None  # per-image files, written as each ok row arrives
    done: int = 0
    skipped: int = 0
    failed: int = 0
    files_written: int = 0
    rows: list = field(default_factory=list)
    last_write: float = field(default_factory=time.monotonic)

    def skip(self) -> None:
        self.skipped += 1

    def record(self, row: dict) -> None:
        if self.files is not None:
            if row["status"] == "ok":
                self.write_files(row)
            else:  # the files show each input's latest row: an earlier content's map is gone
                self.files.remove(row["path"], row["requested_target"])
        self.rows.append(row)
        if row["status"] == "ok":
            self.done += 1
        else:
            self.failed += 1
        if len(self.rows) >= self.part_rows or time.monotonic() - self.last_write >= self.part_seconds:
            self.flush()

    def write_files(self, row) -> None:
        self.files.write(row)
        self.files_written += 1

    def flush(self) -> None:
        if self.rows:
            io.write_part(self.folder, self.rows)
            self.rows = []
        self.last_write = time.monotonic()


def _run_local(setup: Setup, items: list[io.Item], done_keys: set, recorder: Recorder, progress: bool):
    """Explain the pending items in this process. Consecutive pending items run in groups of
    ``explainer.group_size`` (small images: positions of several images share a batch); each
    still gets its own row, a bad one its own error row."""
    from kfx.common import progress_bar

    explainer = Explainer(setup)
    size = explainer.group_size
    bar = progress_bar("kfx batch", total=len(items), show=progress, unit="img", file=sys.stderr)
    group: list[tuple[io.Item, str | None]] = []

    def run_group() -> None:
        for row in explainer.explain_many(group):
            recorder.record(row)
        bar.update(len(group))
        group.clear()

    try:
        for item in items:
            content, pending = io.hash_if_pending(item, setup.requested(item), done_keys)
            if not pending:
                recorder.skip()
                bar.update()
                continue
            group.append((item, content))
            if len(group) >= size:
                run_group()
        if group:
            run_group()
    finally:
        bar.close()


def _write_failures(folder: Path) -> Path | None:
    """failures.txt: each input whose latest row is an error (tab-separated path and message)."""
    errors = _latest(io.read_parts(folder).to_pandas())
    errors = errors[errors["status"] == "error"]
    path = folder / io.FAILURES_FILE
    if errors.empty:
        path.unlink(missing_ok=True)
        return None
    text = "".join(f"{p}\t{e}\n" for p, e in zip(errors["path"], errors["error"]))
    io.write_atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return path


# -- the entry point ---------------------------------------------------------------------------------


def explain_dataset(
    source,
    model: nn.Module | str,
    patch: Patch | int | tuple[int, int],
    out,
    *,
    runner: str = "local",
    stride=None,
    fill=None,
    tau: float = 1.0,
    drill_down=None,
    png: bool = False,
    npy: bool = False,
    size: int | None = None,
    weights: str | None = None,
    target: int | str | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    labels=None,
    batch_size: int | None = None,
    device: str = "auto",
    part_rows: int = PART_ROWS,
    part_seconds: float = PART_SECONDS,
    progress: bool = False,
    ray_address: str | None = None,
    actors: int | None = None,
    threads: int = 1,
) -> DatasetSummary:
    """Explain every image of ``source`` and write the maps to a Parquet dataset under ``out``.

    Args:
        source: a folder (every image file below it), a glob (``"photos/**/*.jpg"``), a ``.txt``
            manifest (one path per line) or ``.csv`` (``path[,target]``, with or without a header),
            a ``.parquet`` table with a ``path`` (and optionally ``target``) column, or a list of
            paths. Relative paths in a manifest are taken from the manifest's folder.
        model: an ``nn.Module`` in eval mode, or a model spec as ``kfx explain --model`` takes it
            (``"efficientnet-lite0"``, ``"torchvision:resnet18"``, ``"package.module:factory"``).
        patch: a :class:`kfx.Patch` (float or per-channel fill), an int or ``(h, w)``; ``stride``
            and ``fill`` then complete it (defaults: a quarter of the patch, 0.0).
        out: the output folder; created if missing, and refused (before any work) when not writable.
        runner: ``"local"`` (this process) or ``"ray"`` (an actor pool, :mod:`kfx._dataset_ray`).
        tau: projective-field threshold (1 = exact), as in :func:`kfx.compile`.
        drill_down: a :class:`kfx.DrillDown`: every map computed approximately from fewer
            queries, as ``engine(image, drill_down=...)`` computes it. Its settings are part of the
            configuration (its own folder, never mixed with exact rows); rows say ``approximate``
            and hold the ``measured`` mask (:func:`heatmap` gives it back).
        png, npy: also write, for each ok row, the picture ``kfx explain`` draws (the map over
            the image) and/or the raw map, under ``OUT/config-<fp>/images/<stem>-<hash8>.png|.npy``
            (:func:`image_files` finds them). Inputs already done get them from their stored row.
        size: the model input's side (default: the spec's, else 224); images are resized and
            centre-cropped to it as ``kfx explain`` does.
        weights: a state_dict file for a torchvision or factory spec.
        target: the class to explain for inputs whose source row names none (default: predicted).
        preprocess: for an ``nn.Module``: [3, H, W] pixels in [0, 1] -> the model's input
            (default: ImageNet normalisation, as for factory specs). ``labels``: its class names.
        batch_size, device: engine settings (positions per batch; "auto", "cpu" or "cuda").
        part_rows, part_seconds: a part is written after this many results or this many seconds.
        progress: a tqdm bar of images.
        ray_address, actors, threads: Ray only: the cluster (None: a local Ray in this process
            unless one is running; "auto" or "ray://host:port" to join one), the number of
            explainer actors (default: CPUs // threads) and torch threads per actor.

    Returns:
        A :class:`DatasetSummary`. Ctrl-C writes every finished result, then raises
        :class:`DatasetInterrupted` (a KeyboardInterrupt) with the summary so far.
    """
    started = time.perf_counter()
    if runner not in RUNNERS:
        raise InputError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    for name, value in (("png", png), ("npy", npy)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    for name, value in (("part_rows", part_rows), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    items, duplicates = io.unique(io.list_inputs(source))
    io.check_writable(Path(out))  # before the model loads: a bad folder is reported at once
    setup = _setup(
        model, patch, stride, fill, tau, drill_down, size, weights, target, preprocess, labels,
        batch_size, device,
    )  # fmt: skip
    folder = io.prepare_output(out, setup.config, setup.fingerprint)
    files = _image_files(folder, setup, png, npy)
    done_keys = io.finished_keys(folder)
    recorder = Recorder(folder, part_rows, part_seconds, files)

    def summary() -> DatasetSummary:
        failures = _write_failures(folder)
        return DatasetSummary(
            folder, setup.fingerprint, len(items), recorder.done, recorder.skipped, recorder.failed,
            duplicates, failures, time.perf_counter() - started,
            None if files is None else files.folder, recorder.files_written,
        )  # fmt: skip

    try:
        if runner == "ray":
            from kfx._dataset_ray import run_ray

            run_ray(setup, items, done_keys, recorder, ray_address, actors, threads, progress)
        else:
            _run_local(setup, items, done_keys, recorder, progress)
        recorder.flush()
        _write_missing_files(recorder, setup, items)
    except KeyboardInterrupt:
        recorder.flush()
        raise DatasetInterrupted(summary()) from None
    except io.OutputError:
        raise  # the part that could not be written: nothing more can be saved
    except BaseException:
        recorder.flush()  # whatever went wrong, the finished results are kept
        raise
    recorder.flush()
    return summary()


def _image_files(folder: Path, setup: Setup, png: bool, npy: bool) -> ImageFiles | None:
    kinds = tuple(kind for kind, wanted in (("png", png), ("npy", npy)) if wanted)
    if not kinds:
        return None
    images = folder / IMAGES_FOLDER
    io.check_writable(images)
    return ImageFiles(images, kinds, setup.loaded, setup.size)


def _write_missing_files(recorder: Recorder, setup: Setup, items: list[io.Item]) -> None:
    """Per-image files for inputs whose latest row is ok but whose files are missing (done in an
    earlier run without them, or killed between the row and its files), from the stored rows."""
    files = recorder.files
    if files is None:
        return
    wanted = {
        (item.path, setup.requested(item) or "")
        for item in items
        if files.missing(item.path, setup.requested(item))
    }
    if not wanted:
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    table = io.read_parts(recorder.folder)
    paths = pa.array(sorted({path for path, _ in wanted}), type=pa.string())
    latest = _latest(table.filter(pc.is_in(table["path"], value_set=paths)).to_pandas())
    for _, row in latest.iterrows():
        requested = io._target_text(row["requested_target"])  # pandas: NaN for none
        if row["status"] == "ok" and (row["path"], requested or "") in wanted:
            recorder.write_files(row)


def _setup(
    model, patch, stride, fill, tau, drill_down, size, weights, target, preprocess, labels, batch_size, device
):
    """Load the model, build the patch, and fingerprint the configuration (before any image)."""
    import kfx
    from kfx.models import LoadedModel, _imagenet_normalize, load_model

    if isinstance(model, str) or model is None:
        if preprocess is not None or labels is not None:
            raise InputError("preprocess and labels apply to an nn.Module; a model spec brings its own")
        loaded = load_model(model, weights)
    elif isinstance(model, nn.Module):
        if weights is not None:
            raise InputError("weights applies to a model spec; load them into your nn.Module yourself")
        name = f"{type(model).__module__}.{type(model).__qualname__}"
        if device == "auto":  # the caller's module stays where it is (kfx never moves it to a GPU)
            device = _module_device(model)
        normalize = preprocess or _imagenet_normalize
        loaded = LoadedModel(model, name, normalize, 224, tuple(labels) if labels is not None else None)
    else:
        raise InputError(f"model must be an nn.Module or a model spec string, got {type(model).__name__}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise InputError(f"tau must be a number in (0, 1] (1 = exact), got {tau!r}")
    size = size or loaded.size
    patch = _patch(patch, stride, fill)
    patch.check_fits((size, size))
    _check_drill_down(drill_down, patch)
    default_target = io._target_text(target)
    if default_target is not None:
        loaded.class_index(default_target)  # an unknown label name fails now, not on every row
    fill_values = (
        patch.fill.name()
        if patch.positional
        else [patch.fill]
        if isinstance(patch.fill, float)
        else list(patch.fill)
    )
    normalize = loaded.normalize
    config = {
        "model": loaded.name,
        "weights_sha256": io.weights_hash(loaded.model),
        "preprocess": f"{getattr(normalize, '__module__', '')}.{getattr(normalize, '__qualname__', repr(normalize))}",
        "input_shape": [3, size, size],
        "patch": list(patch.size),
        "stride": list(patch.stride),
        "fill": fill_values,
        "tau": float(tau),
        "kfx_version": kfx.__version__,
    }
    if drill_down is not None:  # exact runs keep the fingerprint they had before drill-down existed
        config["drill_down"] = io.drill_down_settings(drill_down)
    return Setup(
        loaded, patch, size, float(tau), batch_size, device, default_target, config,
        io.fingerprint(config), drill_down,
    )  # fmt: skip


def _check_drill_down(drill_down, patch: Patch) -> None:
    """A kfx.DrillDown that suits this patch, before any image (else every row would fail alike)."""
    from kfx.drilldown import DrillDown

    if drill_down is None:
        return
    if not isinstance(drill_down, DrillDown):
        raise InputError(
            f"drill_down must be a kfx.DrillDown (e.g. kfx.DrillDown(target_speedup=3)), got "
            f"{type(drill_down).__name__}"
        )
    if drill_down.rule != "adaptive":
        drill_down.stage1_strides(patch.stride)  # a stage 1 finer than the grid is refused here


def _module_device(model: nn.Module) -> str:
    from kfx.common import model_dtype_device

    _, device = model_dtype_device(model, default=(torch.get_default_dtype(), torch.device("cpu")))
    return str(device)


def _patch(patch, stride, fill) -> Patch:
    if isinstance(patch, Patch):
        if stride is not None or fill is not None:
            raise InputError("give stride and fill inside the kfx.Patch, or pass patch as an int")
    else:
        patch = Patch(patch, stride=stride, fill=0.0 if fill is None else fill)
    if isinstance(patch.fill, torch.Tensor):
        raise PatchError("datasets take a float fill or one float per channel, not a fill tensor")
    return patch


# -- reading results back ------------------------------------------------------------------------


def _latest(frame):
    """The latest row for each input (path, requested target), sorted by path. Only an edited file
    (new content hash) or a failed one is ever run again, so the latest row is the input's state."""
    if frame.empty:
        return frame
    latest = frame.sort_values("finished_at", ascending=False, kind="stable")
    latest = latest.drop_duplicates(["path", "requested_target"], keep="first")
    return latest.sort_values("path", kind="stable")


def read_results(out, fingerprint: str | None = None, *, history: bool = False):
    """The results under ``out`` as a pandas DataFrame, one row per input (path and requested
    target: its latest row), sorted by path; ``map`` holds 2-D float32 NumPy arrays (None on error
    rows). ``history=True`` returns every row ever written instead (earlier contents of edited
    files, errors later fixed).

    A folder with results of several configurations needs ``fingerprint`` (or a prefix of it):
    rows of different configurations are never mixed. :func:`heatmap` turns a row into a
    :class:`kfx.Heatmap`.
    """
    import numpy as np

    found = io.configurations(Path(out))
    if not found:
        raise InputError(f"{out}: no kfx results here (expected config-*/config.json from explain_dataset)")
    if fingerprint is not None:
        found = [(f, c) for f, c in found if c.get("fingerprint", "").startswith(fingerprint)]
        if len(found) != 1:
            raise InputError(f"{out}: {len(found)} configurations match fingerprint {fingerprint!r}")
    if len(found) > 1:
        listed = "; ".join(_describe(c) for _, c in found)
        raise InputError(
            f"{out} holds results of {len(found)} configurations: {listed}; pass fingerprint= to pick one"
        )
    frame = io.read_parts(found[0][0]).to_pandas()
    frame = (frame if history else _latest(frame)).reset_index(drop=True)
    frame["target"] = frame["target"].astype("Int64")  # error rows have none: pandas' nullable int
    frame["map"] = [
        None if m is None else np.array(m, dtype=np.float32).reshape(tuple(s))
        for m, s in zip(frame["map"], frame["map_shape"])
    ]
    frame["measured"] = [
        None if m is None else np.array(m, dtype=bool).reshape(tuple(s))
        for m, s in zip(frame["measured"], frame["map_shape"])
    ]
    return frame


def _describe(config: dict) -> str:
    return (
        f"{config.get('fingerprint', '?')[:16]} (model {config.get('model')}, patch {config.get('patch')}, "
        f"stride {config.get('stride')}, fill {config.get('fill')}, tau {config.get('tau')}, "
        f"drill-down {config.get('drill_down') or 'none'})"
    )


def heatmap(row) -> Heatmap:
    """A :class:`kfx.Heatmap` from a row of :func:`read_results` (a pandas Series or a dict). A
    drill-down row's has ``measured`` set (so ``approximate`` is True), as the engine's has."""
    if row["status"] != "ok":
        raise InputError(f"{row['path']}: this row is an error ({row['error']}), it has no map")
    return row_heatmap(row)


def image_files(out, row) -> dict[str, Path]:
    """The per-image files (``png=True`` / ``npy=True``) of a row of :func:`read_results` that
    exist, by kind: ``{"png": Path, "npy": Path}``. They hold the input's latest ok map (an input
    whose latest row is an error has none), so for an older row of ``history=True`` they may not
    be that row's."""
    folder = io.config_folder(Path(out), row["fingerprint"]) / IMAGES_FOLDER
    stem = file_stem(row["path"], row["requested_target"])
    found = {kind: folder / f"{stem}{suffix}" for kind, suffix in SUFFIXES.items()}
    return {kind: path for kind, path in found.items() if path.is_file()}
