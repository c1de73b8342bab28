"""Hypothesis strategies that draw *consistent* CNNs, images, patches and positions.

Every drawn layer keeps the spatial size >= 1 (its output size is computed with kfx.geometry's
formula, which test_geometry checks against torch), every patch fits its image, every position lets
the patch fit. Draws are labelled so that failures read well.

Weights are a function of a drawn seed (:func:`seed_weights`), never of torch's global RNG: a failing
example replays with the same weights, and shrinking the seed is a change hypothesis knows about.
:func:`painted` is the tests' own occlusion, independent of ``kfx.occlude`` and ``Patch.fill_tensor``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import kfx
from kfx.geometry import conv_output_size


class Functional(nn.Module):
    """Calls a functional op, so traced graphs hold call_function / call_method nodes too."""

    def __init__(self, name: str, fn):
        super().__init__()
        self.name, self.fn = name, fn

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class FunctionalConv(nn.Module):
    """A conv whose forward calls F.conv2d on its own weight (like TF-"same" Conv2d subclasses)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalMaxPool(nn.Module):
    """F.max_pool2d called in forward (a call_function node), its geometry kept for the tests' oracles."""

    def __init__(self, kernel_size, stride, padding, ceil_mode: bool):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.ceil_mode = kernel_size, stride, padding, ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode)


def _relu_statement(x):
    x.relu_()
    return x


def _clamp_statement(x):
    x.clamp_(-0.5, 0.5)
    return x


def _chained_statement(x):
    x.add_(1).mul_(2)
    return x


def _inplace_then_reuse(x):
    y = F.relu(x, inplace=True)  # eager changes x as well: the later use of x sees the ReLU
    return y + x


POINTWISE = [
    ("ReLU(inplace)", lambda c: nn.ReLU(inplace=True)),
    ("ReLU6", lambda c: nn.ReLU6()),
    ("LeakyReLU", lambda c: nn.LeakyReLU(0.1)),
    ("ELU", lambda c: nn.ELU()),
    ("GELU", lambda c: nn.GELU()),
    ("SiLU", lambda c: nn.SiLU()),
    ("Sigmoid", lambda c: nn.Sigmoid()),
    ("Tanh", lambda c: nn.Tanh()),
    ("Hardswish", lambda c: nn.Hardswish()),
    ("Hardsigmoid", lambda c: nn.Hardsigmoid()),
    ("Dropout", lambda c: nn.Dropout(0.5)),
    ("Identity", lambda c: nn.Identity()),
    ("BatchNorm2d", lambda c: _random_bn(c)),
    ("F.relu(inplace)", lambda c: Functional("F.relu(inplace)", lambda x: F.relu(x, inplace=True))),
    ("x.relu_()", lambda c: Functional("x.relu_()", lambda x: x.relu_())),
    # In-place ops as statements: only later uses of x see the change (kfx rebinds them, issue #14).
    ("x.relu_(); x", lambda c: Functional("x.relu_(); x", _relu_statement)),
    ("x.clamp_(); x", lambda c: Functional("x.clamp_(); x", _clamp_statement)),
    ("x.add_(1).mul_(2); x", lambda c: Functional("x.add_(1).mul_(2); x", _chained_statement)),
    ("F.relu(x, inplace) + x", lambda c: Functional("F.relu(x, inplace) + x", _inplace_then_reuse)),
    ("torch.sigmoid", lambda c: Functional("torch.sigmoid", torch.sigmoid)),
    ("scalar arith", lambda c: Functional("2*x-1", lambda x: 2.0 * x - 1.0)),
    ("x/3+0.5", lambda c: Functional("x/3+0.5", lambda x: x / 3 + 0.5)),
    ("F.dropout(eval)", lambda c: Functional("F.dropout", lambda x: F.dropout(x, 0.3, training=False))),
]


def _random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    _randomize_bn(bn, None)
    return bn


