"""Modern CNN building blocks run incrementally and exactly (issue #16).

Each block is checked two ways: the engine's outputs equal the eager model run on the occluded
images (torch itself is the oracle), and the static ceiling equals that of the same model written
with the classic layer (the block is no obstacle: nothing turns dense before the global tail).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfx

SHAPE = (3, 16, 16)
PATCH = kfx.Patch(4, stride=4, fill=0.0)
POSITIONS = torch.tensor([[0, 0], [0, 12], [12, 0], [12, 12], [5, 7]])


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 and eval mode, with weights and BatchNorm statistics drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.6 + 0.2)
    return model


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_exact(model: nn.Module, engine) -> None:
    picture = image()
    with torch.no_grad():
        expected = model(kfx.occlude(picture.clone(), POSITIONS, engine.patch))
    torch.testing.assert_close(engine.outputs(picture, POSITIONS), expected, rtol=1e-12, atol=1e-12)


def assert_exact_and_incremental(body: nn.Module, role: str) -> None:
    """``body`` inside a classifier: exact, nothing dense before the tail, and run in ``role``."""
    model = seeded(Classifier(body))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert engine.dense_nodes == []
    assert role in engine.roles().values()


def ceiling(model: nn.Module) -> float:
    return kfx.compile(model, SHAPE, PATCH).cost().theoretical_speedup


class Classifier(nn.Module):
    """conv -> body -> conv -> global pool -> linear: the body under test sits between two convs."""

    def __init__(self, body: nn.Module, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = body
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.conv(self.body(self.stem(x)))
        return self.head(x.mean((2, 3)))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: asserts on ``x.ndim``, calls ``F.batch_norm`` with [C]
    statistics, reads ``x.dtype``, ``x.device`` and the shape, then activates."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        per_example = x.numel() // x.shape[0]  # C * H * W, whatever the batch
        scale = x.size(1) * x.shape[2] * x.shape[3] / per_example * x.dim() / 4  # 1.0, from metadata
        return F.relu(x.to(x.dtype).to(x.device) * scale + 0.25)


class ClassicBatchNormAct(nn.Module):
    """The same function written with nn.BatchNorm2d: the ceiling to match."""

    def __init__(self, width: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(self.bn(x) * 1.0 + 0.25)


def test_functional_batch_norm_and_metadata_queries_are_exact_and_incremental():
    model = seeded(Classifier(BatchNormAct(4)))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert engine.dense_nodes == []
    assert ceiling(model) == pytest.approx(ceiling(seeded(Classifier(ClassicBatchNormAct(4)))), rel=1e-9)


def test_functional_batch_norm_with_batch_statistics_is_refused():
    class BatchStatistics(nn.BatchNorm2d):
        def forward(self, x):  # training=True normalises with the batch's own statistics
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps)

    model = seeded(Classifier(BatchStatistics(4)))
    with pytest.raises(
        kfx.ModelError, match="depends on the other images"
    ):  # each position's output depends on the other positions
        kfx.compile(model, SHAPE, PATCH)


class SqueezeExcite(nn.Module):
    """conv -> x * sigmoid(fc(relu(fc(mean(x))))) -> conv -> pool -> linear: one gate, written so the
    test can replay the local mode's rule by hand."""

    def __init__(self, width: int = 4, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.squeeze = nn.Conv2d(width, 2, 1)
        self.excite = nn.Conv2d(2, width, 1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 5)

    def gate(self, x):
        return torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))

    def tail(self, x):
        return self.head(self.conv(x).mean((2, 3)))

    def forward(self, x):
        x = self.stem(x)
        return self.tail(x * self.gate(x) if self.gated else x)


def local_gate_oracle(model: SqueezeExcite, picture: torch.Tensor, positions, patch: kfx.Patch):
    """The local mode's rule replayed by hand: the gate is recomputed exactly for each occluded image,
    but ``x * gate`` changes only inside x's changed box (the patch grown by the 3x3 stem's one-pixel
    reach, one width at every position); outside it the unoccluded image's product stays."""
    with torch.no_grad():
        gated = kept_inside_stem_box(model.stem, lambda x: x * model.gate(x), picture, positions, patch)
        return model.tail(gated)


