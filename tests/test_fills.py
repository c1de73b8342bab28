"""kfx.fills against independent oracles: NumPy slicing per window, scipy.ndimage's Gaussian filter,
and MONAI's own Gaussian occlusion, for 1, 2 and 3 spatial axes."""

import doctest
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kfx.fills
from kfx.errors import InputError, PatchError
from kfx.fills import Baseline, Blur, MeanImage, MeanPatch, Multiply, PositionalFill, resolve_fill, windows

# MONAI 1.6.1 indexes with lists of slices, which torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


@st.composite
def images_and_windows(draw):
    """An image [C, *S] of rank 1-3, a window size that fits, and 1-5 corners where it fits."""
    rank = draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(rank))
    size = tuple(draw(st.integers(1, d)) for d in spatial)
    channels = draw(st.integers(1, 3))
    n = draw(st.integers(1, 5))
    corners = [[draw(st.integers(0, d - s)) for d, s in zip(spatial, size)] for _ in range(n)]
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(channels, *spatial, generator=generator, dtype=torch.float64)
    return image, torch.tensor(corners, dtype=torch.long), size


def numpy_windows(image: torch.Tensor, positions: torch.Tensor, size) -> list[np.ndarray]:
    """Each window [C, *size] cut out by plain slicing."""
    array = image.numpy()
    return [
        array[(slice(None), *(slice(p, p + s) for p, s in zip(corner, size)))]
        for corner in positions.tolist()
    ]


@given(images_and_windows())
def test_windows_are_the_sliced_regions(case):
    image, positions, size = case
    ours = windows(image, positions, size)
    assert ours.shape == (len(positions), image.shape[0], *size)
    for got, expected in zip(ours, numpy_windows(image, positions, size)):
        np.testing.assert_array_equal(got.numpy(), expected)


@given(images_and_windows(), st.booleans())
def test_mean_patch_is_the_mean_of_the_covered_region(case, per_channel):
    image, positions, size = case
    ours = MeanPatch(per_channel=per_channel).content(image, positions, size)
    assert ours.shape == (len(positions), image.shape[0], *size) and ours.dtype == image.dtype
    for got, region in zip(ours, numpy_windows(image, positions, size)):
        axes = tuple(range(1, region.ndim)) if per_channel else None
        mean = np.mean(region, axis=axes, keepdims=True)
        np.testing.assert_allclose(got.numpy(), np.broadcast_to(mean, region.shape), rtol=1e-12, atol=1e-12)


@given(images_and_windows(), st.booleans())
def test_mean_image_is_the_mean_of_the_whole_image(case, per_channel):
    image, positions, size = case
    ours = MeanImage(per_channel=per_channel).content(image, positions, size)
    array = image.numpy()
    mean = np.mean(array, axis=tuple(range(1, array.ndim)) if per_channel else None)
    expected = np.broadcast_to(np.reshape(mean, (1, -1) + (1,) * len(size)), ours.shape)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=20)
@given(images_and_windows(), st.sampled_from([None, 0.6, 1.5, "per_axis"]))
def test_blur_is_scipys_gaussian_filter_cropped(case, sigma):
    image, positions, size = case
    if sigma == "per_axis":
        sigma = tuple(0.5 * (axis + 1) for axis in range(len(size)))
    ours = Blur(sigma=sigma).content(image, positions, size)
    sigmas = tuple(s / 4 for s in size) if sigma is None else Blur(sigma=sigma).sigmas(size)
    blurred = scipy.ndimage.gaussian_filter(image.numpy(), (0, *sigmas), mode="nearest", truncate=4.0)
    for got, expected in zip(ours, numpy_windows(torch.from_numpy(blurred), positions, size)):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_blur_with_a_kernel_wider_than_the_image_repeats_the_edges():
    image = torch.tensor([[0.0, 0.0, 9.0]], dtype=torch.float64)
    ours = Blur(sigma=3.0).content(image, torch.tensor([[0]]), (3,))
    expected = scipy.ndimage.gaussian_filter1d(image.numpy(), 3.0, axis=1, mode="nearest")
    np.testing.assert_allclose(ours[0].numpy(), expected, rtol=1e-12)


def test_blur_keeps_float32():
    image = torch.randn(2, 9, 9)
    ours = Blur(sigma=1.0).content(image, torch.tensor([[1, 2]]), (4, 4))
    assert ours.dtype == torch.float32
    expected = scipy.ndimage.gaussian_filter(image.double().numpy(), (0, 1.0, 1.0), mode="nearest")
    np.testing.assert_allclose(ours[0].numpy(), expected[:, 1:5, 2:6], rtol=1e-5, atol=1e-6)


