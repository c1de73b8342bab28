"""Operators that move or mix spatial positions, against brute force at every patch position.

kfx recomputes only the box a patch changed, one spatial axis at a time; an op that moves values
across positions (rolls, flips, transposes, strided slices, reshapes through the spatial dims,
copy pads, resampling, transposed convs, ...) must either get the right box or run densely. Each
model here is tiny and in float64; the oracle is the model itself on images this file paints
(constant fills) or on kfx.occlude's images (position-dependent fills, whose content
tests/test_fills.py checks against scipy), at every corner where the patch fits.

Also here: the ways a model can compute something other than what kfx compiled (a subclass kept
whole with ``leaf_modules=`` that overrides ``forward``, forward hooks, a layer of another rank than
the map, randomness in forward, and hooks, settings or plain tensor attributes changed after
compiling), which must run densely or be refused, never give a silently wrong map.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.nn.utils import prune

import kfx

IMAGE = (2, 8, 10)  # non-square, so that an op swapping H and W cannot pass by symmetry
PATCH = kfx.Patch(3, stride=1, fill=0.5)


def every_position(spatial: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(list(itertools.product(*(range(s - p + 1) for s, p in zip(spatial, size)))))


def painted(image: torch.Tensor, positions: torch.Tensor, size: tuple[int, ...], value: float):
    """The occluded images, one per position, painted by a plain loop (constant fills only)."""
    out = image.expand(len(positions), *image.shape).clone()
    for row, corner in zip(out, positions.tolist()):
        row[(slice(None), *(slice(c, c + s) for c, s in zip(corner, size)))] = value
    return out


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 and eval mode, its parameters and buffers drawn from ``seed`` (BatchNorm
    statistics that matter: a mean in [-1, 1], a variance in [0.5, 2])."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                low, high = (0.5, 2.0) if name.endswith("running_var") else (-1.0, 1.0)
                draw = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.copy_(draw * (high - low) + low)
    return model


def assert_exact(model: nn.Module, shape=IMAGE, patch=PATCH, *, image=None, **options) -> kfx.Engine:
    """The engine's outputs at every position equal the model on the occluded images (1e-10)."""
    model = seeded(model)
    if not any(p.is_floating_point() for p in [*model.parameters(), *model.buffers()]):
        options.setdefault("dtype", torch.float64)
    engine = kfx.compile(model, shape, patch, batch_size=16, **options)
    if image is None:
        image = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    picture = image[0] if image.dim() > len(shape) else image  # [1, C, *S] given: the engine takes it
    size = engine.patch.size
    positions = every_position(tuple(shape[1:]), size)
    if isinstance(patch.fill, (int, float)):
        occluded = painted(picture, positions, size, patch.fill)
    else:
        occluded = kfx.occlude(picture, positions, engine.patch)
    with torch.no_grad():
        expected = model(occluded)
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=1e-10, atol=1e-10)
    return engine


class After(nn.Module):
    """A conv (so that the op sees a changed map, not the image), then ``op``, then flatten: every
    output cell is compared, so a box that misses a changed cell shows."""

    def __init__(self, op, axes: int = 2, width: int = 2):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[axes - 1](2, width, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.conv(x)).flatten(1)