def kept_inside_stem_box(stem, op, picture: torch.Tensor, positions, patch: kfx.Patch) -> torch.Tensor:
    """``op`` of each occluded image's stem output, kept inside the stem's changed box (the patch
    grown by a 3x3 conv's one-pixel reach); outside it, ``op`` of the unoccluded image's."""
    base = op(stem(picture[None]))
    x = stem(kfx.occlude(picture.clone(), positions, patch))
    out = base.expand(x.shape[0], *base.shape[1:]).clone()
    (h, w), size = patch.size, picture.shape[1:]
    for i, (y, x0) in enumerate(positions.tolist()):
        # kfx's boxes keep one width at every position: at a border, shifted inside the map
        top, left = min(max(0, y - 1), size[0] - h - 2), min(max(0, x0 - 1), size[1] - w - 2)
        rows, cols = slice(top, top + h + 2), slice(left, left + w + 2)
        out[i, :, rows, cols] = op(x[i : i + 1])[0, :, rows, cols]
    return out


def test_squeeze_excitation_is_exact_by_default_and_names_the_local_mode():
    model = seeded(SqueezeExcite())
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert [d.node for d in engine.dense_nodes] == ["mul"]
    assert "global_context='local'" in engine.dense_nodes[0].reason
    assert not engine(image()).approximate


def test_local_global_context_applies_the_gate_inside_the_changed_box_only():
    model = seeded(SqueezeExcite())
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3, global_context="local")
    picture = image()
    local = engine.outputs(picture, POSITIONS)
    torch.testing.assert_close(
        local, local_gate_oracle(model, picture, POSITIONS, PATCH), rtol=1e-12, atol=1e-12
    )
    with torch.no_grad():
        exact = model(kfx.occlude(picture.clone(), POSITIONS, PATCH))
    assert (local - exact).abs().max() > 1e-6  # the gate does change outside the box: an approximation
    heatmap = engine(picture)
    assert heatmap.approximate and heatmap.global_context == "local"
    assert engine.dense_nodes == []
    ungated = kfx.compile(seeded(SqueezeExcite(gated=False)), SHAPE, PATCH).cost().theoretical_speedup
    assert engine.cost().theoretical_speedup >= 0.9 * ungated


def test_local_global_context_is_exact_when_the_gate_does_not_depend_on_the_image():
    model = seeded(SqueezeExcite())
    with torch.no_grad():
        model.squeeze.weight.zero_()  # the gate is sigmoid(excite(relu(bias))): a constant per channel
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3, global_context="local")
    assert_exact(model, engine)


def test_unknown_global_context_mode_is_refused():
    with pytest.raises(kfx.InputError, match="global_context must be one of 'exact', 'local'"):
        kfx.compile(seeded(SqueezeExcite()), SHAPE, PATCH, global_context="approximate")


