"""``kfx explain`` on signals and volumes: .npy arrays of every rank and NIfTI scans.

Oracles: the map a compiled engine gives for the same array in Python (and, for one signal and one
volume, brute force: ``kfx.naive_heatmap``, one full forward pass per position); the input's own
NIfTI affine; the picture's size from its figure size; the one-line error for each bad input.
"""

import gzip
import json
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

import kfx
from kfx import plot_nd
from tests import cli_helpers, cli_models
from tests.cli_helpers import assert_one_line_error, run

in_tmp_path = cli_helpers.in_tmp_path  # an autouse fixture

REPO = Path(__file__).resolve().parents[1]
SIGNAL = "cli_models:tiny_signal"  # Conv1d, 2 channels, 3 classes
VOLUME = "cli_models:tiny_volume"  # Conv3d, 1 channel, 2 classes
DPI = 100  # the pictures' resolution: kfx.plot_nd's default


def _signal() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)


def _volume() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 8, 10, 12)).astype(np.float32)


def _engine_map(model: torch.nn.Module, x: np.ndarray, patch: kfx.Patch) -> kfx.Heatmap:
    tensor = torch.from_numpy(np.ascontiguousarray(x)).float()
    return kfx.compile(model, tuple(tensor.shape), patch)(tensor)


def _picture_size(path) -> tuple[int, int]:
    with Image.open(path) as picture:
        return picture.size


def _inches_to_pixels(figsize) -> tuple[int, int]:
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


def _rotated_affine() -> np.ndarray:
    """A scanner affine with a rotation, anisotropic voxels and an offset: nothing a default gives."""
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


def _write_nifti(path, values: np.ndarray, affine: np.ndarray) -> None:
    nibabel.save(nibabel.Nifti1Image(values, affine), str(path))


# -- maps: the same as the engine's, written where they should be ------------------------------------


def test_a_signal_npy_gives_the_engine_map_a_line_plot_and_json(capsys):
    x = _signal()
    np.save("ecg.npy", x)
    code, out, err = run(
        capsys, "explain", "ecg.npy", "--model", SIGNAL, "--patch", "8", "--stride", "4",
        "--npy", "map.npy", "--json", "map.json",
    )  # fmt: skip
    assert code == 0, err
    patch = kfx.Patch(8, stride=4)
    expected = _engine_map(cli_models.tiny_signal(), x, patch)
    naive = kfx.naive_heatmap(cli_models.tiny_signal(), torch.from_numpy(x), patch, expected.target)
    written = np.load("map.npy")
    assert written.shape == (9,)  # (40 - 8) / 4 + 1 positions
    np.testing.assert_array_equal(written, expected.values.numpy())
    np.testing.assert_allclose(written, naive.values.numpy(), rtol=0, atol=1e-6)
    document = json.loads(Path("map.json").read_text())
    assert document["input_shape"] == [2, 40]
    assert document["grid"] == [9] and document["patch"] == [8] and document["stride"] == [4]
    np.testing.assert_allclose(document["map"], expected.values.double().numpy(), rtol=0, atol=1e-7)
    assert _picture_size("ecg_kfx.png") == _inches_to_pixels(plot_nd.SIGNAL_FIGSIZE)
    assert "ecg.npy: class" in out and "ecg_kfx.png" in out


def test_a_volume_npy_gives_the_engine_map_and_three_slices(capsys):
    x = _volume()
    np.save("volume.npy", x)
    code, _, err = run(
        capsys, "explain", "volume.npy", "--model", VOLUME, "--patch", "4x4x6", "--stride", "2",
        "--npy", "map.npy", "-q",
    )  # fmt: skip
    assert code == 0, err
    patch = kfx.Patch((4, 4, 6), stride=2)
    expected = _engine_map(cli_models.tiny_volume(), x, patch)
    naive = kfx.naive_heatmap(cli_models.tiny_volume(), torch.from_numpy(x), patch, expected.target)
    written = np.load("map.npy")
    assert written.shape == (3, 4, 4)
    np.testing.assert_array_equal(written, expected.values.numpy())
    np.testing.assert_allclose(written, naive.values.numpy(), rtol=0, atol=1e-6)
    assert _picture_size("volume_kfx.png") == _inches_to_pixels(plot_nd.VOLUME_FIGSIZE)


