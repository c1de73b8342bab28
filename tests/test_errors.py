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
        (dict(size=3, fill="gray"), r"unknown fill 'gray'"),
        (dict(size=3, fill=object()), r"fill must be"),
        (dict(size=2.5), r"int or 2 ints"),
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


class OptionalArguments(nn.Module):
    """forward(x, mask=None, scale=2.0, *, gated=False), as timm's VisionTransformer takes
    (x, attn_mask=None, is_causal=False): called with the image alone, the defaults choose the branches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x, mask=None, scale: float = 2.0, *, gated: bool = False):
        y = self.conv(x) * scale
        if mask is not None:
            y = y * mask
        if gated:
            y = y * torch.sigmoid(y.mean())
        return self.head(torch.relu(y).mean((2, 3)))


class StarArguments(OptionalArguments):
    """forward(x, *args, **kwargs) that reads neither (wrappers often pass them on to nothing)."""

    def forward(self, x, *args, **kwargs):
        return super().forward(x)


@pytest.mark.parametrize("model_class", [OptionalArguments, StarArguments])
def test_optional_arguments_keep_their_defaults(model_class):
    torch.manual_seed(0)
    model = model_class().double().eval()
    patch = kfx.Patch(3, stride=2)
    image = torch.randn(3, 9, 9, dtype=torch.float64)
    heatmap = kfx.compile(model, (3, 9, 9), patch)(image, 1)
    brute = kfx.NaiveEngine(model, (3, 9, 9), patch)(image, 1)  # the eager model, defaults and all
    torch.testing.assert_close(heatmap.values, brute.values, rtol=1e-12, atol=1e-12)


def test_an_argument_without_a_default_is_a_second_input():
    class ImageAndMask(nn.Module):
        def forward(self, x, mask, scale: float = 2.0):
            return (x * mask * scale).mean((2, 3))

    with pytest.raises(kfx.ModelError, match=r"exactly one image input.*\(x, mask\)"):
        kfx.compile(ImageAndMask().eval(), (3, 8, 8), kfx.Patch(3))

    class ReadsArgs(nn.Module):
        def forward(self, x, *args):
            return torch.stack(args).sum() * x.mean((1, 2, 3))[:, None]  # a second input, read

    with pytest.raises(kfx.ModelError, match=r"exactly one image input.*\(x, \*args\)"):
        kfx.compile(ReadsArgs().eval(), (3, 8, 8), kfx.Patch(3))


def test_model_that_rejects_image_shape(capfd):
    with pytest.raises(kfx.ModelError, match=r"failed on an input of shape.*cannot be multiplied"):
        kfx.compile(small_model(), (3, 9, 9), kfx.Patch(3))
    assert capfd.readouterr().err == ""  # the error says it all: no traceback printed beside it


def test_bad_compile_arguments():
    with pytest.raises(kfx.InputError, match=r"\(C, H, W\)"):
        kfx.compile(small_model(), (8,), kfx.Patch(3))
    with pytest.raises(kfx.ModelError, match=r"image_shape"):  # (C, L) is a signal: this model wants images
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


# -- issue #14.8: odd models and arguments get a KfxError (or work), never a raw exception ----------


class Returns(nn.Module):
    """small_model's scores wrapped in another container."""

    def __init__(self, wrap):
        super().__init__()
        self.body, self.wrap = small_model(), wrap

    def forward(self, x):
        return self.wrap(self.body(x))


@pytest.mark.parametrize(
    "wrap, match",
    [
        (lambda y: (y, y), "returns a tuple.*model\\(x\\)\\[0\\]"),
        (lambda y: {"logits": y}, "returns a dict"),
        (lambda y: [y], "returns a list"),
        (lambda y: y.sum(), r"returned shape \[\] for a batch of 2"),
    ],
)
def test_models_without_one_score_tensor_are_refused_at_compile(wrap, match):
    with pytest.raises(kfx.ModelError, match=match):
        kfx.compile(Returns(wrap).eval(), (3, 8, 8), kfx.Patch(3))


def test_models_that_need_batch_size_1_are_refused_at_compile():
    class BatchOfOne(nn.Module):
        def forward(self, x):
            return x.view(1, -1)

    with pytest.raises(kfx.ModelError, match=r"for a batch of 2 images"):
        kfx.compile(BatchOfOne().eval(), (3, 8, 8), kfx.Patch(3))


def test_no_positions_give_an_empty_batch(engine):
    out = engine.outputs(torch.zeros(3, 8, 8), torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, 5)


