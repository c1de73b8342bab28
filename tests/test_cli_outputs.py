"""``kfx explain`` / ``kfx demo`` outputs: written whole or not at all, and drawn for every float dtype."""

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

import kfx
from kfx import cli
from kfx.models import load_model
from tests import cli_helpers
from tests.cli_helpers import SIZE, TINY, assert_one_line_error, run

image_file, in_tmp_path = cli_helpers.image_file, cli_helpers.in_tmp_path  # fixtures

OLD = b"an older file, complete"


def explain(capsys, image_file, *options):
    """``kfx explain`` of the tiny model: a 7x7 map (patch 8, stride 4 on 32x32)."""
    return run(
        capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8", "--stride", "4", *options
    )


# -- a write that fails midway ----------------------------------------------------------------------


def _half_then(error: BaseException):
    """A writer that puts half a file at the path it is given, then fails (a full disk, Ctrl-C)."""

    def write(path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"truncated")
        raise error

    return write


def _patch_writer(monkeypatch, output: str, error: BaseException) -> None:
    """Make the writer of one output (picture, npy or json) fail midway."""
    if output == "picture":
        from matplotlib.figure import Figure

        monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: _half_then(error)(path))
    elif output == "npy":
        monkeypatch.setattr(np, "save", _half_then(error))
    else:
        monkeypatch.setattr("pathlib.Path.write_text", lambda self, *a, **kw: _half_then(error)(self))


OUTPUTS = {"picture": "map.png", "npy": "map.npy", "json": "map.json"}
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("output", sorted(OUTPUTS))
@pytest.mark.parametrize("older_file", [False, True], ids=["new", "replacing"])
def test_a_write_that_fails_midway_leaves_no_partial_file(
    capsys, monkeypatch, image_file, tmp_path, output, older_file
):
    target = tmp_path / OUTPUTS[output]
    if older_file:
        target.write_bytes(OLD)
    before = set(os.listdir(tmp_path))
    _patch_writer(monkeypatch, output, DISK_FULL)
    code, _, err = explain(
        capsys, image_file, "--out", "map.png", "--npy", "map.npy", "--json", "map.json", "-q"
    )
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, f"cannot write {OUTPUTS[output]}", os.strerror(errno.ENOSPC))
    if older_file:
        assert target.read_bytes() == OLD
    else:
        assert not target.exists()
    # the outputs written before the failing one are whole; no temporary file is left anywhere
    left = set(os.listdir(tmp_path)) - before
    assert all(not name.startswith(".") for name in left), left
    assert left <= set(OUTPUTS.values())


def test_ctrl_c_while_writing_leaves_no_partial_file_and_exits_130(capsys, monkeypatch, image_file, tmp_path):
    (tmp_path / "map.npy").write_bytes(OLD)
    _patch_writer(monkeypatch, "npy", KeyboardInterrupt())
    code, _, err = explain(capsys, image_file, "--npy", "map.npy", "-q")
    assert code == cli.EXIT_INTERRUPTED
    assert_one_line_error(err, "interrupted")
    assert (tmp_path / "map.npy").read_bytes() == OLD
    assert sorted(os.listdir(tmp_path)) == ["map.npy", "photo.png", "photo_kfx.png"]


def test_a_failing_gallery_write_leaves_no_partial_file(capsys, monkeypatch, tmp_path):
    (tmp_path / "g.png").write_bytes(OLD)
    _patch_writer(monkeypatch, "picture", DISK_FULL)
    photo = ["--photos", "chelsea", "--naive-positions", "2"]
    code, _, err = run(capsys, "demo", "--quick", "--model", TINY, *photo, "--out", "g.png", "-q")
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "cannot write g.png")
    assert os.listdir(tmp_path) == ["g.png"] and (tmp_path / "g.png").read_bytes() == OLD


def test_written_files_get_the_usual_permissions(capsys, image_file, tmp_path):
    """A temporary file is private (0600); the file it becomes must not be."""
    older = tmp_path / "old.npy"
    older.write_bytes(OLD)
    older.chmod(0o640)
    umask = os.umask(0o022)
    try:
        code, _, err = explain(capsys, image_file, "--json", "m.json", "--npy", "old.npy")
    finally:
        os.umask(umask)
    assert code == cli.EXIT_OK, err
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "photo_kfx.png").stat().st_mode) == 0o644
    assert stat.S_IMODE(older.stat().st_mode) == 0o640  # an existing file keeps its own
    assert np.load(older).shape == (7, 7)