class Layers(nn.Module):
    """``nn.Sequential`` of the layers, then flatten."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x).flatten(1)


def _affine_grid_sample(y):
    theta = torch.tensor([[[0.9, 0.1, 0.05], [0.0, 1.0, 0.0]]], dtype=y.dtype).expand(y.shape[0], 2, 3)
    return F.grid_sample(y, F.affine_grid(theta, y.size(), align_corners=False), align_corners=False)


def _unpooled(y):
    pooled = F.max_pool2d(y, 2, return_indices=True)
    return F.max_unpool2d(pooled[0], pooled[1], 2)


# Functional ops on a [N, 2, 8, 10] map. Some run incrementally (with their own box rule), the rest
# densely; every one must be exact.
FUNCTIONAL_2D = {
    "roll W": lambda y: torch.roll(y, 3, dims=3),
    "roll H and W": lambda y: torch.roll(y, (2, -3), dims=(2, 3)),
    "flip W": lambda y: torch.flip(y, (3,)),
    "flip H": lambda y: y.flip(2),
    "transpose H W": lambda y: y.transpose(2, 3),
    "mT": lambda y: y.mT,
    "permute H W": lambda y: y.permute(0, 1, 3, 2),
    "permute H W and back": lambda y: y.permute(0, 1, 3, 2).relu().permute(0, 1, 3, 2) * y,
    "permute 0321 and back": lambda y: y.permute(0, 3, 2, 1).sigmoid().permute(0, 3, 2, 1),
    "strided slice": lambda y: y[:, :, :, ::2],
    "offset slice": lambda y: y[..., 1:-1],
    "offset slice both": lambda y: y[:, :, 1:-1, 2:],
    "channel slice": lambda y: y[:, 1:2] * y[:, :1],
    "narrow": lambda y: y.narrow(3, 2, 5),
    "index_select": lambda y: y.index_select(3, torch.tensor([3, 1, 0, 7])),
    "channel index": lambda y: y[:, [1, 0]],
    "pixel_shuffle": lambda y: F.pixel_shuffle(y.repeat(1, 2, 1, 1), 2),
    "pixel_unshuffle": lambda y: F.pixel_unshuffle(y, 2),
    "unfold": lambda y: F.unfold(y, 3, padding=1),
    "fold of unfold": lambda y: F.fold(F.unfold(y, 3, padding=1), (8, 10), 3, padding=1),
    "cumsum W": lambda y: y.cumsum(3),
    "cumprod H": lambda y: y.cumprod(2),
    "cummax W": lambda y: y.cummax(3).values,
    "sort W": lambda y: y.sort(3).values,
    "topk H": lambda y: y.topk(2, dim=2).values,
    "argmax W": lambda y: y.argmax(3).double(),
    "diff W": lambda y: torch.diff(y, dim=-1),
    "minus rolled": lambda y: y - y.roll(1, -1),
    "mean over H broadcast": lambda y: y - y.mean(dim=2, keepdim=True),
    "amax over W broadcast": lambda y: y * y.amax(dim=3, keepdim=True),
    "softmax over W": lambda y: y.softmax(-1),
    "softmax over C": lambda y: y.softmax(1),
    "logsumexp over C": lambda y: torch.logsumexp(y, 1, keepdim=True),
    "norm over W": lambda y: y.norm(dim=3),
    "norm over H W": lambda y: y / y.norm(dim=(2, 3), keepdim=True),
    "mean over W H reversed": lambda y: y.mean((3, 2)),
    "cat with rolled": lambda y: torch.cat([y, torch.roll(y, 1, 3)], 1),
    "cat with flipped": lambda y: torch.cat([y, y.flip(3)], 1),
    "stack with flipped": lambda y: torch.stack([y, y.flip(2)], 1).flatten(1, 2),
    "view merging C and H": lambda y: y.view(y.shape[0], -1, 10),
    "reshape through C H and back": lambda y: y.reshape(y.shape[0], 16, 10).reshape(y.shape[0], 2, 8, 10),
    "flatten then unflatten transposed": lambda y: y.flatten(1).view(y.shape[0], 2, 10, 8),
    "y @ y.T": lambda y: y @ y.transpose(-1, -2),
    "einsum over H": lambda y: torch.einsum("nchw,nchv->ncwv", y, y),
    "pad reflect": lambda y: F.pad(y, (2, 1, 1, 2), mode="reflect"),
    "pad replicate": lambda y: F.pad(y, (2, 1, 1, 2), mode="replicate"),
    "pad circular": lambda y: F.pad(y, (2, 1, 1, 2), mode="circular"),
    "pad negative": lambda y: F.pad(y, (-1, 2, -2, 1)),
    "pad negative circular": lambda y: F.pad(y, (-1, 2, -2, 1), mode="circular"),
    "pad W only": lambda y: F.pad(y, (2, 1)),
    "shift by pad, then add": lambda y: y + F.pad(y, (1, -1, -2, 2)),
    "bilinear x1.5": lambda y: F.interpolate(y, scale_factor=1.5, mode="bilinear"),
    "bilinear x0.7 align_corners": lambda y: F.interpolate(
        y, scale_factor=0.7, mode="bilinear", align_corners=True
    ),
    "bilinear x(1.5, 0.5)": lambda y: F.interpolate(y, scale_factor=(1.5, 0.5), mode="bilinear"),
    "area": lambda y: F.interpolate(y, size=(5, 7), mode="area"),
    "bicubic x1.3": lambda y: F.interpolate(y, scale_factor=1.3, mode="bicubic"),
    "nearest-exact": lambda y: F.interpolate(y, size=(11, 6), mode="nearest-exact"),
    "nearest x0.3": lambda y: F.interpolate(y, scale_factor=0.3, mode="nearest"),
    "antialiased bilinear": lambda y: F.interpolate(y, size=(5, 6), mode="bilinear", antialias=True),
    "antialiased bicubic": lambda y: F.interpolate(y, size=(5, 6), mode="bicubic", antialias=True),
    "down, up, add": lambda y: (
        y + F.interpolate(F.interpolate(y, size=(3, 4), mode="nearest-exact"), size=(8, 10))
    ),
    "interpolate to 1x1, add": lambda y: F.interpolate(y, size=(1, 1), mode="bilinear") + y,
    "adaptive avg to 3x4": lambda y: F.adaptive_avg_pool2d(y, (3, 4)),
    "adaptive avg to (1, None)": lambda y: F.adaptive_avg_pool2d(y, (1, None)),
    "adaptive max to 3x4": lambda y: F.adaptive_max_pool2d(y, (3, 4)),
    "max_pool with indices, unpool": _unpooled,
    "max_pool ceil_mode": lambda y: F.max_pool2d(y, 3, 2, ceil_mode=True),
    "max_pool ceil_mode padded": lambda y: F.max_pool2d(y, 3, 2, 1, ceil_mode=True),
    "max_pool dilated ceil_mode": lambda y: F.max_pool2d(y, 2, 2, 1, 2, ceil_mode=True),
    "avg_pool ceil_mode excluding pad": lambda y: F.avg_pool2d(
        y, 3, 2, 1, ceil_mode=True, count_include_pad=False
    ),
    "lp_pool": lambda y: F.lp_pool2d(y, 2, 2),
    "channel_shuffle": lambda y: F.channel_shuffle(y, 2),
    "grid_sample": _affine_grid_sample,
    "size(dim=) in a view": lambda y: y.view(y.size(dim=0), -1),
    "size(dim=) in arithmetic": lambda y: y * y.size(dim=1),
}


@pytest.mark.parametrize("name", FUNCTIONAL_2D)
def test_functional_spatial_ops_are_exact(name):
    assert_exact(After(FUNCTIONAL_2D[name]))


def _conv(*args, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(2, 2, *args, **kwargs)


MODULES_2D = {
    "conv reflect": lambda: Layers(_conv(3, padding=1, padding_mode="reflect")),
    "conv circular dilated": lambda: Layers(_conv(3, padding=2, padding_mode="circular", dilation=2)),
    "conv replicate strided": lambda: Layers(_conv(3, stride=2, padding=1, padding_mode="replicate")),
    "conv reflect grouped": lambda: Layers(nn.Conv2d(2, 4, 3, padding=1, groups=2, padding_mode="reflect")),
    "conv same even kernel": lambda: Layers(_conv(4, padding="same")),
    "conv same even dilated": lambda: Layers(_conv((2, 4), padding="same", dilation=(3, 2))),
    "conv asymmetric": lambda: Layers(_conv((3, 5), padding=(0, 3), stride=(1, 2))),
    "conv padding beyond the kernel": lambda: Layers(_conv(3, stride=2, padding=(4, 3))),
    "conv (1, 5) dilated": lambda: Layers(_conv((1, 5), stride=(2, 1), dilation=(1, 2), padding=(0, 3))),
    "transposed output_padding": lambda: Layers(nn.ConvTranspose2d(2, 2, 3, 2, padding=1, output_padding=1)),
    "transposed stride 2 dilation 2": lambda: Layers(nn.ConvTranspose2d(2, 2, 3, stride=2, dilation=2)),
    "transposed dilation 3": lambda: Layers(
        nn.ConvTranspose2d(2, 2, 3, 2, padding=2, output_padding=1, dilation=3)
    ),
    "transposed stride 3": lambda: Layers(nn.ConvTranspose2d(2, 2, 2, stride=3, padding=1, output_padding=2)),
    "transposed grouped": lambda: Layers(nn.ConvTranspose2d(2, 4, 3, stride=2, padding=2, groups=2)),
    "transposed 1x1 stride 2": lambda: Layers(nn.ConvTranspose2d(2, 2, 1, stride=2)),
    "transposed asymmetric": lambda: Layers(
        nn.ConvTranspose2d(
            2, 2, (2, 3), stride=(1, 2), padding=(0, 1), output_padding=(0, 1), dilation=(2, 1)
        )
    ),
    "PixelUnshuffle": lambda: Layers(
        _conv(3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(8, 2, 3, padding=1)
    ),
    "PixelShuffle": lambda: Layers(nn.Conv2d(2, 8, 3, padding=1), nn.PixelShuffle(2), _conv(3)),
    "ReflectionPad2d asymmetric": lambda: Layers(nn.ReflectionPad2d((3, 0, 2, 1)), _conv(3)),
    "ReplicationPad2d wide": lambda: Layers(nn.ReplicationPad2d(5), _conv(3, stride=2)),
    "CircularPad2d wide": lambda: Layers(nn.CircularPad2d((4, 4, 3, 3)), _conv(3)),
    "ZeroPad2d negative": lambda: Layers(nn.ZeroPad2d((-2, 1, 1, -3)), _conv(3)),
    "ConstantPad2d then max_pool": lambda: Layers(nn.ConstantPad2d((1, 2, 0, 1), 3.5), nn.MaxPool2d(2)),
    "AdaptiveAvgPool2d mid-network": lambda: Layers(
        _conv(3, padding=1), nn.AdaptiveAvgPool2d((4, 5)), _conv(3)
    ),
    "AdaptiveMaxPool2d mid-network": lambda: Layers(
        _conv(3, padding=1), nn.AdaptiveMaxPool2d((4, 5)), _conv(3)
    ),
    "Upsample nearest": lambda: Layers(nn.Upsample(scale_factor=2), _conv(3, stride=2)),
    "Upsample bilinear align_corners": lambda: Layers(
        nn.Upsample(size=(13, 7), mode="bilinear", align_corners=True), _conv(3)
    ),
    "AvgPool2d excluding pad": lambda: Layers(nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    "AvgPool2d divisor_override": lambda: Layers(nn.AvgPool2d(3, 1, 1, divisor_override=2)),
    "MaxPool2d ceil_mode": lambda: Layers(nn.MaxPool2d((2, 3), (1, 2), (1, 1), ceil_mode=True)),
    "ChannelShuffle": lambda: Layers(_conv(3, padding=1), nn.ChannelShuffle(2), _conv(3)),
    "LocalResponseNorm": lambda: Layers(_conv(3, padding=1), nn.LocalResponseNorm(3), _conv(3)),
    "Softmax2d": lambda: Layers(_conv(3, padding=1), nn.Softmax2d(), _conv(3)),
    "Unfold": lambda: Layers(_conv(3, padding=1), nn.Unfold(3, padding=1)),
    "U-Net step": lambda: UNetStep(),
}


class UNetStep(nn.Module):
    """Pool, conv, upsample or transposed conv back, concatenated or added to the skip connection."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(2, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)

    def forward(self, x):
        upsampled = F.interpolate(self.down(F.max_pool2d(x, 2)), scale_factor=2)
        return torch.cat([x + self.up(F.max_pool2d(x, 2)), upsampled], 1).flatten(1)