class GhostSlice(nn.Module):
    """GhostNet's module: a primary conv and a cheap depthwise conv, concatenated and sliced back to
    the output width with ``x[:, :out]``; ReXNet slices ``x[:, 0:c]`` to add a shortcut."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.primary = nn.Conv2d(width, 3, 1)
        self.cheap = nn.Conv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, x):
        y = self.primary(x)
        out = torch.cat([y, self.cheap(y)], dim=1)[:, : x.shape[1]]
        return torch.cat([out[:, 0:2] + x[:, 0:2, :, :], out[:, 2:]], dim=1)


class GhostSplit(GhostSlice):
    """The same function with ``split`` instead of slices: the ceiling to match."""

    def forward(self, x):
        y = self.primary(x)
        out = torch.cat([y, self.cheap(y)], dim=1).split([4, 2], dim=1)[0]
        first, rest = out.split([2, 2], dim=1)
        return torch.cat([first + x.split([2, 2], dim=1)[0], rest], dim=1)


def test_channel_slices_are_exact_and_incremental():
    model = seeded(Classifier(GhostSlice()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert engine.dense_nodes == []
    assert ceiling(model) == pytest.approx(ceiling(seeded(Classifier(GhostSplit()))), rel=1e-9)


def test_a_slice_of_the_spatial_dims_is_not_a_channel_op():
    class Crop(nn.Module):
        def forward(self, x):
            return x[:, :, 1:, :-1]

    model = seeded(Classifier(Crop()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)  # exact because it runs densely
    assert [d.node for d in engine.dense_nodes] == ["getitem"]


class Interpolate(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, x):
        return F.interpolate(x, **self.options)


RESAMPLERS = {
    "nearest x2": nn.Upsample(scale_factor=2),
    "bilinear x2": nn.Upsample(scale_factor=2, mode="bilinear"),
    "bilinear x2, align_corners": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "bilinear to 23x17": Interpolate(size=(23, 17), mode="bilinear"),
    "nearest x1.5": Interpolate(scale_factor=1.5, mode="nearest"),
    "bilinear x0.5 (down)": Interpolate(scale_factor=0.5, mode="bilinear"),
    "nearest to 5x7 (down)": Interpolate(size=(5, 7)),
    "bicubic x1.75": Interpolate(scale_factor=1.75, mode="bicubic"),
    "size from the shape": None,  # filled below: F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2))
}


class FromShape(nn.Module):
    def forward(self, x):
        return F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear")


RESAMPLERS["size from the shape"] = FromShape()


class Fuse(nn.Module):
    """HRNet's fuse layer in miniature: a strided branch upsampled back and added to the main one."""

    def __init__(self, resampler: nn.Module, width: int = 4):
        super().__init__()
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.resampler = resampler
        with torch.no_grad():  # add the branches where the resampler restores the input's size
            self.add = resampler(torch.zeros(1, 1, 8, 8)).shape[-2:] == (16, 16)

    def forward(self, x):
        up = self.resampler(self.down(x))
        return x + up if self.add else up


@pytest.mark.parametrize("name", RESAMPLERS)
def test_resampling_is_exact_and_incremental(name):
    assert_exact_and_incremental(Fuse(RESAMPLERS[name]), "resample")


@pytest.mark.parametrize("name", ["nearest x2", "bilinear x2", "bicubic x1.75", "nearest to 5x7 (down)"])
def test_resampling_boxes_cover_every_changed_output(name):
    """Brute force: every output cell that differs between two inputs differing in one box lies in
    the box kfx.geometry gives; the read-in window holds every input those outputs read."""
    from kfx.geometry import resample_output_span, resample_read_span
    from kfx.passes.resample import _axis_matrix

    op, size = RESAMPLERS[name], 8
    assert_boxes_cover(
        _axis_matrix(op, (size, size), 0, torch.float64), resample_output_span, resample_read_span
    )


def assert_boxes_cover(matrix: torch.Tensor, output_span, read_span) -> None:
    """For every changed input range of one axis of a linear map [out, in]: the outputs that read
    it (its nonzero weights, brute force) lie in ``output_span``'s box, and every input those box
    outputs read lies in ``read_span``'s window."""
    from kfx.passes.resample import _reach

    first, stop = _reach(matrix)
    size = matrix.shape[1]
    for start in range(size):
        for width in range(1, size - start + 1):
            changed = torch.zeros(size, dtype=matrix.dtype)
            changed[start : start + width] = 1
            hit = (matrix.abs() @ changed).nonzero().flatten().tolist()
            box = output_span(start, width, first, stop)
            assert all(box.start <= o < box.start + box.width for o in hit)
            read = read_span(box.start, box.width, first, stop)
            reads = matrix[box.start : box.start + box.width].nonzero()[:, 1].tolist()
            assert all(read.start <= i < read.start + read.width for i in reads)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block in miniature: depthwise conv, permute to NHWC, LayerNorm and a Linear MLP over
    channels, permute back, layer scale, residual. ``functional`` spells the norm and the first
    Linear with F.layer_norm / F.linear on parameters (as timm's LayerNorm does)."""

    def __init__(self, width: int = 4, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.conv_dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 3 * width)
        self.fc2 = nn.Linear(3 * width, width)
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        if self.functional:
            y = F.linear(
                F.layer_norm(y, y.shape[-1:], self.norm.weight, self.norm.bias),
                self.fc1.weight,
                self.fc1.bias,
            )
        else:
            y = self.fc1(self.norm(y))
        y = self.fc2(F.gelu(y)).permute(0, 3, 1, 2)
        return x + y * self.gamma.reshape(1, -1, 1, 1)


class ChannelsFirstBlock(ChannelsLastBlock):
    """The same block with 1x1 convs and a per-channel affine instead: the ceiling to match."""

    def __init__(self, width: int = 4):
        super().__init__(width)
        self.fc1 = nn.Conv2d(width, 3 * width, 1)
        self.fc2 = nn.Conv2d(3 * width, width, 1)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.norm(self.conv_dw(x)))))
        return x + y * self.gamma.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("functional", [False, True])