class SizedByShape(nn.Module):
    """Pool sizes and padding computed from x.size() and x.shape (static for a fixed image shape)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        pad = x.size(-1) // 8
        y = self.conv(torch.nn.functional.pad(x, (pad, pad, pad, pad), value=x.shape[1] / 10))
        y = torch.nn.functional.max_pool2d(y, y.size(2) // 2)
        y = torch.nn.functional.avg_pool2d(y, y.shape[2:])
        return self.fc(y.flatten(1))


def assert_exact_at_every_position(model: nn.Module) -> None:
    """The engine's outputs at every position of a 3x3 patch on 8x8 equal the model's on painted copies."""
    engine = kfx.compile(model, (3, 8, 8), kfx.Patch(3, stride=1))
    image = torch.randn(3, 8, 8, dtype=torch.float64)
    positions = kfx.grid_positions((8, 8), engine.patch)
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, engine.patch))
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=1e-12, atol=1e-12)


def test_pool_sizes_and_pad_values_from_shapes_are_exact():
    model = SizedByShape().double().eval()
    assert_exact_at_every_position(model)


class FiveDMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.size(0), 2, 2, 8, 8).mean((-2, -1)).flatten(1)


def test_a_mean_over_the_last_two_dims_of_a_5d_view_is_exact():
    model = FiveDMean().double().eval()
    engine = kfx.compile(model, (3, 8, 8), kfx.Patch(3))
    image = torch.randn(3, 8, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 0], [5, 2]])
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, engine.patch))
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("budget", ["inf", 1e400, float("nan"), "-3GB", "lots"])
def test_bad_memory_budgets(budget):
    with pytest.raises(kfx.InputError, match="max_memory"):
        kfx.compile(small_model(), (3, 8, 8), kfx.Patch(3), max_memory=budget)


@pytest.mark.parametrize("batch_size", [2.5, "8", 0, -1, True])
def test_bad_batch_sizes_at_call_time(engine, batch_size):
    image = torch.zeros(3, 8, 8)
    with pytest.raises(kfx.InputError, match="batch_size"):
        engine.outputs(image, [[0, 0]], batch_size=batch_size)
    with pytest.raises(kfx.InputError, match="batch_size"):
        engine(image, batch_size=batch_size)


def test_occlude_needs_a_tensor():
    import numpy as np

    with pytest.raises(kfx.InputError, match=r"torch.Tensor.*torch.from_numpy"):
        kfx.occlude(np.zeros((3, 8, 8)), [[0, 0]], kfx.Patch(3))


def test_numpy_and_0d_tensor_targets_are_accepted(engine):
    import numpy as np

    image = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = engine(image, target=3).values
    for target in (np.int64(3), np.array(3), torch.tensor(3)):
        torch.testing.assert_close(engine(image, target=target).values, expected, rtol=0, atol=0)
    with pytest.raises(kfx.InputError, match="class index"):
        engine(image, target=torch.tensor([3, 4]))
    with pytest.raises(kfx.InputError, match="class index"):
        engine(image, target=np.float64(3.0))


def test_meta_tensors_are_refused():
    with torch.device("meta"):
        meta_model = small_model()
    with pytest.raises(kfx.ModelError, match="meta device.*load_state_dict"):
        kfx.compile(meta_model.eval(), (3, 8, 8), kfx.Patch(3))
    engine = kfx.compile(small_model(), (3, 8, 8), kfx.Patch(3))
    with pytest.raises(kfx.InputError, match="meta device"):
        engine(torch.zeros(3, 8, 8, device="meta"))


def test_compiled_and_scripted_models_name_the_fix():
    model = small_model()
    with pytest.raises(kfx.ModelError, match="_orig_mod"):
        kfx.compile(torch.compile(model), (3, 8, 8), kfx.Patch(3))
    with pytest.raises(kfx.ModelError, match="TorchScript"):
        kfx.compile(torch.jit.script(model), (3, 8, 8), kfx.Patch(3))


def test_a_model_that_gives_nan_is_refused_with_a_reason():
    class NaNScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_model()

        def forward(self, x):
            return self.body(x) * float("nan")

    engine = kfx.compile(NaNScores().eval(), (3, 8, 8), kfx.Patch(3))  # the graph does match the model
    with pytest.raises(kfx.ModelError, match="NaN or infinite"):
        engine(torch.zeros(3, 8, 8))


class KeywordOnly(nn.Module):
    """Ops called with keyword arguments only (no node.args): found while turning rules into tables."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.sigmoid(input=self.conv(x))
        return self.fc(torch.mean(input=y, dim=(2, 3)))


def test_ops_called_with_keyword_arguments_only_are_exact():
    model = KeywordOnly().double().eval()
    assert_exact_at_every_position(model)