def test_a_2d_npy_is_the_model_input_as_it_is(capsys):
    """[C, H, W] arrays are not resized nor normalised (pictures are): the map is the engine's on them."""
    x = np.random.default_rng(2).standard_normal((3, 20, 24)).astype(np.float32)
    np.save("image.npy", x)
    code, _, err = run(
        capsys, "explain", "image.npy", "--model", cli_helpers.TINY, "--patch", "8", "--stride", "4",
        "--npy", "map.npy", "-q",
    )  # fmt: skip
    assert code == 0, err
    expected = _engine_map(cli_models.tiny(), x, kfx.Patch(8, stride=4))
    np.testing.assert_array_equal(np.load("map.npy"), expected.values.numpy())
    assert Path("image_kfx.png").exists()


def test_integer_arrays_are_cast_to_the_model_dtype(capsys):
    x = np.random.default_rng(3).integers(0, 4000, (1, 8, 8, 8)).astype(np.uint16)
    np.save("counts.npy", x)
    code, _, err = run(capsys, "explain", "counts.npy", "--model", VOLUME, "--patch", "4", "--npy", "map.npy")
    assert code == 0, err
    expected = _engine_map(cli_models.tiny_volume(), x.astype(np.float32), kfx.Patch(4))
    np.testing.assert_array_equal(np.load("map.npy"), expected.values.numpy())


def test_a_nifti_scan_gives_a_per_voxel_map_with_its_affine(capsys):
    """The NIfTI map is to_pixels() of the engine's map on the scan's scaled values, laid out on the
    scan's own voxel grid (same affine, same voxel sizes), so a viewer puts it over the scan."""
    affine = _rotated_affine()
    stored = np.random.default_rng(4).integers(-300, 300, (8, 10, 12)).astype(np.int16)
    scan = nibabel.Nifti1Image(stored, affine)
    scan.header.set_slope_inter(0.5, 10.0)  # the values the model sees are stored * 0.5 + 10
    nibabel.save(scan, "scan.nii.gz")
    code, out, err = run(capsys, "explain", "scan.nii.gz", "--model", VOLUME, "--patch", "4", "--stride", "2")
    assert code == 0, err
    values = stored.astype(np.float64) * 0.5 + 10.0
    expected = _engine_map(cli_models.tiny_volume(), values[None], kfx.Patch(4, stride=2))
    written = nibabel.load("scan_kfx.nii.gz")
    reread = nibabel.load("scan.nii.gz")
    np.testing.assert_array_equal(written.affine, reread.affine)
    np.testing.assert_allclose(written.affine, affine, rtol=0, atol=1e-6)
    assert written.header.get_zooms() == reread.header.get_zooms()
    assert written.header.get_data_dtype() == np.float32
    assert written.shape == (8, 10, 12)
    np.testing.assert_allclose(written.get_fdata(), expected.to_pixels().double().numpy(), rtol=0, atol=1e-7)
    assert gzip.decompress(Path("scan_kfx.nii.gz").read_bytes())  # .nii.gz is gzip-compressed
    assert _picture_size("scan_kfx.png") == _inches_to_pixels(plot_nd.VOLUME_FIGSIZE)
    assert "scan.nii.gz: class" in out and "scan_kfx.nii.gz" in out


def test_nifti_output_paths_follow_the_other_outputs(capsys):
    _write_nifti("a.nii", _volume()[0], np.eye(4))
    _write_nifti("b.nii.gz", _volume()[0] * 2, np.eye(4))
    code, _, err = run(capsys, "explain", "a.nii", "b.nii.gz", "--model", VOLUME, "--patch", "4",
                       "--nifti", "maps/{stem}.nii", "--out", "maps/", "-q")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in Path("maps").iterdir()) == ["a.nii", "a_kfx.png", "b.nii", "b_kfx.png"]
    assert nibabel.load("maps/b.nii").shape == (8, 10, 12)