def test_channels_last_blocks_are_exact_and_incremental(functional):
    model = seeded(Classifier(ChannelsLastBlock(functional=functional)))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert engine.dense_nodes == []
    assert ceiling(model) == pytest.approx(ceiling(seeded(Classifier(ChannelsFirstBlock()))), rel=0.1)


class ChannelsLastHead(nn.Module):
    """A channels-last map read by a spatial op (a conv over the wrong dims after a transpose, then
    a projection): dense from there, still exact."""

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        return (y.sum(dim=1, keepdim=True) + y).permute(0, 3, 1, 2)


def test_a_spatial_op_on_a_channels_last_map_runs_densely_and_exactly():
    model = seeded(Classifier(ChannelsLastHead()))
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=3)
    assert_exact(model, engine)
    assert "channels-last" in engine.dense_nodes[0].reason


class ShapeBranch(nn.Module):
    """Python control flow on a shape, which torch.fx cannot trace: kept whole as a leaf."""

    def forward(self, x):
        return x * 2 if x.shape[-1] > 8 else x


def doubled(x):
    return x * 2 if x.shape[-1] > 8 else x


class CallsDoubled(nn.Module):
    def forward(self, x):
        return doubled(x)


def test_leaf_modules_and_autowrapped_functions_run_densely_and_exactly():
    for body, hooks in [
        (ShapeBranch(), {"leaf_modules": (ShapeBranch,)}),
        (CallsDoubled(), {"autowrap_functions": (doubled,)}),
    ]:
        model = seeded(Classifier(body))
        names = (
            r"in submodule 'body', a ShapeBranch.*leaf_modules=\(ShapeBranch,\)"
            if "leaf_modules" in hooks
            else "leaf_modules"
        )
        with pytest.raises(kfx.TraceError, match=names):
            kfx.compile(model, SHAPE, PATCH)
        engine = kfx.compile(model, SHAPE, PATCH, batch_size=3, **hooks)
        assert_exact(model, engine)
        assert len(engine.dense_nodes) == 1


@pytest.mark.parametrize(
    "hooks, match",
    [
        ({"leaf_modules": (ShapeBranch(),)}, "classes, not instances"),
        ({"leaf_modules": ShapeBranch}, "must be tuples"),
        ({"autowrap_functions": (len,)}, "plain Python functions"),
    ],
)
def test_bad_tracer_hooks_are_refused(hooks, match):
    with pytest.raises(kfx.InputError, match=match):
        kfx.compile(seeded(Classifier(ShapeBranch())), SHAPE, PATCH, **hooks)


def test_tune_chooses_the_local_mode_when_it_meets_the_target_and_is_faster():
    from kfx.approx import heatmap_ssim

    model = seeded(SqueezeExcite())
    samples = [image(seed) for seed in range(4)]
    engine = kfx.tune(
        model, SHAPE, PATCH, samples, 0.5, taus=(1.0, 0.8, 0.6), global_context=("exact", "local")
    )
    tuning = engine.tuning
    modes = {mode: ceiling for mode, _, ceiling in tuning.candidates}
    assert set(modes) == {"exact", "local"} and modes["local"] > modes["exact"]
    assert engine.global_context == tuning.global_context == "local"
    exact = kfx.compile(model, SHAPE, PATCH)
    column = tuning.taus.index(engine.tau)
    for i, sample in enumerate(samples):  # the recorded SSIM is the returned engine's, against the exact map
        reference = exact(sample)
        assert heatmap_ssim(reference, engine(sample, reference.target)) == pytest.approx(
            tuning.ssim[i][column]
        )