def test_an_output_through_a_symlink_writes_the_linked_file(capsys, image_file, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "m.json").write_bytes(OLD)
    (tmp_path / "link.json").symlink_to(tmp_path / "real" / "m.json")
    code, _, err = explain(capsys, image_file, "--json", "link.json")
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads((tmp_path / "real" / "m.json").read_text())["grid"] == [7, 7]


# -- half-precision maps --------------------------------------------------------------------------------


HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture
def float32_heatmap(image_file):
    from kfx.models import read_pixels

    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(image_file)), 32)
    return kfx.compile(loaded.model, (3, 32, 32), kfx.Patch(8, stride=4))(image), image


def _as(heatmap: kfx.Heatmap, dtype: torch.dtype) -> kfx.Heatmap:
    from dataclasses import replace

    return replace(heatmap, values=heatmap.values.to(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_maps_plot_like_their_float32_values(float32_heatmap, dtype):
    """The oracle: the same (rounded) values drawn as float32."""
    from matplotlib.figure import Figure

    from kfx import plot

    heatmap, image = float32_heatmap
    half = _as(heatmap, dtype)
    rounded = _as(half, torch.float32)
    half_ax = plot.plot(half, image.to(dtype), ax=Figure().add_subplot())
    float_ax = plot.plot(rounded, image, ax=Figure().add_subplot())
    half_map, float_map = half_ax.get_images()[1], float_ax.get_images()[1]  # [0]: the photo
    assert half_map.get_clim() == float_map.get_clim()
    assert np.array_equal(half_map.get_array(), float_map.get_array())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_maps_save_and_give_pixels(float32_heatmap, tmp_path, dtype):
    from kfx import plot

    heatmap, image = float32_heatmap
    half = _as(heatmap, dtype)
    half.save(tmp_path / "map.png", image.to(dtype), label="a class")
    plot.gallery([(half, image.to(dtype), "a class", "photo")], tmp_path / "gallery.png")
    plot.save_mask(torch.rand(32, 32).to(dtype), tmp_path / "mask.png", image.to(dtype))
    for name in ("map.png", "gallery.png", "mask.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    pixels = half.to_pixels()
    expected = _as(half, torch.float64).to_pixels()  # the same values, in float64
    assert pixels.dtype == dtype and pixels.shape == (32, 32)
    assert torch.equal(pixels, expected.to(dtype))


@pytest.fixture
def half_models(tmp_path, monkeypatch):
    """A module ``half_models`` in tmp_path: the tiny CLI model in float16 and in bfloat16."""
    (tmp_path / "half_models.py").write_text(
        "import torch\n"
        "from cli_models import tiny\n"
        "def float16(): return tiny().to(torch.float16)\n"
        "def bfloat16(): return tiny().to(torch.bfloat16)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("method", ["occlusion", "neuromask"])
def test_a_half_precision_model_writes_every_output(capsys, image_file, tmp_path, half_models, dtype, method):
    name = str(dtype).removeprefix("torch.")
    options = ["--patch", "8"] if method == "occlusion" else ["--steps", "2"]
    code, _, err = run(
        capsys, "explain", image_file, "--model", f"half_models:{name}", *SIZE, "--method", method,
        *options, "--npy", "m.npy", "--json", "m.json",
    )  # fmt: skip
    if method == "neuromask" and dtype == torch.float16 and code != cli.EXIT_OK:
        # kfx.neuromask's RMSprop in float16 may give NaN: refused, never written with holes
        assert code == cli.EXIT_RUNTIME and not (tmp_path / "m.npy").exists()
        assert_one_line_error(err, "NaN", "float16", "float32")
        return
    assert code == cli.EXIT_OK, err
    saved = np.load(tmp_path / "m.npy")
    assert np.isfinite(saved).all()
    document = json.loads((tmp_path / "m.json").read_text())
    # NumPy has no bfloat16: its values are saved as float32, exactly (every bfloat16 is a float32)
    assert saved.dtype == (np.float16 if dtype == torch.float16 else np.float32)
    assert np.array_equal(saved.astype(np.float64), np.array(document["map"], dtype=np.float64))
    assert (tmp_path / "photo_kfx.png").read_bytes()[:4] == b"\x89PNG"


def test_a_mask_with_nan_is_refused_not_written(capsys, monkeypatch, image_file, tmp_path):
    def nan_mask(model, image, target=None, *, steps=150, seed=0):
        mask = torch.rand(image.shape[-2:])
        mask[3, 4] = float("nan")
        return mask

    monkeypatch.setattr(kfx, "neuromask", nan_mask)
    options = ["--method", "neuromask", "--json", "m.json"]
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, *options)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "photo.png", "NaN")
    assert sorted(os.listdir(tmp_path)) == ["photo.png"]