def test_a_4d_nifti_takes_its_last_axis_as_channels(capsys):
    """[X, Y, Z, 1] is the same one-channel volume as [X, Y, Z]: the same map."""
    volume = _volume()[0]
    _write_nifti("three.nii.gz", volume, np.eye(4))
    _write_nifti("four.nii.gz", volume[..., None], np.eye(4))
    code, _, err = run(capsys, "explain", "three.nii.gz", "four.nii.gz", "--model", VOLUME, "--patch", "4",
                       "--npy", "{stem}.npy", "-q")  # fmt: skip
    assert code == 0, err
    np.testing.assert_array_equal(np.load("four.npy"), np.load("three.npy"))
    assert nibabel.load("four_kfx.nii.gz").shape == (8, 10, 12)


def test_arrays_of_different_shapes_in_one_command(capsys):
    """Each shape gets its own engine: both maps are the engine's for their array."""
    small, large = _volume()[:, :6, :8, :8], _volume()
    np.save("small.npy", small)
    np.save("large.npy", large)
    code, _, err = run(capsys, "explain", "small.npy", "large.npy", "--model", VOLUME, "--patch", "4",
                       "--npy", "{stem}_map.npy", "-q")  # fmt: skip
    assert code == 0, err
    for name, x in (("small", small), ("large", large)):
        expected = _engine_map(cli_models.tiny_volume(), x, kfx.Patch(4))
        np.testing.assert_array_equal(np.load(f"{name}_map.npy"), expected.values.numpy())


# -- the README's examples --------------------------------------------------------------------------


def test_the_readme_signal_example_runs(capsys, monkeypatch):
    """examples/models_nd.py writes ecg.npy; its ecg_cnn explains it, as brute force does."""
    monkeypatch.syspath_prepend(str(REPO))
    from examples import models_nd

    np.save("ecg.npy", models_nd.synthetic_ecg())
    spec = "examples.models_nd:ecg_cnn"
    options = ("--patch", "50", "--stride", "25", "--npy", "map.npy", "-q")
    code, _, err = run(capsys, "explain", "ecg.npy", "--model", spec, *options)
    assert code == 0, err
    x = torch.from_numpy(np.load("ecg.npy"))
    naive = kfx.naive_heatmap(models_nd.ecg_cnn(), x, kfx.Patch(50, stride=25))
    np.testing.assert_allclose(np.load("map.npy"), naive.values.numpy(), rtol=0, atol=1e-6)
    assert _picture_size("ecg_kfx.png") == _inches_to_pixels(plot_nd.SIGNAL_FIGSIZE)


def test_the_readme_volume_example_model_runs(capsys, monkeypatch):
    """MONAI's resnet10 from examples/models_nd.py on a small scan (the README's is 32^3)."""
    monkeypatch.syspath_prepend(str(REPO))
    from examples import models_nd

    scan = models_nd.synthetic_scan(16)
    _write_nifti("scan.nii.gz", scan, np.diag([2.0, 2.0, 2.5, 1.0]))
    spec = "examples.models_nd:volume_resnet10"
    code, _, err = run(
        capsys, "explain", "scan.nii.gz", "--model", spec, "--patch", "8", "--stride", "8", "-q"
    )
    assert code == 0, err
    model, x = models_nd.volume_resnet10(), torch.from_numpy(scan[None])
    # 8 positions: brute force is cheap. The patch per axis says [1, 16, 16, 16] is one volume.
    naive = kfx.naive_heatmap(model, x, kfx.Patch((8, 8, 8), stride=8))
    written = nibabel.load("scan_kfx.nii.gz")
    np.testing.assert_allclose(written.get_fdata(), naive.to_pixels().double().numpy(), rtol=0, atol=1e-6)
    assert written.header.get_zooms() == (2.0, 2.0, 2.5)


