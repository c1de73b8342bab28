"""What ``kfx.explain_dataset`` reads and writes: the list of inputs, the Parquet parts, the
configuration's fingerprint. No model runs here (see kfx/dataset.py for that).

Layout of an output folder::

    OUT/config-<first 16 hex digits of the fingerprint>/
        config.json          the configuration (model, weights hash, patch, stride, fill, tau, ...)
        part-<ns>-<id>.parquet   whole parts only: each is written beside and renamed into place
        failures.txt         the error rows of that configuration, rewritten at the end of each run
        images/<stem>-<hash8>.png|.npy   per-image files when asked (kfx/_dataset_files.py)
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kfx.cli.common import OutputError
from kfx.errors import InputError, KfxError

CONFIG_PREFIX = "config-"
CONFIG_FILE = "config.json"
FAILURES_FILE = "failures.txt"
PART_GLOB = "part-*.parquet"
MANIFEST_SUFFIXES = (".txt", ".csv")
_GLOB_CHARACTERS = frozenset("*?[")


def _pyarrow():
    """pyarrow and pyarrow.parquet, or a KfxError saying which extra installs them."""
    try:
        import pandas  # noqa: F401  (read_results and the failure list use it)
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise KfxError("datasets need pyarrow and pandas: pip install 'kfx[dataset]'") from None
    return pa, pq


def schema():
    """The Parquet schema of every part (explicit, so a part of error rows only has the same types)."""
    pa, _ = _pyarrow()
    ints, floats = pa.list_(pa.int32()), pa.list_(pa.float64())
    return pa.schema(
        [
            ("path", pa.string()),
            ("content_hash", pa.string()),  # sha256 of the file's bytes; null if it could not be read
            ("fingerprint", pa.string()),  # sha256 of config.json's configuration
            ("requested_target", pa.string()),  # as the source gave it (index or label); null: predicted
            ("target", pa.int64()),
            ("label", pa.string()),
            ("base_probability", pa.float64()),
            ("map", pa.list_(pa.float32())),  # row-major values of map_shape
            ("map_shape", ints),
            ("image_size", ints),  # the model input's (H, W), after resizing and cropping
            ("patch", ints),
            ("stride", ints),
            ("fill", floats),  # one value for every channel, or one per channel
            ("tau", pa.float64()),
            ("drill_down", pa.string()),  # the kfx.DrillDown settings as JSON; null: every cell queried
            ("approximate", pa.bool_()),  # True: a value may differ from full inference (drill-down, tau < 1)
            ("measured", pa.list_(pa.bool_())),  # drill-down: True where the cell was queried, row-major
            ("model", pa.string()),
            ("weights_hash", pa.string()),
            ("kfx_version", pa.string()),
            ("seconds", pa.float64()),
            ("status", pa.string()),  # "ok" or "error"
            ("error", pa.string()),
            ("finished_at", pa.timestamp("us", tz="UTC")),
        ]
    )


# -- the inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One input: an image file and the class to explain (None: the predicted one)."""

    path: str
    target: str | None = None


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    return frozenset(Image.registered_extensions())


def _target_text(value) -> str | None:
    """A manifest's target cell as text: None when empty (explain the predicted class)."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN: an empty cell read by pandas/pyarrow
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _resolved(folder: Path, path: str) -> str:
    """A manifest's path, relative ones taken from the manifest's own folder, made absolute."""
    return os.path.abspath(folder / os.path.expanduser(path.strip()))


def _text_manifest(path: Path) -> list[Item]:
    """One path per line; blank lines and lines starting with # are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Item(_resolved(path.parent, line)) for line in lines if line.strip() and not line.startswith("#")]


def _csv_manifest(path: Path) -> list[Item]:
    """Rows ``path[,target]``, with or without a header row naming the columns path and target."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = [row for row in csv.reader(file) if row and any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    path_column, target_column = 0, 1
    if "path" in header:
        path_column = header.index("path")
        target_column = header.index("target") if "target" in header else None
        rows = rows[1:]
    items = []
    for row in rows:
        target = row[target_column] if target_column is not None and target_column < len(row) else None
        items.append(Item(_resolved(path.parent, row[path_column]), _target_text(target)))
    return items


def _parquet_manifest(path: Path) -> list[Item]:
    """A Parquet table with a ``path`` column (and optionally ``target``)."""
    _, pq = _pyarrow()
    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise InputError(f"{path}: cannot read it as a Parquet table ({type(exc).__name__}: {exc})") from None
    if "path" not in names:
        raise InputError(f"{path}: a Parquet source needs a 'path' column; it has {', '.join(names)}")
    columns = ["path"] + (["target"] if "target" in names else [])
    table = pq.read_table(path, columns=columns).to_pydict()
    targets = table.get("target", [None] * len(table["path"]))
    return [
        Item(_resolved(path.parent, str(p)), _target_text(t))
        for p, t in zip(table["path"], targets)
        if p is not None
    ]


def _folder_images(folder: Path) -> list[Item]:
    """Every image file under ``folder`` (recursive, hidden files and folders skipped), sorted."""
    suffixes = _image_suffixes()
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [
            os.path.join(root, f)
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes
        ]
    return [Item(os.path.abspath(p)) for p in sorted(found)]


def list_inputs(source) -> list[Item]:
    """The inputs SOURCE names: a folder (recursive), a glob, a .txt/.csv manifest, a .parquet table
    with a path column, or a list of paths. Paths come back absolute; an empty source is an error."""
    if isinstance(source, (list, tuple)):
        items = [Item(os.path.abspath(os.fspath(p))) for p in source]
    else:
        items = _list_one(os.fspath(source))
    if not items:
        raise InputError(f"{source}: no images found (image files have extensions such as .jpg, .png)")
    return items


def _list_one(source: str) -> list[Item]:
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return _folder_images(path)
    if path.is_file():
        suffix = path.suffix.lower()
        try:
            if suffix == ".parquet":
                return _parquet_manifest(path)
            if suffix == ".csv":
                return _csv_manifest(path)
            if suffix == ".txt":
                return _text_manifest(path)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{source}: cannot read this manifest ({type(exc).__name__}: {exc})") from None
        if suffix in _image_suffixes():
            return [Item(os.path.abspath(path))]
        raise InputError(
            f"{source}: not a source kfx reads; give a folder, a glob ('photos/**/*.jpg'), a .txt or "
            ".csv list of paths, or a .parquet table with a path column"
        )
    if _GLOB_CHARACTERS & set(source):
        matches = sorted(
            p for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p)
        )
        return [Item(os.path.abspath(p)) for p in matches]
    raise InputError(f"{source}: no such folder or file (and not a glob pattern)")


def unique(items: list[Item]) -> tuple[list[Item], int]:
    """``items`` with repeated (path, target) pairs dropped, in order; and how many were dropped."""
    seen, kept = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            kept.append(item)
    return kept, len(items) - len(kept)


def content_hash(path: str) -> str:
    """sha256 of a file's bytes (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_if_pending(item, requested: str | None, done_keys: set) -> tuple[str | None, bool]:
    """(the file's content hash, whether it still needs a row): None for the hash when the file
    cannot be read (the explainer tries again and writes the error row); not pending when this
    configuration has an ok row for it already."""
    try:
        content = content_hash(item.path)
    except OSError:
        content = None
    return content, row_key(item.path, content, requested) not in done_keys


