"""More of the modern-CNN zoo (issue #16): padding that copies values (BlurPool's reflect pad),
reductions over channels (ResNeSt's radix sum, CBAM), space-to-depth stems (TResNet), weight-
standardised convs, timm modules fx cannot trace, and GroupNorm, InstanceNorm and ConvNeXt-V2's GRN
under both global-context modes.

Oracles: torch itself on the occluded images (exact mode), and for the local mode the rule replayed
by hand: each position's normalisation computed exactly on its occluded image, kept inside the
changed box only, the unoccluded image's values everywhere else.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfx
from tests.test_modern import (
    PATCH,
    POSITIONS,
    SHAPE,
    Classifier,
    assert_boxes_cover,
    assert_exact,
    ceiling,
    image,
    kept_inside_stem_box,
    seeded,
)


def assert_incremental(model: nn.Module, role: str, **options) -> kfx.Engine:
    """Exact against torch, nothing dense before the tail, and some node runs in ``role``."""
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3, **options)
    assert_exact(model, engine)
    assert engine.dense_nodes == []
    assert role in engine.roles().values()
    return engine


# -- padding that copies the map's own values --------------------------------------------------


class CopyPad(nn.Module):
    """A pad of the map's own values, then a 3x3 conv without padding (the same size back)."""

    def __init__(self, pad: nn.Module | str, width: int = 4):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(width, width, 3)

    def forward(self, x):
        padded = F.pad(x, (1, 1, 1, 1), mode=self.pad) if isinstance(self.pad, str) else self.pad(x)
        return self.conv(padded)


class BlurPool(nn.Module):
    """timm's BlurPool2d: reflect padding, then a fixed binomial filter per channel at stride 2."""

    def __init__(self, width: int = 4):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (taps[:, None] * taps[None, :] / 16).expand(width, 1, 3, 3).clone())

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=2, groups=x.shape[1])


PADS = {
    "F.pad reflect": "reflect",
    "F.pad replicate": "replicate",
    "F.pad circular": "circular",
    "ReflectionPad2d": nn.ReflectionPad2d(1),
    "ReplicationPad2d": nn.ReplicationPad2d(1),
    "CircularPad2d": nn.CircularPad2d(1),
}


@pytest.mark.parametrize("name", PADS)
def test_padding_that_copies_values_is_exact_and_incremental(name):
    assert_incremental(seeded(Classifier(CopyPad(PADS[name]))), "resample")


def test_blur_pool_is_exact_and_as_cheap_as_zero_padding():
    model = seeded(Classifier(BlurPool()))
    assert_incremental(model, "resample")
    zero_padded = seeded(Classifier(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)))
    # At a border the mirrored cells widen the box by one, and boxes keep one width everywhere: with
    # a 16-pixel patch that costs 7% of the ceiling (with 8 pixels, 12%; at 16 x 16 with 4, 18%).
    ceilings = [
        kfx.compile(m, (3, 128, 128), kfx.Patch(16)).cost().theoretical_speedup for m in (model, zero_padded)
    ]
    assert ceilings[0] == pytest.approx(ceilings[1], rel=0.1)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_copy_pad_boxes_cover_every_changed_output(mode):
    """Brute force along one axis: every output a change reaches lies in the box kfx.geometry gives
    (reflect reads backwards, circular wraps around), and the read-in window holds every input
    those outputs read."""
    from kfx.geometry import reach_output_span, reach_read_span
    from kfx.passes.resample import _axis_matrix, _reach

    matrix = _axis_matrix(lambda x: F.pad(x, (2, 3), mode=mode), (7,), 0, torch.float64)
    first, _ = _reach(matrix)
    if mode != "replicate":  # edge copies read forwards; mirrors and wraps do not
        assert list(first) != sorted(first)
    assert_boxes_cover(matrix, reach_output_span, reach_read_span)


def test_reflect_padding_is_exact_on_signals_and_volumes():
    for axes in (1, 3):
        conv, pad = (nn.Conv1d, nn.ReflectionPad1d) if axes == 1 else (nn.Conv3d, nn.ReflectionPad3d)
        shape = (2, 12) if axes == 1 else (2, 8, 8, 8)
        flat = 3 * (shape[1] - 2) ** axes  # conv 3, pad back by 1 each side, conv 3
        model = seeded(nn.Sequential(conv(2, 3, 3), pad(1), conv(3, 3, 3), nn.Flatten(), nn.Linear(flat, 2)))
        patch = kfx.Patch(3, stride=3, fill=0.0)
        engine = kfx.compile(model, shape, patch, batch_size=4)
        picture = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(axes))
        positions = torch.tensor([[0] * axes, [shape[1] - 3] * axes, [4] * axes])
        with torch.no_grad():
            expected = model(kfx.occlude(picture.clone(), positions, patch))
        torch.testing.assert_close(engine.outputs(picture, positions), expected, rtol=1e-12, atol=1e-12)
        assert "resample" in engine.roles().values()