# -- bad inputs: one line, the right exit status ----------------------------------------------------


def _garbage(path: str) -> str:
    Path(path).write_bytes(b"this is not an array at all" * 4)
    return path


def _saved(path: str, values) -> str:
    np.save(path, values, allow_pickle=True)
    return path


def _nifti(path: str, values) -> str:
    _write_nifti(path, values, np.eye(4))
    return path


RUNTIME_ERRORS = {
    "missing file": (lambda: "absent.npy", VOLUME, ["absent.npy: no such file"]),
    "not a .npy file": (
        lambda: _garbage("bad.npy"),
        VOLUME,
        ["bad.npy: cannot read it as a NumPy .npy array"],
    ),
    "not a NIfTI file": (
        lambda: _garbage("bad.nii.gz"),
        VOLUME,
        ["bad.nii.gz: cannot read it as a NIfTI image"],
    ),
    "object array": (
        lambda: _saved("objects.npy", np.array([{"a": 1}], dtype=object)),
        VOLUME,
        ["objects.npy: cannot read it as a NumPy .npy array", "ValueError"],
    ),
    "no channel axis": (lambda: _saved("flat.npy", np.zeros(40, np.float32)), SIGNAL, ["[C, L]", "[1, L]"]),
    "too many axes": (
        lambda: _saved("five.npy", np.zeros((1, 2, 4, 4, 4), np.float32)),
        VOLUME,
        ["[C, D, H, W]"],
    ),
    "NaN values": (
        lambda: _saved("nan.npy", np.full((1, 8, 8, 8), np.nan, np.float32)),
        VOLUME,
        ["nan.npy", "NaN or infinite"],
    ),
    "strings": (
        lambda: _saved("text.npy", np.array([["a", "b"]])),
        VOLUME,
        ["dtype <U1", "not a model input"],
    ),
    "volume for a 1-D model": (
        lambda: _saved("volume.npy", _volume()),
        SIGNAL,
        [
            "first layer is Conv1d, for 1 spatial axes",
            "volume.npy is a volume [C, D, H, W] of shape [1, 8, 10, 12]",
        ],
    ),
    "signal for a 3-D model": (
        lambda: _saved("ecg.npy", _signal()),
        VOLUME,
        ["first layer is Conv3d, for 3 spatial axes", "ecg.npy is a signal [C, L]"],
    ),
    "channels last": (
        lambda: _saved("last.npy", np.zeros((8, 10, 12, 4), np.float32)),
        VOLUME,
        ["takes 1 channels and last.npy has 8", "channels first"],
    ),
    "two-channel 4-D NIfTI": (
        lambda: _nifti("two.nii.gz", np.zeros((8, 8, 8, 2), np.float32)),
        VOLUME,
        ["takes 1 channels and two.nii.gz has 2"],
    ),
    "6-D NIfTI": (
        lambda: _nifti("six.nii", np.zeros((4, 4, 4, 2, 1, 1), np.float32)),
        VOLUME,
        ["six.nii: a NIfTI image of shape [4, 4, 4, 2, 1, 1]"],
    ),
}


@pytest.mark.parametrize("case", RUNTIME_ERRORS)
def test_a_bad_array_is_one_line_and_exit_1(capsys, case):
    make, model, fragments = RUNTIME_ERRORS[case]
    code, _, err = run(capsys, "explain", make(), "--model", model, "--patch", "4")
    assert code == 1
    assert_one_line_error(err, *fragments)
    assert not list(Path(".").glob("*_kfx*"))


