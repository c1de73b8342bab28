"""kfx.captum.Occlusion against captum.attr.Occlusion itself: same arguments, same numbers.

Captum 0.9 returns ``total.float() / counts`` (float32 even for float64 models), so the float64 cases
compare at float32 resolution: both sides round the same float64 totals, so they agree to an ulp.
"""

import doctest
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfx
import kfx.captum

captum_attr = pytest.importorskip("captum.attr")

C, H, W = 3, 20, 20


def small_cnn(dtype=torch.float64, outputs=5):
    """Two convs, a max pool and a linear head: position-sensitive, like a real classifier."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(C, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, outputs),
        )
        .to(dtype)
        .eval()
    )


class Residual(nn.Module):
    """A DAG: the skip connection merges a conv branch with its input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * 10 * 10, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.branch(x))
        return self.head(self.pool(x).flatten(1))


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else -self.body(x)


def images(n=1, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, C, H, W, dtype=dtype)


def assert_matches_captum(ours, theirs, input_dtype):
    """Same shape and dtype as Captum; values to an ulp of float32 (float64 models) or 1e-5."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = theirs.abs().max().item()
    assert scale > 0  # a map of zeros would make the comparison vacuous
    tolerance = 1e-6 if input_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * scale)


def both(model, inputs, **kwargs):
    """(kfx's attributions, the Occlusion object, Captum's attributions) for the same call."""
    occlusion = kfx.captum.Occlusion(model)
    ours = occlusion.attribute(inputs, **kwargs)
    theirs = captum_attr.Occlusion(model).attribute(inputs, **kwargs)
    return ours, occlusion, theirs


@pytest.mark.parametrize(
    "window, strides",
    [
        ((C, 4, 4), 4),  # tiles 20 exactly: 5 x 5 full windows
        ((C, 6, 6), (1, 4, 4)),  # ceil(14 / 4) + 1 = 5 per axis, the last clipped to 4
        ((C, 5, 7), (1, 3, 4)),  # rectangular; rows tile exactly, the last column is clipped
        ((C, 6, 5), (1, 3, 2)),  # clipped at the bottom, the right and both: four engines
        ((C, H, 3), (1, 7, 3)),  # a window as tall as the image may have any stride on that axis
    ],
)
def test_windows_match_captum(window, strides):
    ours, occlusion, theirs = both(
        small_cnn(), images(), sliding_window_shapes=window, strides=strides, target=2
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def test_clipped_windows_need_one_engine_per_shape():
    occlusion = kfx.captum.Occlusion(small_cnn())
    occlusion.attribute(images(), (C, 6, 5), strides=(1, 3, 2), target=0)
    assert sorted(key[3] for key in occlusion._engines) == [(5, 4), (5, 5), (6, 4), (6, 5)]


def test_default_stride_is_one():
    ours, occlusion, theirs = both(small_cnn(), images(), sliding_window_shapes=(C, 12, 12), target=1)
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def spatial_baseline():
    return images(seed=7)[0] * 0.1


@pytest.mark.parametrize(
    "baselines",
    [
        0.5,
        -1,
        torch.tensor([0.1, -0.2, 0.3]).view(C, 1, 1),
        torch.tensor([[[[0.1]], [[0.2]], [[0.7]]]]),
        spatial_baseline(),  # one image [C, H, W] for every example (e.g. a dataset's mean image)
        images(2, seed=8) * 0.1,  # one per example (e.g. each image blurred)
        torch.linspace(-1, 1, W).view(1, 1, 1, W),  # varies along one axis only, alike in every channel
    ],
    ids=["float", "int", "per-channel", "per-channel-4d", "image", "per-example-images", "ramp"],
)
def test_baselines_match_captum(baselines):
    if isinstance(baselines, torch.Tensor):
        baselines = baselines.double()
    ours, occlusion, theirs = both(
        small_cnn(), images(2), sliding_window_shapes=(C, 6, 6), strides=4, baselines=baselines, target=3
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def test_spatial_baselines_share_one_engine_per_window_shape_across_examples_and_threads():
    occlusion = kfx.captum.Occlusion(small_cnn())
    arguments = dict(sliding_window_shapes=(C, 6, 6), strides=4, target=3)
    calls = [images(2, seed=8 + k) * 0.1 for k in range(4)]  # each example its own baseline image
    with ThreadPoolExecutor(2) as pool:  # threads sharing the object each see their own baselines
        results = list(pool.map(lambda b: occlusion.attribute(images(2), baselines=b, **arguments), calls))
    for ours, baselines in zip(results, calls):
        theirs = captum_attr.Occlusion(occlusion.forward_func).attribute(
            images(2), baselines=baselines, **arguments
        )
        assert_matches_captum(ours, theirs, torch.float64)
    # windows at 0, 4, 8, 12 and 16 (clipped to 4) per axis: four shapes, one engine each
    assert sorted(key[3] for key in occlusion._engines) == [(4, 4), (4, 6), (6, 4), (6, 6)]


@pytest.mark.parametrize(
    "shape", [(3, 1, 1, 1), (3, C, 1, 1)], ids=["per-example", "per-example-and-channel"]
)
def test_per_example_baselines_match_captum(shape):
    torch.manual_seed(3)
    baselines = torch.randn(shape, dtype=torch.float64)
    ours, occlusion, theirs = both(
        small_cnn(), images(3), sliding_window_shapes=(C, 6, 6), strides=4, baselines=baselines, target=0
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


@pytest.mark.parametrize(
    "target",
    [4, [0, 3, 1], torch.tensor([2, 2, 4]), torch.tensor(1)],
    ids=["int", "list", "tensor", "scalar"],
)
def test_targets_on_a_batch_of_three_match_captum(target):
    ours, occlusion, theirs = both(
        small_cnn(), images(3), sliding_window_shapes=(C, 6, 6), strides=4, target=target
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


class TwoAxisOutput(nn.Module):
    """Outputs [N, 2, 5]: targets are (i, j) tuples."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn(outputs=10)

    def forward(self, x):
        return self.body(x).view(-1, 2, 5)