@pytest.mark.parametrize("name", MODULES_2D)
def test_spatial_layers_are_exact(name):
    assert_exact(MODULES_2D[name]())


class Buffered(nn.Module):
    """A map combined with a tensor the model holds, read at each spatial position."""

    def __init__(self, combine):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 2, 8, 10))
        self.register_buffer("mask", torch.rand(1, 1, 8, 10))
        self.combine = combine

    def forward(self, x):
        return self.combine(self, self.conv(x)).flatten(1)


BUFFERED = {
    "positional embedding": lambda s, y: (y + s.pos).relu(),
    "mask": lambda s, y: y * s.mask,
    "flipped mask": lambda s, y: y * s.mask.flip(-1),
    "mask minus map": lambda s, y: s.mask - y,
    "mask over map": lambda s, y: s.mask / (y.abs() + 1),
    "maximum with mask": lambda s, y: torch.maximum(y, s.mask),
    "clamp below the mask": lambda s, y: torch.clamp(y, min=s.mask),
    "where the mask": lambda s, y: torch.where(s.mask > 0.5, y, -y),
    "addcmul with mask": lambda s, y: torch.addcmul(y, s.mask, y),
    "coordinates from the shape": lambda s, y: y + torch.arange(y.shape[-1], dtype=y.dtype),
    "coordinate channel": lambda s, y: (
        y + torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype).expand(1, 1, y.shape[2], y.shape[3])
    ),
}