USAGE_ERRORS = {
    "--size on arrays": (["--size", "32"], ["--size resizes pictures"]),
    "a 2-D patch on a volume": (
        ["--patch", "4x4"],
        ["--patch 4x4 gives 2 axes", "volume [C, D, H, W]", "DxHxW"],
    ),
    "a 2-D stride on a volume": (["--patch", "4", "--stride", "2x2"], ["--stride 2x2 gives 2 axes"]),
    "an RGB fill on one channel": (
        ["--patch", "4", "--fill", "0,0,0"],
        ["--fill 0.0,0.0,0.0 gives 3 values", "1 channel"],
    ),
    "a patch larger than the volume": (["--patch", "9"], ["--patch 9", "larger than the image 8x10x12"]),
    "neuromask on a volume": (["--method", "neuromask"], ["--method neuromask explains images", "volume"]),
    "--nifti for a .npy input": (
        ["--patch", "4", "--nifti", "map.nii.gz"],
        ["--nifti map.nii.gz", "no input is a .nii"],
    ),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_a_picture_option_on_a_volume_is_a_usage_error(capsys, case):
    options, fragments = USAGE_ERRORS[case]
    np.save("volume.npy", _volume())
    code, _, err = run(capsys, "explain", "volume.npy", "--model", VOLUME, *options)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not list(Path(".").glob("*_kfx*"))


def test_nifti_names_for_nifti_output_only(capsys):
    _write_nifti("scan.nii.gz", _volume()[0], np.eye(4))
    code, _, err = run(
        capsys, "explain", "scan.nii.gz", "--model", VOLUME, "--patch", "4", "--nifti", "map.png"
    )
    assert code == 2
    assert_one_line_error(err, "--nifti map.png", "end in .nii or .nii.gz")


def test_nifti_without_nibabel_says_what_to_install(capsys, monkeypatch):
    _write_nifti("scan.nii.gz", _volume()[0], np.eye(4))
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    code, _, err = run(capsys, "explain", "scan.nii.gz", "--model", VOLUME, "--patch", "4")
    assert code == 2
    assert_one_line_error(err, "scan.nii.gz", "nibabel", 'pip install "kfx[medical]"')


def test_a_bad_patch_text_names_every_form(capsys):
    np.save("volume.npy", _volume())
    code, _, err = run(capsys, "explain", "volume.npy", "--model", VOLUME, "--patch", "4x4x4x4")
    assert code == 2
    assert_one_line_error(err, "N, HxW or DxHxW")


@pytest.mark.parametrize("fill", ["mean_patch", "mean_image", "blur"])
def test_a_position_dependent_fill_by_name(capsys, fill):
    """--fill mean_patch|mean_image|blur is kfx.Patch(fill=name): the same map as the engine's, and
    for mean_patch the same as brute force with the window's mean painted in by hand."""
    x = _signal()
    np.save("ecg.npy", x)
    code, out, err = run(
        capsys, "explain", "ecg.npy", "--model", SIGNAL, "--patch", "8", "--stride", "4", "--fill", fill,
        "--npy", "map.npy", "--json", "map.json",
    )  # fmt: skip
    assert code == 0, err
    model = cli_models.tiny_signal()
    expected = _engine_map(model, x, kfx.Patch(8, stride=4, fill=fill)).values
    assert torch.equal(torch.from_numpy(np.load("map.npy")), expected)
    assert json.loads(Path("map.json").read_text())["fill"] == kfx.Patch(8, fill=fill).fill.name()
    if fill == "mean_patch":
        signal = torch.from_numpy(x)
        probabilities = []
        for start in range(0, 40 - 8 + 1, 4):
            occluded = signal.clone()
            occluded[:, start : start + 8] = signal[:, start : start + 8].mean(dim=1, keepdim=True)
            probabilities.append(torch.softmax(model(occluded[None]), 1)[0])
        target = int(model(signal[None]).argmax())
        assert torch.allclose(expected, torch.stack(probabilities)[:, target], atol=1e-6)


def test_an_unknown_fill_name_is_a_usage_error(capsys):
    np.save("ecg.npy", _signal())
    code, out, err = run(capsys, "explain", "ecg.npy", "--model", SIGNAL, "--fill", "gray")
    assert code == 2
    assert "mean_patch" in err and "gray" in err
