"""kfx.monai.OcclusionSensitivity against monai.visualize.OcclusionSensitivity itself: same arguments,
same maps.

MONAI returns its map in float32 whatever the input's dtype, after accumulating it in the input's
dtype; kfx does the same in the same order, so with float64 models the two agree to the last bit
(the tolerance below only covers float32 models, whose engine and dense outputs differ in rounding).

Some tests run kfx.monai's placement, fills, activation and averaging on a brute-force engine (the
model on each occluded copy, built from the fill's own ``content``): they check kfx.monai's side of
the contract against MONAI in every mode and rank, whatever the real engine supports.
"""

import doctest
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kfx
import kfx.monai
from kfx.fills import PositionalFill

monai_visualize = pytest.importorskip("monai.visualize")
monai_utils = pytest.importorskip("monai.data.utils")

# MONAI 1.6.1 indexes with lists of slices, which torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

SHAPE_1D = (2, 40)
SHAPE_2D = (2, 12, 14)
SHAPE_3D = (1, 12, 12, 12)


def _cnn(axes: int, in_channels: int, width: int, flat: int, classes: int, dtype) -> nn.Module:
    """conv-relu-pool-conv-relu-flatten-linear over ``axes`` spatial axes: position-sensitive."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[axes - 1]
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(in_channels, width, 5 if axes == 1 else 3, padding=2 if axes == 1 else 1),
        nn.ReLU(),
        (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[axes - 1](2),
        conv(width, width, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, classes),
    )
    return model.to(dtype).eval()


def cnn_1d(dtype=torch.float64):
    """The 1-D counterpart over a 2-lead signal of length 40."""
    return _cnn(1, 2, 4, 4 * 18, 3, dtype)


def cnn_2d(dtype=torch.float64, in_channels=2, classes=3):
    """Two convs, a max pool and a linear head over a 12x14 image: position-sensitive."""
    return _cnn(2, in_channels, 4, 4 * 4 * 5, classes, dtype)


def cnn_3d(dtype=torch.float64):
    """The 3-D counterpart over a 12x12x12 volume."""
    return _cnn(3, 1, 2, 2 * 4 * 4 * 4, 3, dtype)


def image(shape=SHAPE_2D, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(1, *shape, dtype=dtype)


def both(model, x, b_box=None, **options):
    """(ours, the kfx object, MONAI's) for one call with the same arguments."""
    options = {"verbose": False, **options}
    ours = kfx.monai.OcclusionSensitivity(model, **options)
    result = ours(x, b_box)
    theirs = monai_visualize.OcclusionSensitivity(model, **options)(x, b_box)
    return result, ours, theirs


def assert_matches_monai(ours, theirs, exact=True):
    (occ_map, classes), (their_map, their_classes) = ours, theirs
    their_map, their_classes = their_map.as_tensor(), their_classes.as_tensor()
    assert occ_map.shape == their_map.shape and occ_map.dtype == their_map.dtype == torch.float32
    assert their_map.abs().max() > 0  # a map of zeros would make the comparison vacuous
    if exact:
        assert torch.equal(occ_map, their_map)
        assert torch.equal(classes, their_classes)
    else:
        torch.testing.assert_close(occ_map, their_map, rtol=1e-5, atol=1e-6)
        top2 = their_map.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1] > 1e-4)[:, None]  # ties may go either way
        assert torch.equal(classes[clear], their_classes[clear])


class BruteForceEngine:
    """kfx.Engine.outputs by definition: the model on each occluded copy, the fill from its content."""

    def __init__(self, model, patch):
        self.model, self.size, self.fill = model, patch.size, patch.fill

    def outputs(self, image, positions, batch_size=None):
        copies = image.repeat(len(positions), *(1,) * image.dim())
        if isinstance(self.fill, PositionalFill):
            contents = self.fill.content(image, positions, self.size)
        else:
            contents = torch.full((len(positions), image.shape[0], *self.size), self.fill, dtype=image.dtype)
        for copy, corner, content in zip(copies, positions.tolist(), contents):
            copy[(slice(None), *(slice(p, p + s) for p, s in zip(corner, self.size)))] = content
        return self.model(copies)


@pytest.fixture
def brute_force(monkeypatch):
    """kfx.monai on BruteForceEngine instead of kfx.compile."""

    class AnyPatch:
        def __init__(self, size, stride, fill):
            self.size, self.fill = size, fill

    monkeypatch.setattr(kfx.monai, "Patch", AnyPatch)
    monkeypatch.setattr(
        kfx.monai, "compile", lambda model, shape, patch, dtype=None: BruteForceEngine(model, patch)
    )


