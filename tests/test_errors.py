"""Bad input gets a kfx.KfxError subclass that says what is wrong; never a silent wrong map."""

import pytest
import torch
from torch import nn

import kfx


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()


@pytest.fixture
def engine():
    return kfx.compile(small_model(), (3, 8, 8), kfx.Patch(3, stride=2))


def test_error_hierarchy():
    for cls in (kfx.InputError, kfx.PatchError, kfx.ModelError, kfx.TraceError):
        assert issubclass(cls, kfx.KfxError)


@pytest.mark.parametrize(
    "image, match",
    [
        (torch.zeros(3, 9, 8), r"shape \[3, 9, 8\].*compiled for \[3, 8, 8\]"),
        (torch.zeros(2, 3, 8, 8), r"shape \[2, 3, 8, 8\]"),
        (torch.zeros(3, 8, 8, dtype=torch.float64), r"dtype is torch.float64.*image.to\(torch.float32\)"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), r"dtype is torch.int64"),
        (torch.full((3, 8, 8), float("nan")), r"NaN or infinite"),
        ([[0.0]], r"must be a torch.Tensor"),
    ],
)
def test_bad_images(engine, image, match):
    with pytest.raises(kfx.InputError, match=match):
        engine(image)


def test_bad_positions(engine):
    image = torch.zeros(3, 8, 8)
    with pytest.raises(kfx.InputError, match=r"\(6, 0\) puts the 3x3 patch outside"):
        engine.outputs(image, torch.tensor([[0, 0], [6, 0]]))
    with pytest.raises(kfx.InputError, match="integers"):
        engine.outputs(image, torch.tensor([[0.5, 1.0]]))
    with pytest.raises(kfx.InputError, match=r"shape \[N, 2\]"):
        engine.outputs(image, torch.tensor([[0, 0, 0]]))


def test_bad_target(engine):
    with pytest.raises(kfx.InputError, match=r"class index in \[0, 5\)"):
        engine(torch.zeros(3, 8, 8), target=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=9), r"larger than the image 8x8"),
        (dict(size=(2, 10)), r"larger than the image"),
        (dict(size=3, stride=0), r"stride must be at least 1"),
        (dict(size=0), r"at least 1 pixel"),
        (dict(size=3, fill=float("inf")), r"finite"),
        (dict(size=3, fill=(0.0, 1.0)), r"2 values but the image has 3 channels"),
        (dict(size=3, fill=torch.zeros(3, 2, 2)), r"shape \[C, 3, 3\]"),
        (dict(size=3, fill="gray"), r"fill must be"),
        (dict(size=2.5), r"int or a pair"),
    ],
)
def test_bad_patches(kwargs, match):
    with pytest.raises(kfx.PatchError, match=match):
        kfx.compile(small_model(), (3, 8, 8), kfx.Patch(**kwargs))


def test_training_mode_is_refused():
    with pytest.raises(kfx.ModelError, match=r"model.eval\(\)"):
        kfx.compile(small_model().train(), (3, 8, 8), kfx.Patch(3))


def test_untraceable_model():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(kfx.TraceError, match="could not trace DataDependent"):
        kfx.compile(DataDependent().eval(), (3, 8, 8), kfx.Patch(3))


def test_two_inputs_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(kfx.ModelError, match="exactly one image input"):
        kfx.compile(TwoInputs().eval(), (3, 8, 8), kfx.Patch(3))


def test_model_that_rejects_image_shape():
    with pytest.raises(kfx.ModelError, match="failed on an input of shape"):
        kfx.compile(small_model(), (3, 9, 9), kfx.Patch(3))


def test_bad_compile_arguments():
    with pytest.raises(kfx.InputError, match=r"\(C, H, W\)"):
        kfx.compile(small_model(), (8, 8), kfx.Patch(3))
    with pytest.raises(kfx.InputError, match="batch_size"):
        kfx.compile(small_model(), (3, 8, 8), kfx.Patch(3), batch_size=0)
    with pytest.raises(kfx.PatchError, match="kfx.Patch"):
        kfx.compile(small_model(), (3, 8, 8), "16")
    with pytest.raises(kfx.ModelError, match="nn.Module"):
        kfx.compile(lambda x: x, (3, 8, 8), kfx.Patch(3))


def test_non_classifier_output_needs_outputs():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1)).eval()
    engine = kfx.compile(model, (3, 8, 8), kfx.Patch(3))
    with pytest.raises(kfx.ModelError, match=r"engine.outputs"):
        engine(torch.zeros(3, 8, 8))
    assert engine.outputs(torch.zeros(3, 8, 8), [[0, 0]]).shape == (1, 2, 8, 8)