@given(images_and_windows(), st.integers(0, 2**16))
def test_multiply_scales_each_window_by_one_minus_the_mask(case, seed):
    image, positions, size = case
    mask = torch.rand(1, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = Multiply(mask).content(image, positions, size)
    for got, region in zip(ours, numpy_windows(image, positions, size)):
        np.testing.assert_allclose(got.numpy(), region * (1 - mask.numpy()), rtol=1e-14)


@given(images_and_windows(), st.integers(0, 2**16))
def test_baseline_shows_the_reference_images_windows(case, seed):
    image, positions, size = case
    reference = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = Baseline(reference).content(image, positions, size)
    assert ours.shape == (len(positions), image.shape[0], *size) and ours.dtype == image.dtype
    for got, expected in zip(ours, numpy_windows(reference, positions, size)):
        np.testing.assert_array_equal(got.numpy(), expected)


def test_baseline_takes_the_images_dtype_and_keeps_its_own_copy():
    reference = torch.arange(8.0, dtype=torch.float64).view(1, 2, 4)
    fill = Baseline(reference)
    reference += 1
    got = fill.content(torch.zeros(1, 2, 4), torch.tensor([[0, 1]]), (2, 2))
    assert got.dtype == torch.float32 and got[0, 0].tolist() == [[1.0, 2.0], [5.0, 6.0]]


def test_multiply_takes_a_mask_per_channel():
    image = torch.randn(2, 6, 6, dtype=torch.float64)
    mask = torch.stack([torch.zeros(3, 3), torch.ones(3, 3)]).double()
    ours = Multiply(mask).content(image, torch.tensor([[1, 2]]), (3, 3))
    torch.testing.assert_close(ours[0, 0], image[0, 1:4, 2:5])
    assert (ours[0, 1] == 0).all()


@pytest.mark.parametrize(
    "size", [(1,), (2,), (5,), (16,), (1, 1), (4, 4), (3, 7), (16, 16), (4, 4, 4), (5, 6, 7), (2, 1, 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiply_gaussian_is_monais_gaussian_occlusion(size, dtype):
    monai_visualize = pytest.importorskip("monai.visualize")
    image = torch.zeros(1, 2, *(s + 2 for s in size), dtype=dtype)
    factor, _ = monai_visualize.OcclusionSensitivity.gaussian_occlusion(image, size)
    mask = Multiply.gaussian(size).mask
    assert mask.shape == (1, *size)
    # 1 - mask gives back MONAI's float32 factor bit for bit.
    assert torch.equal((1 - mask).float().expand(2, *size), factor[0].float())
    window = torch.randn(1, 2, *size, dtype=dtype)
    ours = Multiply.gaussian(size).content(window[0], torch.zeros(1, len(size), dtype=torch.long), size)
    assert torch.equal(ours, window * factor)


def test_multiply_gaussian_is_zero_at_the_centre_and_one_at_the_corners():
    factor = 1 - Multiply.gaussian((9, 9)).mask[0]
    assert factor[4, 4] == 0 and factor[0, 0] == 1 and factor[8, 8] == 1


def test_fills_are_values():
    assert MeanPatch() == MeanPatch() and hash(MeanPatch()) == hash(MeanPatch())
    assert MeanPatch() != MeanPatch(per_channel=False) and MeanPatch() != MeanImage()
    assert Blur(sigma=2) == Blur(sigma=2.0) and hash(Blur(sigma=2)) == hash(Blur(sigma=2.0))
    assert Blur(sigma=[1, 2]) == Blur(sigma=(1, 2))
    assert Multiply(torch.ones(1, 2, 2)) == Multiply(torch.ones(1, 2, 2).float())
    assert hash(Multiply(torch.ones(1, 2, 2))) == hash(Multiply(torch.ones(1, 2, 2).float()))
    assert Multiply(torch.ones(1, 2, 2)) != Multiply(torch.ones(2, 2))
    assert Multiply.gaussian((4, 4)) == Multiply.gaussian((4, 4)) != Multiply.gaussian((4, 4), sigma=0.5)
    assert len({MeanPatch(), MeanPatch(), Blur(), Blur(sigma=None)}) == 2
    assert Baseline(torch.ones(1, 2, 2)) == Baseline(torch.ones(1, 2, 2))
    assert hash(Baseline(torch.ones(1, 2, 2))) == hash(Baseline(torch.ones(1, 2, 2)))
    assert Baseline(torch.ones(1, 2, 2)) != Baseline(torch.zeros(1, 2, 2))
    assert Baseline(torch.ones(1, 2, 2)) != Baseline(torch.ones(1, 2, 2, dtype=torch.float64))


def test_multiply_keeps_its_own_copy_of_the_mask():
    mask = torch.zeros(1, 2, 2)
    fill = Multiply(mask)
    mask += 1
    assert (fill.mask == 0).all()
    with pytest.raises(AttributeError):
        fill.mask = mask


def test_names():
    assert [f.name() for f in (MeanPatch(), MeanImage(), Blur())] == ["mean_patch", "mean_image", "blur"]
    assert "per_channel=False" in MeanPatch(per_channel=False).name()
    assert "sigma=2.0" in Blur(sigma=2.0).name()
    assert Multiply(torch.zeros(1, 3, 3)).name() == "multiply(mask [1, 3, 3])"
    assert Baseline(torch.zeros(3, 4, 5)).name() == "baseline(image [3, 4, 5])"


def test_resolve_fill():
    assert resolve_fill("mean_patch") == MeanPatch()
    assert resolve_fill("mean_image") == MeanImage()
    assert resolve_fill("blur") == Blur()
    fill = Blur(sigma=1.0)
    assert resolve_fill(fill) is fill
    for constant in (0.0, 1, (0.1, 0.2), torch.zeros(1, 2, 2), None):
        assert resolve_fill(constant) is None
    with pytest.raises(PatchError, match="unknown fill 'mean_img'.*'mean_image'"):
        resolve_fill("mean_img")


def test_the_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        PositionalFill().content(torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long), (1,))


@dataclass(frozen=True)
class Shifted(PositionalFill):
    """A user's fill: the region plus a constant."""

    offset: float

    def content(self, image, positions, size):
        return windows(image, positions, size) + self.offset


class Undeclared(PositionalFill):
    """A user's fill that is not a dataclass: its parameters are invisible to dataclass equality."""

    def __init__(self, offset):
        object.__setattr__(self, "offset", offset)


def test_user_fills_compare_by_their_parameters_or_else_by_identity():
    assert Shifted(1.0) == Shifted(1.0) and hash(Shifted(1.0)) == hash(Shifted(1.0))
    assert Shifted(1.0) != Shifted(2.0)
    assert Shifted(1.0).name() == "Shifted(offset=1.0)"
    # Equal classes with different parameters must not share an engine.
    assert Undeclared(1.0) != Undeclared(2.0) and Undeclared(1.0) != Undeclared(1.0)
    assert resolve_fill(Shifted(0.5)) == Shifted(0.5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Blur(sigma=-1.0), "non-negative"),
        (lambda: Blur(sigma=float("nan")), "non-negative"),
        (lambda: Blur(sigma="wide"), "non-negative"),
        (lambda: Blur(truncate=0), "truncate"),
        (lambda: Multiply(torch.tensor([float("nan")])), "NaN"),
        (lambda: Multiply("gaussian"), "mask"),
        (lambda: Multiply.gaussian(16), "one positive int per spatial axis"),
        (lambda: Multiply.gaussian((4, 0)), "one positive int per spatial axis"),
        (lambda: Multiply.gaussian((4, 4), sigma=0), "sigma"),
        (lambda: Baseline("blurred.png"), "tensor"),
        (lambda: Baseline(torch.zeros(4)), "tensor"),
        (lambda: Baseline(torch.full((1, 2, 2), float("inf"))), "finite"),
        (lambda: Baseline(torch.zeros(1, 2, 2, dtype=torch.long)), "floating"),
    ],
)
def test_bad_parameters_raise_patch_errors(make, match):
    with pytest.raises(PatchError, match=match):
        make()


@pytest.mark.parametrize(
    "fill, positions, size, error, match",
    [
        (MeanPatch(), torch.tensor([[0, 5]]), (2, 2), InputError, "outside the image"),
        (MeanPatch(), torch.tensor([[0, 0]]), (2,), PatchError, "2 positive ints"),
        (MeanImage(), torch.tensor([[0, 0]]), (7, 2), PatchError, "larger than the image"),
        (MeanPatch(), torch.tensor([0, 0]), (2, 2), InputError, r"\[N, 2\]"),
        (MeanPatch(), torch.tensor([[0.0, 0.0]]), (2, 2), InputError, "integers"),
        (Blur(sigma=(1.0, 2.0, 3.0)), torch.tensor([[0, 0]]), (2, 2), PatchError, "3 sigmas"),
        (Multiply(torch.zeros(3, 3)), torch.tensor([[0, 0]]), (2, 2), PatchError, "does not broadcast"),
        (
            Baseline(torch.zeros(2, 6, 5)),
            torch.tensor([[0, 0]]),
            (2, 2),
            InputError,
            r"\[2, 6, 5\].*\[2, 6, 6\]",
        ),
    ],
)
def test_bad_calls_raise_kfx_errors(fill, positions, size, error, match):
    with pytest.raises(error, match=match):
        fill.content(torch.zeros(2, 6, 6), positions, size)


def test_doctests():
    assert doctest.testmod(kfx.fills).failed == 0