# Whole image; rows 2-8 (widened by the mask); one row; all rows of columns 5-9; a max of 0 (MONAI then
# crops to the end, past its widened grid, and leaves zeros there).
B_BOXES_2D = [None, [2, 8, -1, -1], [0, 0, 3, 9], [-1, -1, 5, 9], [3, 10, 0, 13]]


# -- MONAI's placement, weights and fills, on the brute-force engine -------------------------------


@pytest.mark.parametrize("mode", [0.5, "mean_img", "gaussian", "mean_patch"])
@pytest.mark.parametrize("b_box", B_BOXES_2D)
def test_every_mode_and_b_box_match_monai_2d(brute_force, mode, b_box):
    ours, occlusion, theirs = both(cnn_2d(), image(), b_box, mask_size=4, n_batch=7, mode=mode, overlap=0.5)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@pytest.mark.parametrize("mode", [-1.0, "mean_img", "gaussian", "mean_patch"])
@pytest.mark.parametrize("b_box", [None, [2, 6, -1, -1, 4, 9]])
def test_every_mode_matches_monai_3d(brute_force, mode, b_box):
    ours, occlusion, theirs = both(
        cnn_3d(), image(SHAPE_3D), b_box, mask_size=4, n_batch=32, mode=mode, overlap=0.5
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@pytest.mark.parametrize("mode", [0.5, "mean_img", "gaussian", "mean_patch"])
@pytest.mark.parametrize("b_box", [None, [3, 30], [-1, 0]])
def test_every_mode_matches_monai_1d(brute_force, mode, b_box):
    ours, occlusion, theirs = both(cnn_1d(), image(SHAPE_1D), b_box, mask_size=6, mode=mode)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@st.composite
def geometries(draw):
    """A 2-D call: a mask, an overlap, a mode and a b_box (each bound -1, 0 or inside the image)."""
    height, width = SHAPE_2D[1:]
    mask = (draw(st.integers(1, height)), draw(st.integers(1, width)))
    overlap = draw(st.sampled_from([0.0, 0.3, 0.6, 0.8]))
    mode = draw(st.sampled_from([0.5, "mean_img", "gaussian", "mean_patch"]))
    b_box = None
    if draw(st.booleans()):
        b_box = []
        for size in (height, width):
            low = draw(st.integers(-1, size - 1))
            b_box += [low, draw(st.sampled_from([-1, 0, max(low, 0), size - 1]))]
    return mask, overlap, mode, b_box


# The fixture only swaps kfx.compile for the brute-force engine: sharing it across examples is safe.
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=geometries())
def test_any_geometry_matches_monai(brute_force, geometry):
    mask, overlap, mode, b_box = geometry
    options = {"mask_size": mask, "overlap": overlap, "mode": mode, "n_batch": 64, "verbose": False}
    try:
        theirs = monai_visualize.OcclusionSensitivity(cnn_2d(), **options)(image(), b_box)
    except (ValueError, RuntimeError) as error:  # a mask larger than the crop, a crop to nothing
        with pytest.raises(type(error)), warnings.catch_warnings():
            warnings.simplefilter("ignore", kfx.monai.NotAcceleratedWarning)
            kfx.monai.OcclusionSensitivity(cnn_2d(), **options)(image(), b_box)
        return
    occlusion = kfx.monai.OcclusionSensitivity(cnn_2d(), **options)
    occ_map, classes = occlusion(image(), b_box)
    assert occlusion.last_fallback_reason is None
    assert torch.equal(occ_map, theirs[0].as_tensor()) and torch.equal(classes, theirs[1].as_tensor())


@pytest.mark.parametrize("mask_size, overlap", [(4, 0.0), (5, 0.25), ((3, 6), 0.9), (1, 0.5), ((12, 2), 0.6)])
def test_mask_sizes_and_overlaps_match_monai(brute_force, mask_size, overlap):
    ours, _, theirs = both(cnn_2d(), image(), mask_size=mask_size, mode="gaussian", overlap=overlap)
    assert_matches_monai(ours, theirs)


@settings(max_examples=60)
@given(
    length=st.integers(1, 40),
    mask=st.integers(1, 40),
    overlap=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.8, 0.9, 0.99]),
)
def test_window_starts_are_monais(length, mask, overlap):
    mask = min(mask, length)
    ours = kfx.monai._axis_starts(length, mask, overlap)
    interval = monai_inferers_scan_interval(length, mask, overlap)
    theirs = [s[0].start for s in monai_utils.dense_patch_slices((length,), (mask,), interval)]
    assert ours == theirs