@pytest.mark.parametrize("name", BUFFERED)
def test_tensors_the_model_reads_per_position_are_exact(name):
    assert_exact(Buffered(BUFFERED[name]))


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al. 2021): pools over W and over H, concatenates the two along a
    spatial dim after a permute, splits them again, and gates the map by both."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.pool_h, self.pool_w = nn.AdaptiveAvgPool2d((None, 1)), nn.AdaptiveAvgPool2d((1, None))
        self.mix, self.norm = nn.Conv2d(width, width, 1), nn.BatchNorm2d(width)
        self.conv_h, self.conv_w = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)

    def forward(self, x):
        x = self.stem(x)
        h, w = x.size(2), x.size(3)
        y = torch.cat([self.pool_h(x), self.pool_w(x).permute(0, 1, 3, 2)], dim=2)
        y_h, y_w = torch.split(F.hardswish(self.norm(self.mix(y))), [h, w], dim=2)
        gate = self.conv_h(y_h).sigmoid() * self.conv_w(y_w.permute(0, 1, 3, 2)).sigmoid()
        return (x * gate).flatten(1)


class ShiftedWindows(nn.Module):
    """Swin's shifted windows: roll, partition into 2x2 windows, attend within each, merge, roll back."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.value = nn.Linear(width, width)

    def forward(self, x):
        x = torch.roll(self.stem(x).permute(0, 2, 3, 1), shifts=(-1, -1), dims=(1, 2))
        n, h, w, c = x.shape
        windows = x.view(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        attended = (windows @ windows.transpose(-2, -1)).softmax(-1) @ self.value(windows)
        x = attended.view(n, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        return torch.roll(x, (1, 1), (1, 2)).flatten(1)


class UnfoldedPatches(nn.Module):
    """MobileViT's unfolding: 2x2 patches by reshapes and transposes, a Linear across each patch's
    pixels, folded back and added to the map."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.across = nn.Linear(width, width)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        t = (
            x.reshape(n * c * h // 2, 2, w // 2, 2)
            .transpose(1, 2)
            .reshape(n, c, h * w // 4, 4)
            .transpose(1, 3)
        )
        t = self.across(t).transpose(1, 3).reshape(n * c * h // 2, w // 2, 2, 2).transpose(1, 2)
        return (t.reshape(n, c, h, w) + x).flatten(1)


@pytest.mark.parametrize("block", [CoordinateAttention, ShiftedWindows, UnfoldedPatches])
def test_blocks_that_move_positions_are_exact(block):
    assert_exact(block())


class ChannelsLast(nn.Module):
    """ConvNeXt-style regions: permute to [N, H, W, C], per-position layers, and back."""

    def __init__(self, body):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm, self.linear = nn.LayerNorm(4), nn.Linear(4, 4)
        self.over_w, self.over_h = nn.Linear(10, 10), nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(8, 10, 4))
        self.batch_norm, self.prelu = nn.BatchNorm2d(8), nn.PReLU(8)
        self.body = body

    def forward(self, x):
        return self.body(self, self.conv(x)).flatten(1)


def _nhwc(y):
    return y.permute(0, 2, 3, 1)


def _nchw(y):
    return y.permute(0, 3, 1, 2)


CHANNELS_LAST = {
    "ConvNeXt block": lambda s, y: _nchw(s.linear(s.norm(_nhwc(y))).relu()) + y,
    "ConvNeXt block by transpose(1, 3)": lambda s, y: (
        s.linear(s.norm(y.transpose(1, 3))).relu().transpose(1, 3) + y
    ),
    "positional embedding [H, W, C]": lambda s, y: _nchw(_nhwc(y) + s.pos),
    "Linear over W": lambda s, y: s.over_w(y),
    "Linear over H after a permute": lambda s, y: s.over_h(y.permute(0, 3, 1, 2)),
    "mean over H": lambda s, y: _nhwc(y).mean(1),
    "mean over C kept": lambda s, y: _nchw(_nhwc(y).mean(-1, keepdim=True)),
    "softmax over W": lambda s, y: _nchw(_nhwc(y).softmax(2)),
    "mean over H W": lambda s, y: _nhwc(y).mean((1, 2)),
    "cat over H": lambda s, y: _nchw(torch.cat([_nhwc(y), _nhwc(y).relu()], 1)),
    "layer_norm over W C": lambda s, y: _nchw(F.layer_norm(_nhwc(y), (10, 4))),
}


@pytest.mark.parametrize("name", CHANNELS_LAST)
def test_channels_last_regions_are_exact(name):
    assert_exact(ChannelsLast(CHANNELS_LAST[name]))


class ChannelsLastND(nn.Module):
    """The ConvNeXt block on a signal or a volume: to channels-last by ``permute``, ``transpose`` or
    ``.mT``, LayerNorm and Linear over channels, and back; then a conv, so the box must come back
    to where it was."""

    def __init__(self, axes: int, to_last, to_first):
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[axes]
        self.conv, self.after = conv(2, 4, 3, padding=1), conv(4, 3, 3, padding=1)
        self.norm, self.linear = nn.LayerNorm(4), nn.Linear(4, 4)
        self.to_last, self.to_first = to_last, to_first

    def forward(self, x):
        y = self.conv(x)
        y = self.to_first(self.linear(self.norm(self.to_last(y))).relu()) + y
        return self.after(y).flatten(1)


ND_CHANNELS_LAST = {
    "signal, permute": (1, lambda y: y.permute(0, 2, 1), lambda y: y.permute(0, 2, 1)),
    "signal, transpose": (1, lambda y: y.transpose(1, 2), lambda y: y.transpose(-1, -2)),
    "signal, mT": (1, lambda y: y.mT, lambda y: y.mT),
    "signal, swapaxes": (1, lambda y: torch.swapaxes(y, 1, 2), lambda y: y.swapdims(2, 1)),
    "signal, keywords": (1, lambda y: y.transpose(1, dim1=2), lambda y: torch.transpose(y, dim0=2, dim1=1)),
    "volume, permute": (3, lambda y: y.permute(0, 2, 3, 4, 1), lambda y: y.permute(0, 4, 1, 2, 3)),
    "volume, W and C swapped": (3, lambda y: y.transpose(1, 4), lambda y: y.transpose(1, 4)),
}


@pytest.mark.parametrize("name", ND_CHANNELS_LAST)
def test_channels_last_blocks_of_signals_and_volumes_are_exact_and_incremental(name):
    axes, to_last, to_first = ND_CHANNELS_LAST[name]
    shape, patch = (
        ((2, 12), kfx.Patch(3, stride=1, fill=0.5)) if axes == 1 else ((2, 4, 5, 6), kfx.Patch(2, fill=0.5))
    )
    engine = assert_exact(ChannelsLastND(axes, to_last, to_first), shape, patch)
    # incremental through the block, the conv after it, up to the flatten of the tail
    assert [node.node for node in engine.dense_nodes] == ["flatten"]


class PerChannelOnChannelsLast(nn.Module):
    """A BatchNorm or PReLU applied to a channels-last map whose H equals its C: torch runs it
    (it normalises along H), so kfx must not run it on boxes of a few rows."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.layer = layer

    def forward(self, x):
        return self.layer(_nhwc(self.conv(x))).permute(0, 3, 1, 2).flatten(1)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(8), nn.PReLU(8)], ids=["BatchNorm2d", "PReLU"])
def test_per_channel_layers_on_a_channels_last_map_run_densely(layer):
    engine = assert_exact(PerChannelOnChannelsLast(layer))
    assert "layer" in {node.node for node in engine.dense_nodes}


AXES_1 = {
    "flip": lambda y: y.flip(-1),
    "roll": lambda y: y.roll(3, -1),
    "pad reflect": lambda y: F.pad(y, (3, 1), mode="reflect"),
    "pad circular": lambda y: F.pad(y, (3, 4), mode="circular"),
    "pad negative": lambda y: F.pad(y, (-2, 3)),
    "linear x1.7": lambda y: F.interpolate(y, scale_factor=1.7, mode="linear"),
    "nearest x0.4": lambda y: F.interpolate(y, scale_factor=0.4),
    "area": lambda y: F.interpolate(y, size=5, mode="area"),
    "max_pool ceil_mode": lambda y: F.max_pool1d(y, 3, 2, 1, ceil_mode=True),
    "avg_pool ceil_mode": lambda y: F.avg_pool1d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "transposed dilated": lambda y: F.conv_transpose1d(
        y, torch.ones(2, 2, 3, dtype=y.dtype), stride=3, padding=1, output_padding=2, dilation=2
    ),
    "cumsum": lambda y: y.cumsum(-1),
    "adaptive avg to 3": lambda y: F.adaptive_avg_pool1d(y, 3),
    "adaptive avg 2-d of a signal": lambda y: F.adaptive_avg_pool2d(y, 1),
    "max_pool 2-d of a signal": lambda y: F.max_pool2d(y, 2),
    "transpose": lambda y: y.transpose(1, 2),
    "unfold": lambda y: y.unfold(2, 3, 2),
    "same even kernel": lambda y: F.conv1d(y, torch.ones(2, 2, 4, dtype=y.dtype), padding="same"),
}


@pytest.mark.parametrize("name", AXES_1)
def test_signal_ops_are_exact(name):
    assert_exact(After(AXES_1[name], axes=1), (2, 12), kfx.Patch(3, stride=1, fill=0.5))


AXES_3 = {
    "flip": lambda y: y.flip(2),
    "permute": lambda y: y.permute(0, 1, 3, 2, 4),
    "transpose": lambda y: y.transpose(3, 4),
    "pad reflect": lambda y: F.pad(y, (1, 1, 2, 0, 0, 1), mode="reflect"),
    "pad circular": lambda y: F.pad(y, (1, 1, 2, 0, 0, 1), mode="circular"),
    "pad negative": lambda y: F.pad(y, (1, -1, -2, 0, 0, 1)),
    "trilinear x1.5": lambda y: F.interpolate(y, scale_factor=1.5, mode="trilinear"),
    "trilinear per axis": lambda y: F.interpolate(y, scale_factor=(2.0, 1.0, 0.5), mode="trilinear"),
    "nearest-exact": lambda y: F.interpolate(y, size=(3, 7, 4), mode="nearest-exact"),
    "area": lambda y: F.interpolate(y, size=(3, 3, 4), mode="area"),
    "max_pool ceil_mode": lambda y: F.max_pool3d(y, 3, 2, 1, ceil_mode=True),
    "avg_pool excluding pad": lambda y: F.avg_pool3d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "adaptive avg mid-network": lambda y: F.adaptive_avg_pool3d(y, (2, 3, 4)),
    "mean over H W": lambda y: y.mean((3, 4)),
    "adaptive avg 2-d of a volume": lambda y: F.adaptive_avg_pool2d(y, 1),
}


@pytest.mark.parametrize("name", AXES_3)
def test_volume_ops_are_exact(name):
    assert_exact(After(AXES_3[name], axes=3), (2, 4, 5, 6), kfx.Patch(2, stride=1, fill=0.5))


def test_transposed_convs_of_volumes_are_exact():
    for layer in [
        nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose3d(2, 2, (2, 1, 3), stride=(2, 1, 2), padding=(0, 0, 1)),
    ]:
        assert_exact(Layers(layer), (2, 4, 5, 6), kfx.Patch((3, 1, 2), stride=(1, 2, 1), fill=-1.0))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.down(self.conv(x).relu()).mean((2, 3)))


def _images() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    return {
        "transposed view": draw(2, 10, 8).transpose(1, 2),
        "channels_last": draw(1, 2, 8, 10).to(memory_format=torch.channels_last),
        "permuted from HWC": draw(8, 10, 2).permute(2, 0, 1),
        "strided": draw(2, 16, 10)[:, ::2],
        "expanded": draw(1, 8, 10).expand(2, 8, 10),
    }


@pytest.mark.parametrize("layout", list(_images()))
@pytest.mark.parametrize("fill", [0.5, "blur", "mean_patch"])
def test_images_in_any_memory_layout_are_exact(layout, fill):
    assert_exact(Small(), IMAGE, kfx.Patch(3, stride=1, fill=fill), image=_images()[layout])


FILLS = {
    "mean_patch": "mean_patch",
    "mean_image": "mean_image",
    "blur": "blur",
    "wide blur per axis": kfx.fills.Blur(sigma=(0.0, 3.0)),
    "mean over channels": kfx.fills.MeanPatch(per_channel=False),
    "gaussian mask": None,
    "mask per channel": None,
}


def _fill(name: str, size: tuple[int, int]):
    if name == "gaussian mask":
        return kfx.fills.Multiply.gaussian(size)
    if name == "mask per channel":
        return kfx.fills.Multiply(torch.rand(2, *size, generator=torch.Generator().manual_seed(3)))
    return FILLS[name]


@pytest.mark.parametrize("name", FILLS)
@pytest.mark.parametrize("size, stride", [((4, 5), 1), ((9, 3), 2)], ids=["overlapping", "full height"])
def test_position_dependent_fills_are_exact_at_every_corner(name, size, stride):
    patch = kfx.Patch(size, stride=stride, fill=_fill(name, size))
    assert_exact(Small(), (2, 9, 11), patch)


# -- modules that compute something other than the op kfx recognises ---------------------------


class FlippingIdentity(nn.Identity):
    def forward(self, x):
        return x.flip(-1)


class RollingReLU(nn.ReLU):
    def forward(self, x):
        return torch.roll(x, 2, -1).relu()


class ReflectingZeroPad(nn.ZeroPad2d):
    def forward(self, x):
        return F.pad(x, self.padding, mode="reflect")


class MaxNotMean(nn.AdaptiveAvgPool2d):
    def forward(self, x):
        return x.amax((2, 3), keepdim=True)


class ClampedUpsample(nn.Upsample):
    """Linear on one-hot inputs and on standard normal ones (kfx's probes of a resampling op), not
    on the larger values the model feeds it: only its own forward says that it is not torch's op."""

    def forward(self, x):
        return super().forward(x).clamp(-4, 4)


class ShiftingConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(torch.roll(x, 1, -1), weight, bias)


class Around(nn.Module):
    """conv -> the module under test -> conv -> flatten."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.module = module
        self.head = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.head(self.module(self.conv(x))).flatten(1)


SUBCLASSES = {
    "Identity": FlippingIdentity,
    "ReLU": RollingReLU,
    "ZeroPad2d": lambda: ReflectingZeroPad(2),
    "AdaptiveAvgPool2d": lambda: MaxNotMean(1),
    "Upsample": lambda: ClampedUpsample(scale_factor=2),
    "Conv2d._conv_forward": lambda: ShiftingConv(2, 2, 3, padding=1),
}


@pytest.mark.parametrize("name", SUBCLASSES)
def test_a_leaf_module_that_overrides_forward_runs_densely(name):
    module = SUBCLASSES[name]()
    engine = assert_exact(Around(module), leaf_modules=(type(module),))
    assert "module" in {node.node for node in engine.dense_nodes}


def _scaled(module, args, output):
    return output * 2


def _flipped(module, args, output):
    return output.flip(-1)


def _flipped_input(module, args):
    return (args[0].flip(-1),)


def _observed(module, args, output):
    return None


HOOKS = {
    "conv output scaled": ("conv", "register_forward_hook", _scaled),
    "conv output flipped": ("conv", "register_forward_hook", _flipped),
    "conv input flipped": ("head", "register_forward_pre_hook", _flipped_input),
    "ReLU output flipped": ("module", "register_forward_hook", _flipped),
    "observer": ("module", "register_forward_hook", _observed),
}


@pytest.mark.parametrize("name", HOOKS)
def test_modules_with_forward_hooks_run_densely(name):
    where, register, hook = HOOKS[name]
    model = seeded(Around(nn.ReLU()))
    getattr(model.get_submodule(where), register)(hook)
    engine = assert_exact(model)
    assert where in {node.node for node in engine.dense_nodes}
    assert "forward hooks" in str(engine)


def test_a_global_module_hook_turns_modules_dense():
    handle = register_module_forward_hook(
        lambda module, args, out: out.flip(-1) if isinstance(module, nn.ReLU) else None
    )
    try:
        assert_exact(Around(nn.ReLU()))
    finally:
        handle.remove()


def test_a_hook_registered_after_compiling_is_refused():
    model = seeded(Around(nn.ReLU()))
    engine = kfx.compile(model, IMAGE, PATCH, batch_size=5)
    image = torch.randn(IMAGE, dtype=torch.float64)
    engine.outputs(image, torch.tensor([[0, 0]]))
    handle = model.conv.register_forward_hook(_scaled)
    with pytest.raises(kfx.ModelError, match="'conv'.*forward hooks.*[Cc]ompile again"):
        engine.outputs(image, torch.tensor([[0, 0]]))
    handle.remove()
    engine.outputs(image, torch.tensor([[0, 0]]))  # without it, the engine runs again


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_hooks_that_only_recompute_weights_keep_a_conv_incremental():
    model = Around(nn.ReLU())
    prune.l1_unstructured(model.conv, "weight", amount=0.5)
    model.head = torch.nn.utils.weight_norm(model.head)
    engine = assert_exact(model)
    assert engine.roles()["conv"] == engine.roles()["head"] == "local"


def test_a_hook_on_the_model_itself_is_refused_with_a_hint():
    model = seeded(Around(nn.ReLU()))
    model.register_forward_hook(_scaled)
    with pytest.raises(kfx.TraceError, match="forward hooks on the model itself"):
        kfx.compile(model, IMAGE, PATCH)


class PlainAttribute(nn.Module):
    """A mask kept as a plain tensor attribute (not a buffer), read at every position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 2, 3, padding=1)
        self.mask = torch.rand(1, 2, 8, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def forward(self, x):
        return self.head(self.conv(x) * self.mask).flatten(1)


@pytest.mark.parametrize("change", ["in place", "replaced"])
def test_a_plain_tensor_attribute_changed_after_compiling_is_refused(change):
    """The cached base activations follow the versions of parameters and buffers only: a changed
    plain attribute would leave them stale, so the engine stops instead of mixing the two."""
    model = seeded(PlainAttribute())
    engine = assert_exact(model)  # as compiled: exact
    image, corner = torch.randn(IMAGE, dtype=torch.float64), torch.tensor([[2, 3]])
    engine.outputs(image, corner)  # the base of this image is cached
    if change == "in place":
        model.mask.mul_(3)
    else:
        model.mask = model.mask * 3
    with pytest.raises(kfx.ModelError, match="'mask' changed after kfx.compile.*register_buffer"):
        engine.outputs(image, corner)


@pytest.mark.parametrize(
    "layer, setting, value",
    [(nn.AvgPool2d(3, 1, 1), "count_include_pad", False), (_conv(3, padding=1), "padding_mode", "reflect")],
    ids=["count_include_pad", "padding_mode"],
)
def test_a_layer_whose_settings_change_after_compiling_is_refused(layer, setting, value):
    """The boxes and divisors were computed for the old settings, while the base pass runs the new."""
    model = seeded(Around(layer))
    engine = kfx.compile(model, IMAGE, PATCH, batch_size=5)
    image = torch.randn(IMAGE, dtype=torch.float64)
    setattr(layer, setting, value)
    with pytest.raises(kfx.ModelError, match=f"'module'.*{setting}.* -> .*[Cc]ompile again"):
        engine.outputs(image, torch.tensor([[2, 3]]))


@pytest.mark.parametrize(
    "noise",
    [lambda y: F.dropout(y, 0.5, training=True), lambda y: y + 0.01 * torch.randn_like(y)],
    ids=["dropout in training mode", "randn_like"],
)
def test_a_model_with_randomness_in_forward_is_refused_as_such(noise):
    with pytest.raises(kfx.ModelError, match="different outputs for the same images on two calls"):
        kfx.compile(seeded(After(noise)), IMAGE, PATCH)


@pytest.mark.parametrize(
    "pool",
    [nn.AdaptiveAvgPool3d(1), nn.ReflectionPad3d(1)],
    ids=["AdaptiveAvgPool3d of an image", "ReflectionPad3d of an image"],
)
def test_a_layer_for_another_rank_mixes_channels_and_runs_densely(pool):
    """A 3-d layer reads a [N, C, H, W] map as unbatched [C', D, H, W]: it pools or pads the channels."""
    engine = assert_exact(Layers(nn.Conv2d(2, 2, 3, padding=1), pool))
    assert "layers_1" in {node.node for node in engine.dense_nodes}


# -- compositions ------------------------------------------------------------------------------

# Ops that keep a [N, C, h, w] map with h, w >= 3 a map (any size >= 3 in, >= 3 out).
CHAIN = {
    "roll": lambda y: y.roll(1, -1),
    "flip": lambda y: y.flip(-2),
    "swap H W": lambda y: y.transpose(2, 3).relu(),
    "permute and back": lambda y: y.permute(0, 1, 3, 2).tanh().permute(0, 1, 3, 2),
    "reflect": lambda y: F.pad(y, (1, 0, 0, 1), mode="reflect"),
    "circular": lambda y: F.pad(y, (0, 2, 1, 0), mode="circular"),
    "replicate": lambda y: F.pad(y, (1, 1, 1, 1), mode="replicate"),
    "crop": lambda y: F.pad(y, (-1, 1, 1, -1)),
    "max_pool": lambda y: F.max_pool2d(y, 2, 1, ceil_mode=True),
    "avg_pool": lambda y: F.avg_pool2d(y, 3, 1, 1, count_include_pad=False),
    "upsample": lambda y: F.interpolate(y, scale_factor=1.5, mode="bilinear"),
    "nearest": lambda y: F.interpolate(y, scale_factor=0.8),
    "conv": lambda y: F.conv2d(y, torch.ones(2, 2, 3, 3, dtype=y.dtype) / 9, padding=1),
    "transposed": lambda y: F.conv_transpose2d(y, torch.ones(2, 2, 2, 2, dtype=y.dtype) / 4, stride=1),
    "cumsum": lambda y: y.cumsum(-1) / y.shape[-1],
    "add flipped": lambda y: y + y.flip(-1),
    "add shifted": lambda y: y + F.pad(y, (1, -1, 0, 0)),
    "gate over W": lambda y: y * y.mean(-1, keepdim=True).sigmoid(),
}


class Chain(nn.Module):
    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.names = names

    def forward(self, x):
        y = self.conv(x)
        for name in self.names:
            y = CHAIN[name](y)
        return y.flatten(1)


@settings(max_examples=20)
@given(
    names=st.lists(st.sampled_from(sorted(CHAIN)), min_size=1, max_size=3),
    height=st.integers(5, 9),
    width=st.integers(5, 9),
    patch=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_chains_of_spatial_ops_are_exact(names, height, width, patch):
    assert_exact(Chain(tuple(names)), (2, height, width), kfx.Patch(patch, stride=1, fill=-1.0))


@pytest.mark.parametrize("options", [{"plan": "auto"}, {"global_context": "local"}], ids=["auto", "local"])
@pytest.mark.parametrize("name", ["swap H W", "reflect", "transposed", "add shifted", "upsample"])
def test_other_plans_and_the_local_mode_are_exact_without_global_context(name, options):
    assert_exact(Chain((name, "roll")), **options)
