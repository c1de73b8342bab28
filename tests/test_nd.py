"""1-D signals and 3-D volumes: the same engine, the same exactness, one spatial axis at a time.

For drawn 1-D and 3-D CNNs (strided, padded, dilated and grouped convs, max and average pools with
ceil_mode and count_include_pad, BatchNorm, residual adds, channel concats), the compiled engine
equals full inference on the tests' own occluded inputs (slice assignment, independent of
kfx.occlude), and its heat map equals brute force. The other ops (transposed convs, interpolation,
constant pads, functional convs) and the run-time API (cells, to_pixels, errors) are checked
against torch or hand-written loops. The static cost model is checked against brute force: every
output a patch changes lies inside the box kfx recomputes, and the full FMAs match a hand count.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfx
import kfx.fills
from kfx.geometry import conv_output_size
from kfx.passes import META_KEY

CONV = {1: nn.Conv1d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}
MAX_POOL = {1: nn.MaxPool1d, 3: nn.MaxPool3d}
AVG_POOL = {1: nn.AvgPool1d, 3: nn.AvgPool3d}
GLOBAL_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def painted(
    signal: torch.Tensor, positions: torch.Tensor, size: tuple[int, ...], fill: float
) -> torch.Tensor:
    """The oracle's occluded batch: one copy of ``signal`` [C, *S] per corner, ``fill`` assigned into
    the window of ``size`` there (slice assignment only; shares no code with kfx.occlude)."""
    out = signal.expand(len(positions), *signal.shape).clone()
    for i, corner in enumerate(positions.tolist()):
        out[(i, slice(None), *(slice(c, c + s) for c, s in zip(corner, size)))] = fill
    return out


def seeded(model: nn.Module, seed: int) -> nn.Module:
    """Weights and BatchNorm statistics drawn from ``seed`` (never torch's global RNG), float64, eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * 1.2 - 0.6)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model.double().eval()


class Residual(nn.Module):
    """x + conv(relu(x)) with 'same' padding: a merge of two changed maps."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return x + self.conv(F.relu(x))


class Concat(nn.Module):
    """[x, conv(x)] over channels (DenseNet's pattern)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return torch.cat([x, self.conv(x)], dim=1)


@st.composite
def nd_cnn(draw, axes: int):
    """(model, input shape): a drawn CNN over ``axes`` spatial axes whose every layer keeps size >= 1."""
    size = draw(st.integers(14, 40) if axes == 1 else st.integers(6, 10), label="size")
    channels = draw(st.integers(1, 3), label="in channels")
    shape = (channels, *(size,) * axes)
    layers, c = [], channels
    for _ in range(draw(st.integers(1, 4), label="layers")):
        kind = draw(st.sampled_from(["conv", "max", "avg", "bn", "residual", "concat"]))
        if kind == "conv":
            groups = draw(st.sampled_from([1, c])) if c > 1 else 1
            out = groups * draw(st.integers(1, 2))
            k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            p = draw(st.integers(0, (d * (k - 1)) // 2))
            if conv_output_size(size, k, s, p, d) < 1:
                continue
            layers.append(CONV[axes](c, out, k, stride=s, padding=p, dilation=d, groups=groups))
            size, c = conv_output_size(size, k, s, p, d), out
        elif kind in ("max", "avg"):
            k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            p, ceil = draw(st.integers(0, k // 2)), draw(st.booleans())
            out_size = conv_output_size(size, k, s, p, 1, ceil_mode=ceil)
            if out_size < 1:
                continue
            if kind == "max":
                layers.append(MAX_POOL[axes](k, s, p, ceil_mode=ceil))
            else:
                layers.append(AVG_POOL[axes](k, s, p, ceil_mode=ceil, count_include_pad=draw(st.booleans())))
            size = out_size
        elif kind == "bn":
            layers.append(BATCH_NORM[axes](c))
        elif kind == "residual":
            layers.append(Residual(CONV[axes](c, c, 3, padding="same")))
        else:
            layers.append(Concat(CONV[axes](c, 2, 3, padding=1)))
            c += 2
        layers.append(nn.ReLU())
    layers += [GLOBAL_POOL[axes](1), nn.Flatten(), nn.Linear(c, 3)]
    return seeded(nn.Sequential(*layers), draw(st.integers(0, 2**16), label="seed")), shape


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("axes", [1, 3])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_drawn_cnns_equal_full_inference_on_the_occluded_input(axes, data):
    model, shape = data.draw(nd_cnn(axes))
    spatial = shape[1:]
    patch_side = data.draw(st.integers(1, min(spatial)), label="patch")
    stride = data.draw(st.integers(1, patch_side), label="stride")
    fill = data.draw(st.sampled_from([0.0, 0.5]), label="fill")
    patch = kfx.Patch(patch_side, stride=stride, fill=fill)
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    engine = kfx.compile(model, shape, patch, batch_size=data.draw(st.integers(1, 7), label="batch"))
    assert engine.patch.size == (patch_side,) * axes
    corners = torch.stack(
        [
            torch.randint(0, s - patch_side + 1, (6,), generator=torch.Generator().manual_seed(2))
            for s in spatial
        ],
        1,
    )
    expected = model(painted(signal, corners, (patch_side,) * axes, fill))
    assert relative_error(engine.outputs(signal, corners), expected) < 1e-10

    # The map is brute force over the grid, softmax of the predicted class.
    heatmap = engine(signal)
    grid = [range(0, s - patch_side + 1, stride) for s in spatial]
    every = torch.cartesian_prod(*(torch.tensor(list(g)) for g in grid)).view(-1, axes)
    target = int(model(signal[None]).argmax())
    brute = torch.softmax(model(painted(signal, every, (patch_side,) * axes, fill)), 1)[:, target]
    assert heatmap.values.shape == tuple(len(g) for g in grid)
    assert relative_error(heatmap.values.reshape(-1), brute) < 1e-10

    # Incremental, not merely right: the convs and pools before the global tail run on boxes.
    roles = engine.roles()
    first = next(n for n in engine.graph_module.graph.nodes if n.op == "call_module")
    assert roles[first.name] in ("local", "pointwise", "merge")
    assert {d.node for d in engine.dense_nodes} <= {n for n, r in roles.items() if r == "dense"}


class Everything(nn.Module):
    """Each incremental op kind once, over ``axes`` spatial axes: a functional conv, a constant pad,
    a transposed conv, interpolation, a channel concat of two branches, a residual add."""

    def __init__(self, axes: int, mode: str):
        super().__init__()
        self.axes, self.mode = axes, mode
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[axes]
        transposed = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[axes]
        self.stem = conv(2, 4, 3, stride=2, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 4, *(3,) * axes) * 0.2)
        self.up = transposed(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.pad = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}[axes]((1, 0) * axes, 0.25)
        self.branch = conv(4, 2, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.axes]
        x = F.relu(self.stem(x))
        x = x + conv(x, self.weight, padding=1)
        x = self.up(x)
        x = F.interpolate(x, scale_factor=0.5, mode=self.mode)
        x = self.pad(x)
        x = torch.cat([x, self.branch(x)], dim=1)
        return self.head(x.mean(dim=tuple(range(2, 2 + self.axes))))


@pytest.mark.parametrize(
    "axes, mode", [(1, "linear"), (1, "nearest"), (3, "trilinear"), (3, "nearest"), (2, "bilinear")]
)
def test_every_incremental_op_kind_is_exact_in_every_rank(axes, mode):
    torch.manual_seed(0)
    model = Everything(axes, mode).double().eval()
    shape = (2, *{1: (30,), 2: (14, 14), 3: (10, 10, 10)}[axes])
    patch = kfx.Patch(3, stride=2, fill=-0.3)
    engine = kfx.compile(model, shape, patch)
    roles = engine.roles()
    for kind in ("local", "transposed", "resample", "merge", "mean_delta"):
        assert kind in roles.values(), (kind, roles)
    assert engine.dense_nodes == []
    signal = torch.randn(shape, dtype=torch.float64)
    corners = torch.randint(0, shape[1] - 3 + 1, (9, axes))
    expected = model(painted(signal, corners, (3,) * axes, -0.3))
    assert relative_error(engine.outputs(signal, corners), expected) < 1e-10


def test_float32_volume_is_exact_to_float_tolerance():
    model = seeded(
        nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(4, 4, 3, padding=1),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        ),
        3,
    ).float()
    volume = torch.randn(1, 12, 12, 12)
    engine = kfx.compile(model, (1, 12, 12, 12), kfx.Patch(4, stride=4))
    corners = kfx.patch.grid_positions((12, 12, 12), engine.patch)
    expected = model(painted(volume, corners, (4, 4, 4), 0.0))
    assert relative_error(engine.outputs(volume, corners), expected) < 1e-5
    assert engine.cost().theoretical_speedup > 1


def test_a_patch_given_per_axis_and_images_with_a_batch_dim():
    model = seeded(nn.Sequential(nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten()), 4)
    volume = torch.randn(1, 1, 8, 9, 10, dtype=torch.float64)
    engine = kfx.compile(model, (1, 8, 9, 10), kfx.Patch((2, 3, 4), stride=(2, 3, 2)))
    heatmap = engine(volume)  # [1, C, D, H, W]: the batch of one is dropped, as for images
    assert heatmap.values.shape == (4, 3, 4)
    assert heatmap.to_pixels().shape == (8, 9, 10)
    naive = kfx.naive_heatmap(model, volume[0], kfx.Patch((2, 3, 4), stride=(2, 3, 2)))
    assert torch.allclose(heatmap.values, naive.values, rtol=1e-12, atol=1e-14)


def test_to_pixels_spreads_a_signal_map_like_captum():
    """Each sample gets the mean drop over the windows covering it: a loop over windows is the oracle."""
    model = seeded(
        nn.Sequential(
            nn.Conv1d(1, 3, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(3, 2)
        ),
        5,
    )
    signal = torch.randn(1, 23, dtype=torch.float64)
    heatmap = kfx.compile(model, (1, 23), kfx.Patch(5, stride=3))(signal)
    totals, counts = torch.zeros(23, dtype=torch.float64), torch.zeros(23, dtype=torch.float64)
    for i, value in enumerate(heatmap.values.tolist()):
        totals[3 * i : 3 * i + 5] += heatmap.base - value
        counts[3 * i : 3 * i + 5] += 1
    assert torch.allclose(heatmap.to_pixels(), totals / counts.clamp_min(1), rtol=1e-12)


def test_cells_overlapping_a_selection_in_a_volume():
    model = seeded(nn.Sequential(nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten()), 6)
    engine = kfx.compile(model, (1, 10, 10, 10), kfx.Patch(4, stride=3))
    selection = torch.zeros(10, 10, 10, dtype=torch.bool)
    selection[7, 1, 9] = True
    cells = engine.cells_overlapping(selection)
    expected = torch.zeros(3, 3, 3, dtype=torch.bool)
    for z in range(3):
        for y in range(3):
            for x in range(3):
                expected[z, y, x] = (
                    3 * z <= 7 < 3 * z + 4 and 3 * y <= 1 < 3 * y + 4 and 3 * x <= 9 < 3 * x + 4
                )
    assert torch.equal(cells, expected)
    heatmap = engine(torch.randn(1, 10, 10, 10, dtype=torch.float64), cells=cells)
    assert torch.equal(heatmap.evaluated, expected)


def test_wrong_shapes_and_axes_get_clear_errors():
    model = seeded(nn.Sequential(nn.Conv1d(2, 2, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten()), 7)
    engine = kfx.compile(model, (2, 30), kfx.Patch(4))
    with pytest.raises(kfx.InputError, match=r"\[C, L\]"):
        engine(torch.zeros(2, 31, dtype=torch.float64))
    with pytest.raises(kfx.InputError, match=r"\[N, 1\]"):
        engine.outputs(torch.zeros(2, 30, dtype=torch.float64), [[0, 0]])
    with pytest.raises(kfx.PatchError, match="3 spatial axes"):
        kfx.compile(model, (2, 8, 8, 8), kfx.Patch((2, 2)))
    with pytest.raises(kfx.InputError, match="2-d images only"):
        kfx.compile(model, (2, 30), kfx.Patch(4), backend="triton")
    with pytest.raises(kfx.PatchError, match="larger than the image 30"):
        kfx.compile(model, (2, 30), kfx.Patch(31))
    with pytest.raises(kfx.InputError, match="target_ssim needs a 2-d map"):
        engine(torch.zeros(2, 30, dtype=torch.float64), drill_down=kfx.DrillDown(target_ssim=0.9))


def _changed_span(clean: torch.Tensor, occluded: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per spatial axis, the [first, last] output index that differs (None: nothing changed)."""
    changed = (clean - occluded).abs().amax(dim=1)[0] > 0
    if not changed.any():
        return None
    where = changed.nonzero()
    return [(int(where[:, a].min()), int(where[:, a].max())) for a in range(where.shape[1])]


@pytest.mark.parametrize("axes", [1, 3])
def test_cost_model_boxes_hold_every_changed_output_and_count_full_fmas(axes):
    conv, pool = CONV[axes], MAX_POOL[axes]
    model = seeded(
        nn.Sequential(
            conv(1, 3, 3, padding=1),
            nn.ReLU(),
            pool(2),
            conv(3, 4, 3, stride=2, padding=1, groups=1),
            nn.ReLU(),
            conv(4, 4, 5, padding=2, dilation=1, groups=2),
            GLOBAL_POOL[axes](1),
            nn.Flatten(),
            nn.Linear(4, 2),
        ),
        8,
    )
    size = 48 if axes == 1 else 16
    shape = (1, *(size,) * axes)
    engine = kfx.compile(model, shape, kfx.Patch(4))
    convs = [
        n
        for n in engine.graph_module.graph.nodes
        if n.op == "call_module" and isinstance(engine.graph_module.get_submodule(n.target), conv)
    ]
    # Full FMAs by hand: C_in / groups * prod(kernel) * C_out * prod(output), from hooks on torch's own run.
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name, m in model.named_modules()
        if isinstance(m, conv)
    ]
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model(signal[None])
    clean = dict(outputs)
    by_hand = sum(
        m.in_channels
        // m.groups
        * math.prod(m.kernel_size)
        * m.out_channels
        * math.prod(clean[name].shape[2:])
        for name, m in model.named_modules()
        if isinstance(m, conv)
    )
    by_hand += model[-1].in_features * model[-1].out_features  # the Linear head counts too
    assert engine.cost().full_fmas == by_hand
    for corner in ([0] * axes, [size - 4] * axes, [size // 2 - 1] * axes, [5] + [size - 6] * (axes - 1)):
        model(painted(signal, torch.tensor([corner]), (4,) * axes, 0.0))
        for node in convs:
            span = _changed_span(clean[node.target], outputs[node.target])
            box = node.meta[META_KEY].box
            for axis, (first, last) in enumerate(span or []):
                start = box[axis].starts[corner[axis]]
                assert start <= first and last < start + box[axis].width, (node.name, corner, axis)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("axes", [1, 2, 3])
@pytest.mark.parametrize("fill", ["mean_patch", "mean_image", "blur", "gaussian", "baseline"])
def test_position_dependent_fills_stay_exact_and_incremental(axes, fill):
    """The window's content depends on the position; only the window changes, so the engine stays
    exact and incremental. mean_patch and baseline have hand-written oracles; the others go through
    kfx.occlude, whose content tests/test_fills.py checks against independent oracles."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[axes]
    model = seeded(
        nn.Sequential(
            conv(2, 3, 3, padding=1),
            nn.ReLU(),
            conv(3, 3, 3, stride=2),
            GLOBAL_POOL[axes](1),
            nn.Flatten(),
            nn.Linear(3, 2),
        ),
        9,
    )
    shape = (2, *{1: (24,), 2: (12, 12), 3: (9, 9, 9)}[axes])
    reference = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    spec = {"gaussian": kfx.fills.Multiply.gaussian((4,) * axes), "baseline": kfx.fills.Baseline(reference)}
    engine = kfx.compile(model, shape, kfx.Patch(4, stride=2, fill=spec.get(fill, fill)))
    assert engine.patch.positional and "local" in engine.roles().values()
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    corners = torch.randint(0, shape[1] - 4 + 1, (7, axes), generator=torch.Generator().manual_seed(5))
    if fill in ("mean_patch", "baseline"):
        occluded = signal.expand(len(corners), *shape).clone()
        for i, corner in enumerate(corners.tolist()):
            window = (i, slice(None), *(slice(c, c + 4) for c in corner))
            if fill == "mean_patch":
                occluded[window] = signal[window[1:]].mean(dim=tuple(range(1, axes + 1)), keepdim=True)
            else:
                occluded[window] = reference[window[1:]]
    else:
        occluded = kfx.occlude(signal, corners, engine.patch)
    assert relative_error(engine.outputs(signal, corners), model(occluded)) < 1e-10
    assert torch.allclose(
        engine(signal).values,
        kfx.NaiveEngine(model, shape, engine.patch)(signal).values,
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("axes", [1, 3])
def test_tune_and_max_memory_in_other_ranks(axes):
    """kfx.tune picks a tau whose maps meet the target on the samples (SSIM in N dimensions,
    scikit-image), and max_memory picks a batch size, for signals and volumes alike."""
    conv = CONV[axes]
    model = seeded(
        nn.Sequential(
            conv(2, 4, 3, padding=1),
            nn.ReLU(),
            conv(4, 4, 3, stride=2),
            nn.ReLU(),
            conv(4, 4, 3, stride=2),
            GLOBAL_POOL[axes](1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        10,
    )
    shape = (2, *{1: (120,), 3: (12, 12, 12)}[axes])
    patch = kfx.Patch(4 if axes == 1 else 3, stride=4 if axes == 1 else 3)
    samples = [
        torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (6, 7)
    ]
    engine = kfx.tune(model, shape, patch, samples, target_ssim=0.9, taus=(1.0, 0.7, 0.5, 0.3))
    exact = kfx.compile(model, shape, patch)
    for sample in samples:
        assert kfx.heatmap_ssim(exact(sample), engine(sample)) >= 0.9 - 1e-9
    budgeted = kfx.compile(model, shape, patch, max_memory="64MB")
    assert 1 <= budgeted.batch_size <= 256
    assert torch.allclose(budgeted(samples[0]).values, exact(samples[0]).values, rtol=1e-12, atol=1e-14)
