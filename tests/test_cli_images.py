"""``kfx explain`` reads every image mode as the picture a viewer shows.

The oracle for each mode: the RGB uint8 pixels of the same picture (made here from what was saved),
divided by 255, resized and cropped with scikit-image alone, must be the model input, and give the map.
"""

import json
import re

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import kfx
from kfx import cli
from kfx.models import load_model, read_pixels, resize_crop
from tests import cli_helpers
from tests.cli_helpers import TINY

in_tmp_path = cli_helpers.in_tmp_path  # an autouse fixture

SIZE = 32  # the input side, as an int: the oracle resizes to it


def _rgb(height: int = 40, width: int = 48) -> np.ndarray:
    return (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)


def _gray16() -> np.ndarray:
    return (np.random.default_rng(1).random((40, 48)) * 65535).astype(np.uint16)


def _stack(gray: np.ndarray) -> np.ndarray:
    return np.stack([gray] * 3, axis=-1)


def _from_16_bit(values: np.ndarray) -> np.ndarray:
    """8-bit values of a 16-bit picture: the nearest of the 256 levels (no uint16 overflow)."""
    return np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def _gray_16_bit(path):
    gray = _gray16()
    Image.fromarray(gray).save(path)  # Pillow writes mode I;16 as a 16-bit gray PNG
    return _stack(_from_16_bit(gray))


