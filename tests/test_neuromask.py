"""kfx.neuromask: the mask finds the region a model looks at; range, shape, determinism, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfx.errors import InputError, KfxError, ModelError
from kfx.neuromask import neuromask

SIZE = 32
REGION = (8, 20, 12, 26)  # rows 8:20, cols 12:26: the only pixels the model reads


class RegionModel(nn.Module):
    """A small CNN whose 2-class output depends only on ``image[:, :, y0:y1, x0:x1]``.

    It crops the region first, so no receptive field leaks outside it; no biases, so an all-zero
    input gives equal logits (P = 0.5) and the mask must keep region pixels to keep the prediction.
    """

    def __init__(self, region: tuple[int, int, int, int] = REGION, seed: int = 0):
        super().__init__()
        self.region = region
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.region
        x = x[:, :, y0:y1, x0:x1]
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3))) * 4.0


def _image(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, SIZE, SIZE, generator=generator) * 2 - 1


def _inside(mask: torch.Tensor) -> torch.Tensor:
    y0, y1, x0, x1 = REGION
    inside = torch.zeros_like(mask, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    return inside


@pytest.fixture(scope="module")
def model() -> RegionModel:
    return RegionModel().eval()


@pytest.fixture(scope="module")
def mask(model) -> torch.Tensor:
    return neuromask(model, _image())


def test_the_test_model_is_confident_and_blind_outside_the_region(model):
    image = _image()
    with torch.no_grad():
        probs = torch.softmax(model(image[None]), dim=1)[0]
        assert float(probs.max()) > 0.9  # a prediction worth explaining (measured 0.99)
        torch.testing.assert_close(
            torch.softmax(model(torch.zeros_like(image)[None]), dim=1)[0], torch.full((2,), 0.5)
        )
    outside = image.clone()
    outside[:, ~_inside(image[0])] = 5.0
    with torch.no_grad():
        torch.testing.assert_close(model(outside[None]), model(image[None]))


def test_mask_shape_dtype_and_range(mask):
    assert mask.shape == (SIZE, SIZE)
    assert mask.dtype == torch.float32
    assert bool(torch.isfinite(mask).all())
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0


def test_mask_concentrates_on_the_region_the_model_reads(mask):
    inside = _inside(mask)
    mean_in, mean_out = float(mask[inside].mean()), float(mask[~inside].mean())
    # Measured with the defaults (seed 0): inside mean 0.063 with 14 of 168 pixels above 0.5;
    # outside mean 2e-9, max 1.2e-8 (W pushed to about -t). Margins: 2x inside, 100x outside.
    assert mean_out < 1e-6
    assert float(mask[~inside].max()) < 1e-4
    assert mean_in > 0.03
    assert int((mask[inside] > 0.5).sum()) >= 5
    assert mean_in > 1000 * mean_out


def test_mask_keeps_the_prediction(model, mask):
    image = _image()
    label = int(model(image[None]).argmax())
    with torch.no_grad():
        probs = torch.softmax(model((mask * image)[None]), dim=1)[0]
    # Measured: 0.91 (base 0.99); with no mask at all the model says 0.5.
    assert float(probs[label]) > 0.8


def test_same_seed_same_mask_other_seed_other_mask(model, mask):
    again = neuromask(model, _image())
    assert torch.equal(mask, again)
    other = neuromask(model, _image(), seed=1)
    assert not torch.equal(mask, other)


def test_batched_image_and_explicit_target(model):
    image = _image()
    a = neuromask(model, image[None], target=0, steps=20)
    b = neuromask(model, image, target=0, steps=20)
    assert a.shape == (SIZE, SIZE)
    assert torch.equal(a, b)


def test_model_is_left_untouched(model):
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():  # gradients for the mask are enabled inside even under no_grad
        neuromask(model, _image(), steps=5)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])
    assert not model.training


def test_works_under_inference_mode_and_in_float64(mask):
    model = RegionModel().eval()
    with torch.inference_mode():
        again = neuromask(model, _image())
    assert torch.equal(again, mask)
    mask64 = neuromask(model.double(), _image().double(), steps=20)
    assert mask64.dtype == torch.float64 and mask64.shape == (SIZE, SIZE)


class _PairOutput(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)), x.sum()


BAD_INPUTS = [
    (InputError, {"image": [[0.0]]}),
    (InputError, {"image": torch.zeros(SIZE, SIZE)}),
    (InputError, {"image": torch.zeros(2, 3, SIZE, SIZE)}),
    (InputError, {"image": torch.zeros(3, 0, SIZE)}),
    (InputError, {"image": torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)}),
    (InputError, {"image": torch.zeros(3, SIZE, SIZE, dtype=torch.float64)}),
    (InputError, {"image": torch.full((3, SIZE, SIZE), float("nan"))}),
    (InputError, {"image": torch.full((3, SIZE, SIZE), float("inf"))}),
    (InputError, {"target": 2}),
    (InputError, {"target": -1}),
    (InputError, {"target": True}),
    (InputError, {"target": 0.0}),
    (InputError, {"steps": 0}),
    (InputError, {"steps": 2.5}),
    (InputError, {"steps": True}),
    (InputError, {"lr": 0.0}),
    (InputError, {"lr": float("nan")}),
    (InputError, {"t": -1.0}),
    (InputError, {"l_sp": -0.1}),
    (InputError, {"l_sm": "1"}),
    (InputError, {"seed": 0.5}),
]


@pytest.mark.parametrize(("error", "kwargs"), BAD_INPUTS, ids=[repr(k)[:60] for _, k in BAD_INPUTS])
def test_bad_input_raises_input_error(model, error, kwargs):
    kwargs = {"image": _image(), **kwargs}
    image = kwargs.pop("image")
    with pytest.raises(error) as info:
        neuromask(model, image, **kwargs)
    assert isinstance(info.value, KfxError)


def test_training_mode_raises_model_error():
    model = RegionModel().train()
    with pytest.raises(ModelError, match=r"model\.eval\(\)") as info:
        neuromask(model, _image(), steps=1)
    assert isinstance(info.value, KfxError)
    model.eval()
    model.conv2.train()  # one submodule left in training mode is enough
    with pytest.raises(ModelError, match="conv2"):
        neuromask(model, _image(), steps=1)


@pytest.mark.parametrize(
    "model", [lambda x: x, _PairOutput().eval(), nn.Identity().eval()], ids=["function", "tuple", "4d"]
)
def test_unusable_model_raises_model_error(model):
    with pytest.raises(ModelError) as info:
        neuromask(model, _image(), steps=1)
    assert isinstance(info.value, KfxError)