def _randomize_bn(bn: nn.BatchNorm2d, generator: torch.Generator | None) -> None:
    """Statistics and affine terms far from the identity, so that BatchNorm really changes values."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=generator)
        bn.running_var.uniform_(0.5, 2, generator=generator)
        bn.weight.uniform_(0.5, 1.5, generator=generator)
        bn.bias.uniform_(-0.5, 0.5, generator=generator)


def seed_weights(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every floating-point parameter and buffer of ``model`` from ``seed``; returns ``model``.

    Convs and linears get torch's default range U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and
    bias, BatchNorm the ranges of :func:`_random_bn`. A tensor of any other module is an error: left
    alone it would keep values from torch's global RNG, and examples would stop replaying.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            floating = [t for t in own if t.is_floating_point()]
            if not floating:
                continue
            if isinstance(module, nn.BatchNorm2d):
                _randomize_bn(module, generator)
                drawn = [module.weight, module.bias, module.running_mean, module.running_var]
            elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 2:
                bound = 1 / math.sqrt(module.weight[0].numel())
                drawn = [module.weight, module.bias]
                for tensor in drawn:
                    if tensor is not None:
                        tensor.uniform_(-bound, bound, generator=generator)
            else:
                drawn = []
            if not all(any(t is d for d in drawn) for t in floating):
                raise TypeError(f"seed_weights does not know how to draw the tensors of {module!r}")
    return model


@st.composite
def conv_layer(draw, channels: int, size: tuple[int, int]):
    kh, kw = draw(st.integers(1, 7), label="kernel_h"), draw(st.integers(1, 7), label="kernel_w")
    dilation = draw(st.integers(1, 2), label="dilation")
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="stride")
    groups = draw(st.sampled_from([g for g in (1, 2, 3, channels) if channels % g == 0]), label="groups")
    out_channels = groups * draw(st.integers(1, 3), label="out_per_group")
    same = stride == (1, 1) and draw(st.booleans(), label="padding_same")
    padding = "same" if same else draw(st.tuples(st.integers(0, 3), st.integers(0, 3)), label="padding")
    conv = nn.Conv2d(
        channels,
        out_channels,
        (kh, kw),
        stride,
        padding,
        dilation,
        groups,
        bias=draw(st.booleans(), label="bias"),
    )
    if same:
        out = size
    else:
        out = tuple(conv_output_size(size[a], (kh, kw)[a], stride[a], padding[a], dilation) for a in (0, 1))
    if min(out) < 1:
        return None
    if draw(st.booleans(), label="functional_conv"):
        conv = FunctionalConv(conv)
    return conv, out_channels, out


@st.composite
def pool_layer(draw, channels: int, size: tuple[int, int]):
    kind = draw(st.sampled_from(["max", "avg", "F.max_pool2d", "pad"]), label="pool_kind")
    if kind == "pad":
        pads = draw(st.tuples(*[st.integers(0, 2)] * 4), label="zero_pad")
        out = (size[0] + pads[2] + pads[3], size[1] + pads[0] + pads[1])
        return nn.ZeroPad2d(pads), channels, out
    k = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="pool_kernel")
    s = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="pool_stride")
    p = tuple(draw(st.integers(0, k[a] // 2), label=f"pool_pad{a}") for a in (0, 1))
    ceil_mode = draw(st.booleans(), label="ceil_mode")
    out = tuple(conv_output_size(size[a], k[a], s[a], p[a], ceil_mode=ceil_mode) for a in (0, 1))
    if min(out) < 1:
        return None
    if kind == "max":
        return nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode), channels, out
    if kind == "avg":
        include = draw(st.booleans(), label="count_include_pad")
        return nn.AvgPool2d(k, s, p, ceil_mode=ceil_mode, count_include_pad=include), channels, out
    return FunctionalMaxPool(k, s, p, ceil_mode), channels, out


@st.composite
def cnn(draw, max_layers: int = 6):
    """A random sequential CNN with a global tail, its image shape, as (model, (C, H, W))."""
    channels = draw(st.integers(1, 4), label="in_channels")
    image = (draw(st.integers(4, 20), label="H"), draw(st.integers(4, 20), label="W"))
    size, c, layers = image, channels, []
    for _ in range(draw(st.integers(1, max_layers), label="layers")):
        kind = draw(st.sampled_from(["conv", "conv", "pool", "pointwise"]), label="layer")
        if kind == "pointwise":
            layers.append(draw(st.sampled_from(POINTWISE), label="pointwise")[1](c))
            continue
        drawn = draw(conv_layer(c, size) if kind == "conv" else pool_layer(c, size))
        if drawn is not None:
            layer, c, size = drawn
            layers.append(layer)
    tail = draw(st.sampled_from(["gap_linear", "flatten_linear", "none"]), label="tail")
    if tail == "gap_linear":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]
    elif tail == "flatten_linear":
        layers += [nn.Flatten(), nn.Linear(c * size[0] * size[1], 3)]
    model = nn.Sequential(*layers).double().eval()
    return seed_weights(model, draw(st.integers(0, 2**32 - 1), label="weight_seed")), (channels, *image)


@st.composite
def patch_for(draw, image_hw: tuple[int, int], channels: int):
    # Half the examples get a patch at most a quarter of the image on each axis (a sixteenth of its
    # area): the case incremental inference is for, where its changed boxes stay small.
    small = draw(st.booleans(), label="small_patch")
    limits = [max(1, hw // 4) if small else hw for hw in image_hw]
    size = tuple(draw(st.integers(1, limits[a]), label=f"patch{a}") for a in (0, 1))
    stride = tuple(draw(st.integers(1, 5), label=f"stride{a}") for a in (0, 1))
    fill_kind = draw(st.sampled_from(["scalar", "channels", "tensor"]), label="fill_kind")
    if fill_kind == "scalar":
        fill = draw(st.floats(-2, 2), label="fill")
    elif fill_kind == "channels":
        fill = tuple(draw(st.lists(st.floats(-2, 2), min_size=channels, max_size=channels), label="fill"))
    else:
        seed = draw(st.integers(0, 2**16), label="fill_seed")
        fill = torch.randn(
            channels, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    return kfx.Patch(size, stride=stride, fill=fill)


@st.composite
def positions_for(draw, image_hw: tuple[int, int], patch: kfx.Patch, max_positions: int = 12):
    """Positions including all four corners and the extremes of each axis."""
    hi = (image_hw[0] - patch.size[0], image_hw[1] - patch.size[1])
    corners = [(0, 0), (0, hi[1]), (hi[0], 0), (hi[0], hi[1])]
    extra = draw(
        st.lists(st.tuples(st.integers(0, hi[0]), st.integers(0, hi[1])), max_size=max_positions),
        label="positions",
    )
    return torch.tensor(corners + extra, dtype=torch.long)


def painted(image: torch.Tensor, positions, patch: kfx.Patch) -> torch.Tensor:
    """The oracles' occluded batch [N, C, H, W]: one copy of ``image`` [C, H, W] per (y, x) corner,
    ``patch.fill`` assigned into the ``patch.size`` window there.

    Built from the patch's public fields with slice assignment and broadcasting only: it shares no
    code with ``kfx.occlude`` or ``Patch.fill_tensor``, which the engine uses for its own fill.
    """
    fill = patch.fill
    if isinstance(fill, torch.Tensor):  # [C, h, w], the window's values one by one
        fill = fill.to(image.dtype)
    elif isinstance(fill, tuple):  # one value per channel, broadcast over the window
        fill = torch.tensor(fill, dtype=image.dtype)[:, None, None]
    h, w = patch.size
    out = image.expand(len(positions), *image.shape).clone()
    for i, (y, x) in enumerate(torch.as_tensor(positions).tolist()):
        out[i, :, y : y + h, x : x + w] = fill
    return out


# ---------------------------------------------------------------------------------------------
# Branching graphs (docs/design.md §2.5 merge nodes): each block maps [C, H, W] -> [C', H', W'].


class Residual(nn.Module):
    """body(x) + shortcut(x), summed in place like torchvision's ResNet (``out += identity``)."""

    def __init__(self, c: int, c_out: int, kernel: int, stride: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c_out, kernel, stride, dilation * (kernel // 2), dilation),
            _random_bn(c_out),
            nn.ReLU(inplace=True),
        )
        self.shortcut = nn.Identity() if (stride == 1 and c == c_out) else nn.Conv2d(c, c_out, 1, stride)

    def forward(self, x):
        out = self.body(x)
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class Branches(nn.Module):
    """Concatenation of branches whose changed boxes differ in size and place."""

    def __init__(self, c: int, kinds: list[str]):
        super().__init__()
        makers = {
            "1x1": lambda: nn.Conv2d(c, 2, 1),
            "3x3": lambda: nn.Conv2d(c, 2, 3, padding=1),
            "1x5": lambda: nn.Conv2d(c, 3, (1, 5), padding=(0, 2)),
            "5x1": lambda: nn.Conv2d(c, 1, (5, 1), padding=(2, 0)),
            "shifted": lambda: nn.Sequential(
                nn.ZeroPad2d((2, 0, 2, 0)), nn.Conv2d(c, 2, 3)
            ),  # box moves up-left
            "pool": lambda: nn.MaxPool2d(3, 1, 1),
            "avgpool": lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
        }
        self.branches = nn.ModuleList(makers[k]() for k in kinds)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class SharedConv(nn.Module):
    """One conv module called at two places of the graph, then merged (state keyed by node)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return self.conv(torch.relu(y)) - y


class SpatialGate(nn.Module):
    """x * sigmoid(conv(x)): a product of two spatial tensors (merge)."""

    def __init__(self, c: int):
        super().__init__()
        self.gate = nn.Conv2d(c, 1, 3, padding=2, dilation=2)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(mean(x))): the change becomes global here (exact, dense from here on)."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: split channels, convolve one half, concat, shuffle via size()/view/transpose."""

    def __init__(self, c: int):
        super().__init__()
        self.half, self.shuffle = c // 2, c % 2 == 0
        self.conv = nn.Conv2d(c - self.half, c - self.half, 3, padding=1, groups=c - self.half)

    def forward(self, x):
        x1, x2 = x.split([self.half, x.shape[1] - self.half], dim=1)
        out = torch.cat((x1, self.conv(x2)), dim=1)
        if not self.shuffle:
            return out
        batch, channels, height, width = out.size()
        out = out.view(batch, 2, channels // 2, height, width)
        return torch.transpose(out, 1, 2).contiguous().view(batch, -1, height, width)


class DenseLayers(nn.Module):
    """MONAI's dense layers: ``x = cat([x, grow(relu(squeeze(x)))], 1)`` twice, so the second
    concat holds the first (kfx reads it as its pieces: passes/slots.py)."""

    def __init__(self, c: int, growth: int, kernel: int):
        super().__init__()
        self.squeeze = nn.ModuleList([nn.Conv2d(c, 2, 1), nn.Conv2d(c + growth, 2, 1)])
        self.grow = nn.ModuleList(nn.Conv2d(2, growth, kernel, padding=kernel // 2) for _ in range(2))

    def forward(self, x):
        for squeeze, grow in zip(self.squeeze, self.grow):
            x = torch.cat([x, grow(torch.relu(squeeze(x)))], 1)
        return x


@st.composite
def dag_block(draw, c: int, size: tuple[int, int]):
    kinds = ["residual", "branches", "shared", "gate", "se", "shuffle", "dense"]
    kind = draw(st.sampled_from(kinds), label="block")
    if kind == "dense":
        growth = draw(st.integers(1, 2), label="growth")
        return (
            DenseLayers(c, growth, draw(st.sampled_from([1, 3]), label="dense_kernel")),
            c + 2 * growth,
            size,
        )
    if kind == "shuffle":
        return (ShuffleBlock(c) if c >= 2 else SpatialGate(c)), c, size
    if kind == "residual":
        kernel = draw(st.sampled_from([1, 3, 5]), label="res_kernel")
        stride = draw(st.integers(1, 2), label="res_stride")
        c_out = draw(st.sampled_from([c, c + 1]), label="res_channels")
        dilation = draw(st.integers(1, 2), label="res_dilation")
        out = tuple((s - 1) // stride + 1 for s in size)
        return Residual(c, c_out, kernel, stride, dilation), c_out, out
    if kind == "branches":
        kinds = draw(
            st.lists(
                st.sampled_from(["1x1", "3x3", "1x5", "5x1", "shifted", "pool", "avgpool"]),
                min_size=2,
                max_size=4,
            ),
            label="branches",
        )
        channels = {"1x1": 2, "3x3": 2, "1x5": 3, "5x1": 1, "shifted": 2, "pool": c, "avgpool": c}
        return Branches(c, kinds), sum(channels[k] for k in kinds), size
    if kind == "shared":
        return SharedConv(c), c, size
    if kind == "gate":
        return SpatialGate(c), c, size
    return SqueezeExcite(c), c, size


@st.composite
def dag_cnn(draw, max_blocks: int = 4):
    """A random branching CNN with a global tail, as (model, (C, H, W))."""
    channels = draw(st.integers(1, 3), label="in_channels")
    image = (draw(st.integers(5, 18), label="H"), draw(st.integers(5, 18), label="W"))
    stem = nn.Conv2d(channels, 3, 3, padding=1)
    layers, c, size = [stem], 3, image
    for _ in range(draw(st.integers(1, max_blocks), label="blocks")):
        block, c, size = draw(dag_block(c, size))
        layers.append(block)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]
    model = nn.Sequential(*layers).double().eval()
    return seed_weights(model, draw(st.integers(0, 2**32 - 1), label="weight_seed")), (channels, *image)