def monai_inferers_scan_interval(length, mask, overlap):
    from monai.inferers.utils import _get_scan_interval

    return _get_scan_interval((length,), (mask,), 1, (overlap,))


@pytest.mark.parametrize("size", [(4,), (4, 4), (3, 7), (16, 16), (4, 5, 6), (1, 1)])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_importance_maps_are_monais(size, mode):
    ours = kfx.monai._importance_map(size, mode == "gaussian", torch.float64)
    theirs = monai_utils.compute_importance_map(size, mode=mode, sigma_scale=0.125, dtype=torch.float64)
    assert torch.equal(ours, theirs)


# -- the fast path on kfx engines ------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, b_box, overlap",
    [
        (0.5, None, 0.6),
        (0.5, [2, 8, -1, -1], 0.0),
        ("mean_img", [0, 0, 3, 9], 0.6),
        ("mean_img", [3, 10, 0, 13], 0.0),
        (-2.0, [-1, -1, 5, 9], 0.6),
    ],
)
def test_constant_modes_take_the_fast_path_and_match_monai(mode, b_box, overlap):
    ours, occlusion, theirs = both(
        cnn_2d(), image(), b_box, mask_size=4, n_batch=7, mode=mode, overlap=overlap
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@pytest.mark.parametrize("mode", ["gaussian", "mean_patch"])
@pytest.mark.parametrize("b_box", [None, [2, 8, -1, -1]])
def test_positional_modes_take_the_fast_path_and_match_monai(mode, b_box):
    ours, occlusion, theirs = both(cnn_2d(), image(), b_box, mask_size=4, mode=mode)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@pytest.mark.parametrize("mode", [0.5, "gaussian"])
def test_signals_take_the_fast_path_and_match_monai(mode):
    ours, occlusion, theirs = both(cnn_1d(), image(SHAPE_1D), [3, 30], mask_size=6, mode=mode)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@pytest.mark.parametrize("mode", [0.5, "gaussian"])
def test_volumes_take_the_fast_path_and_match_monai(mode):
    ours, occlusion, theirs = both(cnn_3d(), image(SHAPE_3D), mask_size=4, n_batch=32, mode=mode, overlap=0.5)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


@pytest.mark.parametrize(
    "activate",
    [True, False, torch.sigmoid, lambda out: out * len(out)],
    ids=["softmax", "raw", "sigmoid", "per-batch"],
)
@pytest.mark.parametrize("n_batch", [3, 64])
def test_activations_and_batches_match_monai(activate, n_batch):
    # The per-batch activation depends on which windows share a batch: MONAI's batches must be kept.
    ours, occlusion, theirs = both(
        cnn_2d(), image(), mask_size=5, n_batch=n_batch, mode=1.0, activate=activate
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


def test_an_int_mode_is_its_float():
    # MONAI 1.6.1 fails on an int mode (it tests isinstance(mode, float)); kfx reads it as the float.
    occlusion = kfx.monai.OcclusionSensitivity(cnn_2d(), mask_size=4, mode=0, verbose=False)
    ours = occlusion(image())
    assert occlusion.last_fallback_reason is None
    theirs = monai_visualize.OcclusionSensitivity(cnn_2d(), mask_size=4, mode=0.0, verbose=False)(image())
    assert_matches_monai(ours, theirs)


def test_a_one_channel_input_gets_a_sigmoid_as_in_monai():
    model = cnn_2d(in_channels=1, classes=4)
    ours, occlusion, theirs = both(model, image((1, 12, 14)), mask_size=4, mode=0.0)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)
    assert ours[0].sum(dim=1).max() > 1.5  # sigmoids, not a softmax over the 4 classes


def test_float32_matches_monai():
    model = cnn_2d(torch.float32)
    ours, occlusion, theirs = both(model, image(dtype=torch.float32), mask_size=4, mode=0.5)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs, exact=False)


def test_a_meta_tensor_input_matches_monai():
    meta_tensor = pytest.importorskip("monai.data").MetaTensor
    ours, occlusion, theirs = both(cnn_2d(), meta_tensor(image()), mask_size=4, mode=0.5)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)


def test_a_model_in_training_mode_is_explained_in_eval_mode_as_monai_does():
    model = nn.Sequential(cnn_2d()[:-1], nn.Dropout(0.5), cnn_2d()[-1]).train()
    ours, occlusion, theirs = both(model, image(), mask_size=4, mode=0.5)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)
    assert model.training and all(m.training for m in model.modules())