@pytest.mark.parametrize("target", [(1, 3), [(0, 4), (1, 2)]], ids=["tuple", "list-of-tuples"])
def test_tuple_targets_match_captum(target):
    ours, occlusion, theirs = both(
        TwoAxisOutput().eval(), images(2), sliding_window_shapes=(C, 6, 6), strides=4, target=target
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def test_no_target_for_a_scalar_output_matches_captum():
    ours, occlusion, theirs = both(
        small_cnn(outputs=1), images(2), sliding_window_shapes=(C, 6, 6), strides=4
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


@pytest.mark.parametrize("perturbations_per_eval", [1, 3, 100])
def test_perturbations_per_eval_matches_captum(perturbations_per_eval):
    ours, occlusion, theirs = both(
        small_cnn(),
        images(2),
        sliding_window_shapes=(C, 6, 6),
        strides=4,
        target=[1, 2],
        perturbations_per_eval=perturbations_per_eval,
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def test_small_batch_size_matches_captum():
    occlusion = kfx.captum.Occlusion(small_cnn(), batch_size=2)
    ours = occlusion.attribute(images(), (C, 6, 6), strides=4, target=1)
    theirs = captum_attr.Occlusion(small_cnn()).attribute(images(), (C, 6, 6), strides=4, target=1)
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def test_residual_model_matches_captum():
    torch.manual_seed(0)
    model = Residual().double().eval()
    ours, occlusion, theirs = both(
        model, images(2), sliding_window_shapes=(C, 6, 5), strides=(1, 3, 2), target=2
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


def test_float32_matches_captum():
    inputs = images(2, torch.float32)
    ours, occlusion, theirs = both(
        small_cnn(torch.float32), inputs, sliding_window_shapes=(C, 6, 6), strides=4, baselines=0.25, target=3
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float32)


def test_tuple_input_returns_a_tuple():
    ours, occlusion, theirs = both(
        small_cnn(), (images(),), sliding_window_shapes=((C, 6, 6),), strides=4, target=0
    )
    assert occlusion.last_fallback_reason is None
    assert isinstance(ours, tuple) and len(ours) == 1
    assert_matches_captum(ours[0], theirs[0], torch.float64)


def test_engines_are_reused_and_refreshed_when_weights_change():
    model = small_cnn()
    occlusion = kfx.captum.Occlusion(model)
    occlusion.attribute(images(), (C, 6, 6), strides=4, target=1)
    engines = dict(occlusion._engines)
    occlusion.attribute(images(seed=2), (C, 6, 6), strides=4, target=2)
    assert occlusion._engines == engines  # same engine objects, no recompilation

    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    ours = occlusion.attribute(images(), (C, 6, 6), strides=4, target=1)
    theirs = captum_attr.Occlusion(model).attribute(images(), (C, 6, 6), strides=4, target=1)
    assert_matches_captum(ours, theirs, torch.float64)


@st.composite
def occlusion_calls(draw):
    """A consistent call: an image size, a window that fits, strides Captum accepts (<= the window)."""
    height, width = draw(st.integers(4, 13), label="height"), draw(st.integers(4, 13), label="width")
    window = (
        C,
        draw(st.integers(1, height), label="window h"),
        draw(st.integers(1, width), label="window w"),
    )
    strides = (
        1,
        draw(st.integers(1, window[1]), label="stride h"),
        draw(st.integers(1, window[2]), label="stride w"),
    )
    return (height, width), window, strides


@settings(max_examples=15)
@given(call=occlusion_calls(), seed=st.integers(0, 2**16))
def test_any_window_matches_captum(call, seed):
    (height, width), window, strides = call
    torch.manual_seed(seed)
    model = (
        nn.Sequential(
            nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * height * width, 3)
        )
        .double()
        .eval()
    )
    inputs = torch.randn(2, C, height, width, dtype=torch.float64)
    ours, occlusion, theirs = both(
        model, inputs, sliding_window_shapes=window, strides=strides, target=[0, 2]
    )
    assert occlusion.last_fallback_reason is None
    assert_matches_captum(ours, theirs, torch.float64)


# -- fallbacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_model, kwargs, reason",
    [
        (lambda: lambda x: small_cnn()(x), {}, "nn.Module"),
        (small_cnn, {"sliding_window_shapes": (1, 6, 6), "strides": (1, 4, 4)}, "channels"),
        (lambda: small_cnn().train(), {}, "training mode"),
        (lambda: DataDependent().eval(), {}, "could not trace"),
        (small_cnn, {"target": None}, "one"),
    ],
    ids=[
        "lambda",
        "window-not-spanning-channels",
        "train-mode",
        "untraceable",
        "no-target",
    ],
)
def test_fallbacks_give_captums_result_and_a_reason(make_model, kwargs, reason):
    arguments = {"sliding_window_shapes": (C, 6, 6), "strides": 4, "target": 1, **kwargs}
    model = make_model()
    occlusion = kfx.captum.Occlusion(model)
    with pytest.warns(kfx.captum.NotAcceleratedWarning, match=reason):
        ours = occlusion.attribute(images(2), **arguments)
    theirs = captum_attr.Occlusion(model).attribute(images(2), **arguments)
    assert reason in occlusion.last_fallback_reason
    assert torch.equal(ours, theirs)


def test_additional_forward_args_fall_back():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()

        def forward(self, x, scale):
            return self.body(x) * scale

    model = Scaled().eval()
    occlusion = kfx.captum.Occlusion(model)
    with pytest.warns(kfx.captum.NotAcceleratedWarning):
        ours = occlusion.attribute(images(), (C, 6, 6), strides=4, target=0, additional_forward_args=(2.0,))
    theirs = captum_attr.Occlusion(model).attribute(
        images(), (C, 6, 6), strides=4, target=0, additional_forward_args=(2.0,)
    )
    assert "additional_forward_args" in occlusion.last_fallback_reason
    assert torch.equal(ours, theirs)


def test_fast_path_after_a_fallback_clears_the_reason():
    occlusion = kfx.captum.Occlusion(small_cnn())
    with pytest.warns(kfx.captum.NotAcceleratedWarning):
        occlusion.attribute(images(), (1, 6, 6), strides=(1, 4, 4), target=1)
    assert occlusion.last_fallback_reason is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        occlusion.attribute(images(), (C, 6, 6), strides=4, target=1)
    assert occlusion.last_fallback_reason is None


def test_without_captum_a_fallback_raises_a_kfx_error(monkeypatch):
    monkeypatch.setattr(kfx.captum, "_captum_occlusion", lambda: None)
    occlusion = kfx.captum.Occlusion(small_cnn())
    with pytest.raises(kfx.PatchError, match="channels.*pip install captum"):
        occlusion.attribute(images(), (1, 6, 6), strides=(1, 4, 4), target=1)
    with pytest.raises(kfx.ModelError, match="not installed"):
        kfx.captum.Occlusion(lambda x: x.sum((1, 2, 3))).attribute(images(), (C, 6, 6), strides=4)
    # The fast path needs no captum at all.
    occlusion.attribute(images(), (C, 6, 6), strides=4, target=1)
    assert occlusion.last_fallback_reason is None


@pytest.mark.parametrize(
    "window, strides, match",
    [
        ((C, H + 1, 6), 4, "larger than the input"),
        ((C, 6, 6), (1, 7, 4), "exceed the window"),
        ((C, 0, 6), 1, "at least 1"),
        ((C, 6), 1, "tuple of 3 ints"),
    ],
)
def test_bad_windows_raise_patch_errors_where_captum_asserts(window, strides, match):
    with pytest.raises(kfx.PatchError, match=match):
        kfx.captum.Occlusion(small_cnn()).attribute(images(), window, strides=strides, target=0)
    if min(window) >= 1:
        with pytest.raises(AssertionError):
            captum_attr.Occlusion(small_cnn()).attribute(images(), window, strides=strides, target=0)


def test_bad_perturbations_per_eval_raise_input_errors():
    with pytest.raises(kfx.InputError, match="perturbations_per_eval"):
        kfx.captum.Occlusion(small_cnn()).attribute(images(), (C, 6, 6), perturbations_per_eval=0)


def test_doctests():
    assert doctest.testmod(kfx.captum).failed == 0


def test_a_replaced_module_recompiles_the_cached_engines():
    """kfx.captum caches engines per model; replacing a layer must not serve the old one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    model = model.double().eval()
    images = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    kwargs = dict(sliding_window_shapes=(3, 3, 3), strides=(3, 2, 2), baselines=0.0, target=1)
    occlusion = kfx.captum.Occlusion(model)
    occlusion.attribute(images, **kwargs)
    model[3] = nn.Linear(4 * 8 * 8, 3).double().eval()
    expected = captum_attr.Occlusion(model).attribute(images, **kwargs)
    got = occlusion.attribute(images, **kwargs)
    assert occlusion.last_fallback_reason is None
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)