def test_tune_falls_back_to_the_exact_engine_when_local_misses_the_target():
    model = seeded(SqueezeExcite())
    engine = kfx.tune(model, SHAPE, PATCH, [image(0)], 1.0, taus=(1.0, 0.8, 0.6), global_context="local")
    tuning = engine.tuning  # SSIM 1 is out of the local mode's reach: the exact mode is tuned instead
    assert engine.global_context == tuning.global_context == "exact"
    assert [mode for mode, _, _ in tuning.candidates] == ["exact"]
    assert tuning.lower[tuning.taus.index(engine.tau)] >= 1.0
    with pytest.raises(kfx.InputError, match="global_context must be"):
        kfx.tune(model, SHAPE, PATCH, [image(0)], global_context="fast")


class FunctionalTransposed(nn.Module):
    def __init__(self, conv: nn.ConvTranspose2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        return F.conv_transpose2d(
            x, c.weight, c.bias, c.stride, c.padding, c.output_padding, c.groups, c.dilation
        )


TRANSPOSED = {
    "2x2 stride 2": nn.ConvTranspose2d(4, 4, 2, stride=2),
    "4x4 stride 2 padding 1": nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1),
    "3x3 stride 2 padding 1 output_padding 1": nn.ConvTranspose2d(
        4, 4, 3, stride=2, padding=1, output_padding=1
    ),
    "1x1 stride 3 (outputs no input reaches)": nn.ConvTranspose2d(4, 4, 1, stride=3),
    "3x3 stride 1 padding 1, groups 2": nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2),
    "3x2 stride (2, 3), dilation 2": nn.ConvTranspose2d(4, 4, (3, 2), stride=(2, 3), dilation=2),
    "functional 4x4 stride 2 padding 1": FunctionalTransposed(
        nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
    ),
}


class Decoder(nn.Module):
    """A UNet-style decoder step: a strided conv down, a transposed conv back up."""

    def __init__(self, up: nn.Module, width: int = 4):
        super().__init__()
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.up = up

    def forward(self, x):
        return self.up(self.down(x))


@pytest.mark.parametrize("name", TRANSPOSED)
def test_transposed_convs_are_exact_and_incremental(name):
    assert_exact_and_incremental(Decoder(TRANSPOSED[name]), "transposed")


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (4, 2, 1), (3, 2, 1), (1, 3, 0), (5, 1, 2)])
def test_transposed_conv_boxes_cover_every_changed_output(kernel, stride, padding):
    """Brute force on one axis: the outputs a changed input span reaches lie in the box, and the
    inputs that reach the box lie in the read-in window."""
    from kfx.geometry import transposed_conv_output_span, transposed_conv_read_span

    size = 7
    out_size = (size - 1) * stride - 2 * padding + kernel
    reach = {
        i: [i * stride - padding + j for j in range(kernel) if 0 <= i * stride - padding + j < out_size]
        for i in range(size)
    }
    for start in range(size):
        for width in range(1, size - start + 1):
            box = transposed_conv_output_span(
                start, width, kernel=kernel, stride=stride, padding=padding, out_size=out_size
            )
            hit = [o for i in range(start, start + width) for o in reach[i]]
            assert all(box.start <= o < box.stop for o in hit)
            read = transposed_conv_read_span(
                box.start, box.width, kernel=kernel, stride=stride, padding=padding
            )
            needed = [i for i in range(size) if any(box.start <= o < box.stop for o in reach[i])]
            assert all(read.start <= i < read.stop for i in needed)


def test_the_cost_model_counts_transposed_convs_by_their_read_in_window():
    model = seeded(Classifier(Decoder(nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1))))
    engine = kfx.compile(model, SHAPE, PATCH)
    (layer,) = [layer for layer in engine.cost().layers if layer.node == "body_up"]
    read = engine.graph_module.graph.find_nodes(op="call_module", target="body.up")[0].meta["kfx_patch"].read
    per_input = 4 * 4 * 4 * 4  # C_in * C_out * k_h * k_w
    assert layer.full == per_input * 8 * 8 and layer.incremental == per_input * read[0].width * read[1].width