def test_engines_are_reused_and_refreshed_when_weights_change():
    model = cnn_2d()
    occlusion = kfx.monai.OcclusionSensitivity(model, mask_size=4, mode=0.5, verbose=False)
    occlusion(image())
    engines = dict(occlusion._engines)
    occlusion(image(seed=2), b_box=[2, 8, -1, -1])
    assert occlusion._engines == engines  # same engine objects, no recompilation

    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    ours = occlusion(image())
    theirs = monai_visualize.OcclusionSensitivity(model, mask_size=4, mode=0.5, verbose=False)(image())
    assert_matches_monai(ours, theirs)


def test_mean_img_compiles_one_engine_for_every_image():
    occlusion = kfx.monai.OcclusionSensitivity(
        cnn_2d(), mask_size=6, mode="mean_img", overlap=0.0, verbose=False
    )
    for seed in range(3):
        ours = occlusion(image(seed=seed))
        theirs = monai_visualize.OcclusionSensitivity(
            cnn_2d(), mask_size=6, mode="mean_img", overlap=0.0, verbose=False
        )(image(seed=seed))
        assert_matches_monai(ours, theirs)
    assert len(occlusion._engines) == 1


def test_the_engine_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(kfx.monai, "MAX_CACHED_ENGINES", 2)
    occlusion = kfx.monai.OcclusionSensitivity(cnn_2d(), mask_size=6, overlap=0.0, verbose=False)
    for mode in (0.0, 1.0, 2.0):
        occlusion.mode = mode
        occlusion(image())
    assert [key[-1] for key in occlusion._engines] == [1.0, 2.0]  # the least recently used went


def test_a_progress_bar_does_not_change_the_map(capsys):
    ours, occlusion, theirs = both(cnn_2d(), image(), mask_size=4, mode=0.5, overlap=0.5, verbose=True)
    assert occlusion.last_fallback_reason is None
    assert_matches_monai(ours, theirs)
    assert "kfx OcclusionSensitivity" in capsys.readouterr().err


# -- fallbacks -------------------------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = cnn_2d()

    def forward(self, x, scale=1.0):
        return self.body(x) * scale


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = cnn_2d()

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else -self.body(x)


@pytest.mark.parametrize(
    "make_model, options, kwargs, reason",
    [
        (lambda: lambda x: cnn_2d()(x), {}, {}, "not a torch.nn.Module"),
        (Scaled, {}, {"scale": 2.0}, "keyword arguments"),
        (lambda: DataDependent().eval(), {}, {}, "could not trace"),
        (cnn_2d, {"mask_size": (4, 4), "mode": 0.5}, {"b_box": [2, 8]}, "b_box"),
    ],
    ids=["lambda-model", "module-kwargs", "untraceable", "short-b_box"],
)
def test_fallbacks_give_monais_result_and_a_reason(make_model, options, kwargs, reason):
    model = make_model()
    arguments = {"mask_size": 4, "verbose": False, "mode": 0.5, "overlap": 0.0, **options}
    occlusion = kfx.monai.OcclusionSensitivity(model, **arguments)
    with pytest.warns(kfx.monai.NotAcceleratedWarning, match=reason):
        ours = occlusion(image(), **kwargs)
    theirs = monai_visualize.OcclusionSensitivity(model, **arguments)(image(), **kwargs)
    assert reason in occlusion.last_fallback_reason
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


class Segmenter(nn.Module):
    """A per-pixel output [1, K, H, W]: not a classifier."""

    def __init__(self):
        super().__init__()
        self.conv = cnn_2d()[0]

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "make_model, options, reason",
    [
        (cnn_2d, {"mode": lambda x, window: window * 0.5}, "callable"),
        (Segmenter, {"activate": False}, "not one row"),
        (cnn_2d, {"activate": lambda out: out[:, 0]}, "activate"),
    ],
    ids=["callable-mode", "segmenter", "activate-drops-a-dim"],
)
def test_calls_monai_cannot_run_fail_as_in_monai(make_model, options, reason):
    # MONAI 1.6.1 raises for every callable mode (its predictor's "Shouldn't be here" check runs
    # after the callable) and for outputs that are not [N, K] rows: the fallback passes that on.
    model = make_model()
    arguments = {"mask_size": 4, "verbose": False, "mode": 0.5, **options}
    with pytest.raises(Exception) as theirs:
        monai_visualize.OcclusionSensitivity(model, **arguments)(image())
    occlusion = kfx.monai.OcclusionSensitivity(model, **arguments)
    with pytest.warns(kfx.monai.NotAcceleratedWarning, match=reason), pytest.raises(type(theirs.value)):
        occlusion(image())
    assert reason in occlusion.last_fallback_reason