# -- reductions over channels ------------------------------------------------------------------


class RadixSum(nn.Module):
    """ResNeSt's split: a conv to radix * C channels, viewed as [N, radix, C, H, W], summed over
    the radix; and a softmax across the radix of the same view."""

    def __init__(self, width: int = 4, radix: int = 2):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(width, width * radix, 3, padding=1)

    def forward(self, x):
        split = self.conv(x)
        batch, channels, height, width = split.shape
        split = split.reshape(batch, self.radix, channels // self.radix, height, width)
        return split.sum(dim=1) + torch.softmax(split, dim=1).amax(1)


class ChannelPooling(nn.Module):
    """CBAM's spatial attention: channel mean and max at each position, a conv, a sigmoid, x * it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


@pytest.mark.parametrize("body", [RadixSum, ChannelPooling])
def test_reductions_over_channels_are_exact_and_incremental(body):
    assert_incremental(seeded(Classifier(body())), "pointwise")


class SameBoxMerge(nn.Module):
    """``x + f(x)`` with f point-wise: both operands carry the same box, so the merge needs no windows."""

    def forward(self, x):
        return torch.addcmul(x, torch.sigmoid(x), x, value=0.5) - F.relu(x)


def test_a_merge_of_operands_with_one_box_runs_on_the_changed_values():
    engine = assert_incremental(seeded(Classifier(SameBoxMerge())), "pointwise")
    assert "merge" not in engine.roles().values()


# -- space to depth, weight standardisation, modules fx cannot trace -----------------------------


class SpaceToDepthStem(nn.Module):
    def __init__(self, space_to_depth: nn.Module):
        super().__init__()
        self.space_to_depth = space_to_depth
        self.conv = nn.Conv2d(3 * 4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv(self.space_to_depth(x)).mean((2, 3)))


def test_space_to_depth_stems_are_exact_and_incremental():
    timm_layers = pytest.importorskip("timm.layers", reason="the timm zoo needs timm: pip install 'kfx[dev]'")
    for module in (nn.PixelUnshuffle(2), None):
        if module is None:  # timm's fixed block size is 4; the conv then sees 48 channels
            model = SpaceToDepthStem(timm_layers.SpaceToDepth(4))
            model.conv = nn.Conv2d(48, 4, 3, padding=1)
        else:
            model = SpaceToDepthStem(module)
        model = seeded(model)
        engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
        assert_exact(model, engine)
        assert engine.dense_nodes == []
        assert engine.roles()["space_to_depth"] == "local"


def test_weight_standardised_convs_are_exact_and_cost_what_a_plain_conv_costs():
    timm_layers = pytest.importorskip("timm.layers", reason="the timm zoo needs timm: pip install 'kfx[dev]'")
    for conv in (timm_layers.StdConv2d(4, 4, 3, padding=1), timm_layers.ScaledStdConv2d(4, 4, 3, padding=1)):
        model = seeded(Classifier(conv))
        assert_incremental(model, "local")
        assert ceiling(model) == pytest.approx(ceiling(seeded(Classifier(nn.Conv2d(4, 4, 3, padding=1)))))


def test_weight_standardisation_runs_once_per_image_and_follows_new_weights():
    timm_layers = pytest.importorskip("timm.layers", reason="the timm zoo needs timm: pip install 'kfx[dev]'")
    model = seeded(Classifier(timm_layers.StdConv2d(4, 4, 3, padding=1)))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    standardising = [n for n in engine.program.graph.nodes if n.target is F.batch_norm]
    assert standardising == []  # computed by the base program, with the base activations
    assert_exact(model, engine)
    with torch.no_grad():
        model.body.weight.mul_(-1.5).add_(0.3)  # new weights: the standardised ones must follow
    assert_exact(model, engine)


class BranchesOnShape(nn.Module):
    """Control flow on a shape, which torch.fx cannot trace (timm's ConvMlp has the like)."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True) * x if x.shape[-1] > 4 else x


def test_a_module_timm_registers_as_not_traceable_is_kept_whole_without_a_hook():
    timm_layers = pytest.importorskip("timm.layers", reason="the timm zoo needs timm: pip install 'kfx[dev]'")

    class Registered(BranchesOnShape):
        pass

    model = seeded(Classifier(BranchesOnShape()))
    with pytest.raises(kfx.TraceError, match="leaf_modules"):
        kfx.compile(model, SHAPE, PATCH)  # not registered: the error says what to pass
    timm_layers.register_notrace_module(Registered)
    model = seeded(Classifier(Registered()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert [d.node for d in engine.dense_nodes] == ["body"]


# -- GroupNorm, InstanceNorm and GRN: global context in both modes ------------------------------


def tail(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """What the classifier does after its body."""
    return model.head(model.conv(x).mean((2, 3)))


class FunctionalGroupNorm(nn.GroupNorm):
    """timm's GroupNormAct spells it F.group_norm on its own parameters."""

    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ChannelsLastGRN(nn.Module):
    """ConvNeXt-V2's MLP in miniature: permute to NHWC, timm's GlobalResponseNorm, permute back."""

    def __init__(self, width: int = 4):
        super().__init__()
        from timm.layers.grn import GlobalResponseNorm

        self.grn = GlobalResponseNorm(width, channels_last=True)

    def forward(self, x):
        return self.grn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norms() -> dict:
    found = {
        "GroupNorm": lambda: nn.GroupNorm(2, 4),
        "F.group_norm": lambda: FunctionalGroupNorm(2, 4),
        "InstanceNorm2d": lambda: nn.InstanceNorm2d(4, affine=True),
    }
    try:
        import timm.layers  # noqa: F401

        found["GlobalResponseNorm"] = ChannelsLastGRN
    except ImportError:  # pragma: no cover - timm is in dev
        pass
    return found


NORMS = norms()


def local_oracle(model: Classifier, picture: torch.Tensor, positions, patch: kfx.Patch):
    """The local mode replayed by hand: the norm of each occluded image computed exactly, kept inside
    the stem's changed box (the patch grown by one pixel, one width everywhere, shifted inside at the
    borders); outside it, the unoccluded image's normalised map."""
    with torch.no_grad():
        return tail(model, kept_inside_stem_box(model.stem, model.body, picture, positions, patch))


@pytest.mark.parametrize("name", NORMS)
def test_global_norms_are_exact_and_dense_by_default_and_name_the_local_mode(name):
    model = seeded(Classifier(NORMS[name]()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert engine.dense_nodes and "global_context='local'" in engine.dense_nodes[0].reason


@pytest.mark.parametrize("name", NORMS)
def test_local_mode_normalises_inside_the_changed_box_only(name):
    model = seeded(Classifier(NORMS[name]()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3, global_context="local")
    assert engine.dense_nodes == []
    picture = image()
    local = engine.outputs(picture, POSITIONS)
    torch.testing.assert_close(local, local_oracle(model, picture, POSITIONS, PATCH), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        exact = model(kfx.occlude(picture.clone(), POSITIONS, PATCH))
    assert (local - exact).abs().max() > 1e-6  # the statistics change everywhere: an approximation
    assert engine(picture).approximate
    without = seeded(Classifier(nn.Identity()))
    assert engine.cost().theoretical_speedup >= 0.9 * ceiling(without)


def test_local_group_norm_keeps_float32_digits():
    """Statistics are summed about the base's group mean: float32 agrees with the float64 oracle."""
    model = seeded(Classifier(nn.GroupNorm(2, 4)))
    with torch.no_grad():
        model.stem.bias.add_(100.0)  # a large mean, the case naive sums of squares lose
    picture = image()
    expected = local_oracle(model, picture, POSITIONS, PATCH)
    engine = kfx.compile(model.float(), SHAPE, PATCH, batch_size=3, global_context="local")
    local = engine.outputs(picture.float(), POSITIONS).double()
    torch.testing.assert_close(local, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class RadixMeans(nn.Module):
    """Means of a [N, r, C, H, W] view: over its spatial dims (a global statistic per radix and
    channel), and over a channel dim and the spatial dims together (not one: it runs densely)."""

    def forward(self, x):
        split = x.reshape(x.shape[0], 2, x.shape[1] // 2, x.shape[2], x.shape[3])
        per_channel = split.mean((3, 4), keepdim=True)
        per_radix = split.mean((2, 3, 4), keepdim=True)
        return (split * per_channel * per_radix).reshape(x.shape)


def test_means_of_a_channel_split_view_are_exact():
    model = seeded(Classifier(RadixMeans()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    roles = engine.roles()
    assert roles["mean"] == "mean_delta"  # over the spatial dims: the exact delta
    assert roles["mean_1"] == "dense"  # over a channel dim too: projected, then run densely
