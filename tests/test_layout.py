"""The channels-last layout of 2-d CPU programs (docs/design.md §3.6): taken where the traced graph
runs in it, refused where it does not, and exact either way against brute-force occlusion."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfx
from kfx.passes.check import check_traced, runs_channels_last


class Shuffled(nn.Module):
    """Convs, a channel shuffle (views that split and merge channels: its reshape makes the map
    contiguous again, so the layouts mix), a residual add, a pool, a concat and a classifier on the
    global mean."""

    def __init__(self, shuffle: bool = True):
        super().__init__()
        self.shuffle = shuffle
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if self.shuffle:
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.pool(x + self.branch(x))
        x = torch.cat([x, self.side(x)], 1)
        return self.head(x.mean((2, 3)))


class Flattened(nn.Module):
    """Flattens a spatial map with ``view``, which a channels-last map cannot do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.head(x.view(x.size(0), -1))


class RawOrder(nn.Module):
    """Reads a map in its storage order (``as_strided``): channels-last gives other values without
    an error, so only comparing outputs can refuse that layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        raw = torch.as_strided(y, (y.shape[0], 8), (y.stride(0), 1))
        return raw + y.mean((2, 3)).sum(1, keepdim=True)


def brute_force(model, image, positions, size):
    occluded = image.expand(len(positions), *image.shape).clone()
    for i, (y, x) in enumerate(positions.tolist()):
        occluded[i, :, y : y + size, x : x + size] = 0.0
    with torch.no_grad():
        return model(occluded)


def channels_innermost(t: torch.Tensor) -> bool:
    return t.movedim(-3, -1).is_contiguous() and not t.is_contiguous()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("plan", ["incremental", "full", "auto"])
def test_a_2d_program_runs_channels_last_and_stays_exact(plan, shuffle):
    torch.manual_seed(0)
    model = Shuffled(shuffle).double().eval()
    engine = kfx.compile(model, (3, 13, 12), kfx.Patch(4, stride=3), plan=plan)
    assert engine.compiled.channels_last and "channels-last" in repr(engine)
    image = torch.randn(3, 13, 12, dtype=torch.float64)
    positions = kfx.grid_positions((13, 12), engine.patch)
    got = engine.outputs(image, positions)
    torch.testing.assert_close(got, brute_force(model, image, positions, 4), rtol=1e-12, atol=1e-12)
    maps = [a for a in engine._prepare(image[None]).activations if a.dim() == 3 and a.shape[0] > 1]
    if not shuffle and plan != "full":  # every base map is channels-last
        assert maps and all(channels_innermost(a) for a in maps)


def test_a_graph_that_cannot_run_channels_last_keeps_the_contiguous_layout():
    torch.manual_seed(0)
    model = Flattened().double().eval()
    with pytest.raises(RuntimeError):  # why: view across a channels-last map's dims
        model(torch.randn(1, 3, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last))
    engine = kfx.compile(model, (3, 12, 12), kfx.Patch(3, stride=2))
    assert not engine.compiled.channels_last and "channels-last" not in repr(engine)
    image = torch.randn(3, 12, 12, dtype=torch.float64)
    positions = kfx.grid_positions((12, 12), engine.patch)
    torch.testing.assert_close(
        engine.outputs(image, positions), brute_force(model, image, positions, 3), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "model, runs",
    [(Shuffled(False), True), (Shuffled(True), True), (Flattened(), False), (RawOrder(), False)],
)
def test_the_compile_checks_layout_answer_is_the_one_load_gets(model, runs):
    """kfx.compile learns the layout from the check's run of the graph on its batch, kfx.load from a
    run on one image: the same answer, and the check passes either way."""
    torch.manual_seed(0)
    model = model.double().eval()
    gm = torch.fx.symbolic_trace(model)
    example = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        alone = gm(example[:1].clone())
    assert check_traced(model, gm, example, alone, try_channels_last=True) is runs
    assert check_traced(model, gm, example, alone) is False  # not asked: contiguous only
    assert runs_channels_last(gm, example[:1], alone) is runs


def test_signals_volumes_and_triton_programs_keep_the_contiguous_layout():
    conv1 = nn.Sequential(nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten()).eval()
    conv3 = nn.Sequential(nn.Conv3d(2, 3, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten()).eval()
    assert not kfx.compile(conv1, (2, 20), kfx.Patch(4)).compiled.channels_last
    assert not kfx.compile(conv3, (2, 8, 8, 8), kfx.Patch(4).for_axes(3)).compiled.channels_last


def test_full_inference_runs_the_callers_model_channels_last_where_the_program_does():
    torch.manual_seed(0)
    model = Shuffled(shuffle=False).double().eval()
    layouts = []
    model.stem.register_forward_pre_hook(lambda module, args: layouts.append(channels_innermost(args[0])))
    engine = kfx.compile(model, (3, 13, 12), kfx.Patch(4, stride=3), plan="full")
    image = torch.randn(3, 13, 12, dtype=torch.float64)
    positions = kfx.grid_positions((13, 12), engine.patch)
    layouts.clear()
    got = engine.outputs(image, positions)
    # every batch of occluded copies channels-last; at most the unoccluded image's run as given
    assert layouts.count(True) >= 1 and layouts.count(False) <= 1
    torch.testing.assert_close(got, brute_force(model, image, positions, 4), rtol=1e-12, atol=1e-12)