def test_a_fallback_warns_once_per_reason_and_the_fast_path_clears_it():
    occlusion = kfx.monai.OcclusionSensitivity(cnn_2d(), mask_size=4, mode=0.5, overlap=0.0, verbose=False)
    with pytest.warns(kfx.monai.NotAcceleratedWarning):
        occlusion(image(), b_box=[2, 8])
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfx.monai.NotAcceleratedWarning)
        occlusion(image(), b_box=[2, 8])
        assert "b_box" in occlusion.last_fallback_reason
        occlusion(image())
    assert occlusion.last_fallback_reason is None


def test_float16_inputs_fall_back_since_monai_rounds_their_coordinates():
    model = cnn_2d(torch.float32)
    occlusion = kfx.monai.OcclusionSensitivity(model, mask_size=4, mode=0.5, verbose=False)
    x = image(dtype=torch.float32).half()
    with pytest.warns(kfx.monai.NotAcceleratedWarning, match="float16"):
        with pytest.raises(RuntimeError):  # MONAI's own error: a float16 input to a float32 model
            occlusion(x)


def test_without_monai_a_fallback_raises_a_kfx_error(monkeypatch):
    monkeypatch.setattr(kfx.monai, "_monai_occlusion_sensitivity", lambda: None)
    with pytest.raises(kfx.PatchError, match="callable.*pip install monai"):
        kfx.monai.OcclusionSensitivity(cnn_2d(), mask_size=4, mode=lambda x, w: w, verbose=False)(image())
    with pytest.raises(kfx.ModelError, match="not installed"):
        kfx.monai.OcclusionSensitivity(lambda x: x, mask_size=4, mode=0.5, verbose=False)(image())
    # The fast path needs no MONAI at all.
    occlusion = kfx.monai.OcclusionSensitivity(cnn_2d(), mask_size=4, mode=0.5, verbose=False)
    occlusion(image())
    assert occlusion.last_fallback_reason is None


@pytest.mark.parametrize(
    "options, x, error, match",
    [
        ({"mode": "blur"}, image(), kfx.PatchError, "mode must be one of"),
        ({"mode": True}, image(), kfx.PatchError, "mode must be one of"),
        ({"mask_size": 13}, image(), kfx.PatchError, "larger than the image"),
        ({"mask_size": (4, 4, 4)}, image(), kfx.PatchError, "one per spatial axis"),
        ({"mask_size": 0}, image(), kfx.PatchError, "positive int"),
        ({"overlap": 1.0}, image(), kfx.PatchError, "overlap"),
        ({"n_batch": 0}, image(), kfx.InputError, "n_batch"),
        ({}, torch.zeros(2, *SHAPE_2D, dtype=torch.float64), kfx.InputError, "one image"),
    ],
)
def test_bad_arguments_raise_kfx_errors(options, x, error, match):
    with pytest.raises(error, match=match):
        kfx.monai.OcclusionSensitivity(cnn_2d(), **{"mask_size": 4, "verbose": False, **options})(x)


def test_a_mask_larger_than_the_image_is_a_value_error_as_in_monai():
    with pytest.raises(ValueError):
        kfx.monai.OcclusionSensitivity(cnn_2d(), mask_size=13, verbose=False)(image())
    with pytest.raises(ValueError):
        monai_visualize.OcclusionSensitivity(cnn_2d(), mask_size=13, verbose=False)(image())


def test_mean_patch_reproduces_monais_product_with_the_mean():
    """MONAI 1.6.1's "mean_patch" multiplies the window by its mean (not what its docs say)."""
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1)[:, :2]

    x = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)
    monai_visualize.OcclusionSensitivity(Recorder(), 2, mode="mean_patch", overlap=0.0, verbose=False)(x)
    window = x[0, :, :2, :2]
    assert torch.equal(seen[0][0, :, :2, :2], window * window.mean())
    ours = kfx.monai.MonaiMeanPatch().content(x[0], torch.tensor([[0, 0]]), (2, 2))
    assert torch.equal(ours[0], window * window.mean())


def test_importing_kfx_monai_does_not_import_monai():
    code = "import sys, kfx.monai; assert 'monai' not in sys.modules, sorted(m for m in sys.modules if 'monai' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doctests():
    assert doctest.testmod(kfx.monai).failed == 0