def _rgb_16_bit(path):
    rgb16 = (np.random.default_rng(2).random((40, 48, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(path, rgb16, photometric="rgb")  # Pillow cannot write 16-bit RGB
    return _from_16_bit(rgb16)


def _one_bit(path):
    image = Image.fromarray(_rgb()).convert("1")
    image.save(path)
    return _stack(np.asarray(image).astype(np.uint8) * 255)


def _gray_alpha(path):
    gray = _rgb()[..., 0]
    alpha = np.random.default_rng(3).integers(0, 256, gray.shape, dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], axis=-1)).save(path)
    return _stack(gray)


def _palette(path):
    image = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(path)
    return np.asarray(image.convert("RGB"))  # the palette's colours, as any viewer shows them


def _zero_one_8_bit(path):
    """An 8-bit gray picture that is nearly black: values 0 and 1 out of 255 (not a 0/1 mask)."""
    gray = (_rgb()[..., 0] > 128).astype(np.uint8)
    Image.fromarray(gray).save(path)
    return _stack(gray)


def _cmyk(path):
    rgb = _rgb()
    Image.fromarray(rgb).convert("CMYK").save(path)  # Pillow's CMYK round-trips RGB exactly
    return rgb


def _rotated_by_exif(path):
    """A photo stored sideways with EXIF orientation 6: viewers rotate it 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb()).save(path, exif=exif)
    return np.ascontiguousarray(np.rot90(_rgb(), k=-1))


def _animated(path):
    first, second = Image.fromarray(_rgb()), Image.fromarray(255 - _rgb())
    first.save(path, save_all=True, append_images=[second], optimize=False)
    return np.asarray(Image.open(path).convert("RGB"))  # frame 0, through the GIF's palette


CASES = {
    "gray_16_bit.png": _gray_16_bit,
    "rgb_16_bit.tif": _rgb_16_bit,
    "one_bit.png": _one_bit,
    "gray_alpha.png": _gray_alpha,
    "palette.png": _palette,
    "zero_one_8_bit.png": _zero_one_8_bit,
    "cmyk.tif": _cmyk,
    "rotated_by_exif.png": _rotated_by_exif,
    "animated.gif": _animated,
}


@pytest.fixture(params=sorted(CASES))
def picture(request, tmp_path):
    """(a file in the mode under test, the RGB uint8 pixels a viewer shows for it)."""
    path = tmp_path / request.param
    return path, CASES[request.param](path)


def _expected_input(loaded, rgb: np.ndarray) -> torch.Tensor:
    """The oracle's model input: 8-bit RGB / 255, shorter side resized to SIZE, centre crop,
    computed here with scikit-image alone (not through kfx.models' conversions)."""
    from skimage.transform import resize

    height, width = rgb.shape[:2]
    scale = SIZE / min(height, width)
    shape = (max(SIZE, round(height * scale)), max(SIZE, round(width * scale)))
    resized = resize(rgb.astype(np.float64) / 255.0, shape, anti_aliasing=True)
    top, left = (shape[0] - SIZE) // 2, (shape[1] - SIZE) // 2
    crop = resized[top : top + SIZE, left : left + SIZE]
    return loaded.normalize(torch.from_numpy(crop).permute(2, 0, 1).float())


def test_every_mode_reads_as_the_8_bit_rgb_picture(picture):
    path, expected = picture
    pixels = read_pixels(str(path))
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
    # 16-bit RGB: Pillow may round where the oracle rounds to nearest; one level at most
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_every_mode_gives_the_model_input_of_the_8_bit_rgb_picture(picture):
    path, expected = picture
    loaded = load_model(TINY)
    got = loaded.prepare(cli.read_image(str(path)), SIZE)
    assert torch.allclose(got, _expected_input(loaded, expected), atol=1.01 / 255 / 0.224)  # one level


def test_every_mode_gives_the_map_of_the_8_bit_rgb_picture(capsys, picture):
    path, expected = picture
    options = ["--size", str(SIZE), "--patch", "8", "--json", "-", "-q"]
    code = cli.main(["explain", str(path), "--model", TINY, *options])
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    document = json.loads(captured.out)
    loaded = load_model(TINY)
    image = _expected_input(loaded, expected)
    want = kfx.compile(loaded.model, tuple(image.shape), kfx.Patch(8))(image, document["target"])
    assert document["base_probability"] == pytest.approx(want.base, abs=1e-4)
    assert np.allclose(np.array(document["map"]), want.values.numpy(), atol=1e-4)


# -- arrays given directly (the Python API: kfx.models.resize_crop / LoadedModel.prepare) ---------------


def test_a_16_bit_array_is_scaled_from_its_own_range():
    gray = _gray16()
    unit = resize_crop(gray, SIZE)
    reference = resize_crop(_stack(_from_16_bit(gray)), SIZE)
    assert float(unit.max()) <= 1.0
    assert torch.allclose(unit, reference, atol=1 / 255)


def test_a_0_1_valued_uint8_array_stays_dark():
    """uint8 means 0..255 whatever values it holds: a picture of 0s and 1s is nearly black."""
    gray = (_rgb()[..., 0] > 128).astype(np.uint8)
    assert float(resize_crop(gray, SIZE).max()) <= 1 / 255 + 1e-6


def test_float_and_bool_arrays_keep_their_meaning():
    unit = _rgb().astype(np.float64) / 255.0
    assert torch.allclose(resize_crop(unit, SIZE), resize_crop(_rgb(), SIZE), atol=1e-6)
    mask = _rgb()[..., 0] > 128
    assert torch.allclose(resize_crop(mask, SIZE), resize_crop(_stack(mask.astype(np.uint8) * 255), SIZE))


@pytest.mark.parametrize(
    "pixels, fragment",
    [
        (np.full((8, 8, 3), 2.0), "float pixels must lie in [0, 1]"),
        (np.full((8, 8, 3), np.nan), "float pixels must lie in [0, 1]"),
        (np.full((8, 8), 300, dtype=np.int64), "signed integer pixels must lie in 0..255"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "expected an RGB or gray image"),
    ],
)
def test_pixels_without_a_clear_meaning_are_refused(pixels, fragment):
    from kfx import InputError

    with pytest.raises(InputError, match=re.escape(fragment)):
        resize_crop(pixels, SIZE)


def test_to_rgb_uint8_is_the_identity_on_rgb_uint8():
    from kfx.models import to_rgb_uint8

    rgb = _rgb()
    assert np.array_equal(to_rgb_uint8(rgb), rgb)
    rgba = np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=-1)
    assert np.array_equal(to_rgb_uint8(rgba), rgb)


def test_a_float_image_outside_0_1_names_the_file(capsys, tmp_path):
    path = tmp_path / "bright.tif"
    Image.fromarray(np.full((40, 48), 3.0, dtype=np.float32)).save(path)
    code = cli.main(["explain", str(path), "--model", TINY, "--size", str(SIZE)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_RUNTIME
    assert err.count("\n") == 1 and err.startswith("kfx: error: ") and "bright.tif" in err
    assert "[0, 1]" in err


def test_the_model_input_of_a_16_bit_png_matches_its_8_bit_copy(tmp_path):
    """The model input itself (what kfx explains), not only the map: within one 8-bit level."""
    path, reference = tmp_path / "g16.png", tmp_path / "g8.png"
    Image.fromarray(_gray_16_bit(path)).save(reference)
    loaded = load_model(TINY)
    got = loaded.prepare(read_pixels(str(path)), SIZE)
    want = loaded.prepare(read_pixels(str(reference)), SIZE)
    assert torch.equal(got, want)