# -- the configuration ---------------------------------------------------------------------------


def fingerprint(config: dict) -> str:
    """sha256 of the configuration, independent of key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def drill_down_settings(drill_down) -> dict | None:
    """A kfx.DrillDown's settings for the configuration (None: exact maps). Every field that is set
    is kept, so two drill-downs that may give different maps never share a fingerprint."""
    import dataclasses

    if drill_down is None:
        return None
    settings = {f.name: getattr(drill_down, f.name) for f in dataclasses.fields(drill_down)}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in settings.items() if v is not None}


def drill_down_text(settings: dict | None) -> str | None:
    """The drill-down column of a row: the configuration's settings as JSON (null: exact)."""
    return None if settings is None else json.dumps(settings, sort_keys=True)


def weights_hash(model) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_folder(out: Path, fingerprint_hex: str) -> Path:
    return out / f"{CONFIG_PREFIX}{fingerprint_hex[:16]}"


def check_writable(folder: Path) -> None:
    """Make ``folder`` and prove it takes files, before any work. os.access is no proof: root
    ignores permission bits, and a read-only mount or an immutable folder refuses root too."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write results in {folder}: {exc.strerror or exc}; give a writable output folder"
        ) from None


def prepare_output(out, config: dict, fingerprint_hex: str) -> Path:
    """Make OUT/config-<fp>/ with its config.json, proving it is writable before any work."""
    folder = config_folder(Path(out), fingerprint_hex)
    check_writable(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        text = json.dumps({"fingerprint": fingerprint_hex, **config}, indent=2) + "\n"
        write_atomic(config_path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return folder


def write_atomic(path: Path, write) -> None:
    """``write(temporary path)`` beside ``path``, then one rename: a kill leaves whole files only."""
    from kfx.cli.outputs import _writing

    _writing(path, write)


def write_part(folder: Path, rows: list[dict]) -> Path:
    """One Parquet part holding ``rows``, renamed into place when complete."""
    pa, pq = _pyarrow()
    table = pa.Table.from_pylist(rows, schema=schema())
    path = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    try:
        write_atomic(path, lambda p: pq.write_table(table, p))
    except OutputError as exc:
        raise OutputError(
            f"{exc}; the {len(rows)} results of this part are lost, every earlier part is whole: "
            "free space (or fix the folder) and rerun to finish"
        ) from None
    return path


def read_parts(folder: Path):
    """Every part of one configuration as one pyarrow Table (the schema's, empty when none)."""
    pa, pq = _pyarrow()
    tables = []
    for part in sorted(folder.glob(PART_GLOB)):
        try:
            tables.append(pq.read_table(part, schema=schema()))
        except Exception as exc:
            raise OutputError(
                f"{part}: cannot read this results part ({type(exc).__name__}: {exc}); kfx writes parts "
                "whole, so something else changed it: delete it and rerun to compute its rows again"
            ) from None
    return pa.concat_tables(tables) if tables else schema().empty_table()


def row_key(path: str, content: str | None, requested_target: str | None) -> tuple:
    """What makes a row the result for an input, within one configuration."""
    return (path, content, requested_target or "")


def finished_keys(folder: Path) -> set[tuple]:
    """Keys of the inputs this configuration has an ``ok`` row for (error rows are retried)."""
    columns = read_parts(folder).select(["path", "content_hash", "requested_target", "status"]).to_pydict()
    return {
        row_key(p, c, t)
        for p, c, t, s in zip(
            columns["path"], columns["content_hash"], columns["requested_target"], columns["status"]
        )
        if s == "ok"
    }


def configurations(out: Path) -> list[tuple[Path, dict]]:
    """Each configuration folder under OUT with its config.json."""
    found = []
    for folder in sorted(Path(out).glob(f"{CONFIG_PREFIX}*")):
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            found.append((folder, json.loads(config_path.read_text(encoding="utf-8"))))
    return found
