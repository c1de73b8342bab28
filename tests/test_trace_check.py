"""The compile-time check tells rounding from batch dependence (kfx.passes.check.check_traced).

A per-example float32 model that amplifies rounding gives the first image of the check's batch
other outputs at batch sizes 1 and 2 (kernels sum in another order) by far more than the dtype's
tolerance; it must compile and give the brute-force map. Models that mix the images of a batch, or
depend on its size, must still be refused however large their outputs, and float64 stays strict.
Oracles: the eager model on the occluded images, in float32 and in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfx

SHAPE = (3, 12, 12)
PATCH = kfx.Patch(4, stride=2, fill=0.0)


class OffsetCancelling(nn.Module):
    """conv (outputs on an offset of 1e5) -> conv -> BatchNorm -> relu -> pool -> linear, per example.

    The BatchNorm's running statistics, calibrated on data, subtract the offset the second conv sums
    and divide by the small spread left, so float32 rounding of the offset (an ulp of ~1e5) reaches
    the outputs amplified: at batch sizes 1 and 2 they differ by about 0.5% (efficientnet_b0 with
    random weights and recalibrated BatchNorm does the same on the check's random input).
    """

    def __init__(self, offset: float = 1e5):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn = nn.BatchNorm2d(8, momentum=None)  # momentum None: the calibration batch's statistics
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.conv1.bias += offset
            self.train()
            self(torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0)))
        self.eval()

    def features(self, x):
        return F.relu(self.bn(self.conv2(self.conv1(x))))

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class LargeOutputs(nn.Module):
    """A well-conditioned per-example CNN whose scores are in the thousands (a final linear x 1e3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.fc.weight *= 1e3
        self.eval()

    def features(self, x):
        return F.relu(self.conv2(F.relu(self.conv(x))))

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def check_batch(dtype: torch.dtype) -> torch.Tensor:
    """The batch kfx checks models on (kfx.passes.annotate)."""
    example = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return example.to(dtype)


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_the_model_amplifies_rounding_beyond_the_old_tolerance():
    """The premise of the next test: float32 batch-size rounding far above 1e-4 of the outputs."""
    assert rounding_across_batch_sizes(OffsetCancelling()) > 1e-3


def test_per_example_model_that_amplifies_rounding_compiles_and_equals_brute_force():
    model = OffsetCancelling()
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=5)
    picture = image()
    positions = kfx.grid_positions(SHAPE[1:], PATCH)
    occluded = kfx.occlude(picture.clone(), positions, PATCH)
    with torch.no_grad():
        brute = model(occluded)
        exact = copy.deepcopy(model).double()(occluded.double())
    # float32 inference itself is only this close to the exact (float64) answer on this model; the
    # engine must be within a few times that.
    rounding = float((brute.double() - exact).abs().max())
    outputs = engine.outputs(picture, positions)
    assert outputs.dtype == torch.float32
    torch.testing.assert_close(outputs.double(), exact, rtol=0, atol=4 * rounding)
    naive = kfx.NaiveEngine(model, SHAPE, PATCH)(picture)
    heatmap = engine(picture)
    assert heatmap.target == naive.target
    # A softmax probability moves at most half as much as the largest score does; the two maps'
    # scores are at most 4 + 1 times float32's error apart.
    torch.testing.assert_close(heatmap.values, naive.values, rtol=0, atol=0.5 * 5 * rounding)


class MixesTheBatch(nn.Module):
    """``model`` with ``weight`` times the batch's mean feature added to every image's features."""

    def __init__(self, model: nn.Module, weight: float = 1e-2):
        super().__init__()
        self.model, self.weight = model, weight
        self.eval()

    def forward(self, x):
        y = self.model.features(x)
        y = y + self.weight * y.mean(0, keepdim=True)
        return self.model.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class BatchStatistics(nn.Module):
    """``model`` whose BatchNorm normalises with the batch's own statistics (training=True)."""

    def __init__(self, model: OffsetCancelling):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, x):
        bn = self.model.bn
        y = F.batch_norm(self.model.conv2(self.model.conv1(x)), None, None, bn.weight, bn.bias, True)
        return self.model.fc(F.adaptive_avg_pool2d(F.relu(y), 1).flatten(1))


class ScalesWithBatchSize(nn.Module):
    """``model``'s scores times 1 + weight * (N - 1): the same for every content of a batch of N."""

    def __init__(self, model: nn.Module, weight: float):
        super().__init__()
        self.model, self.weight = model, weight
        self.eval()

    def forward(self, x):
        return self.model(x) * (1 + self.weight * (x.shape[0] - 1))


def relative_change(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    """How much the first image's scores change, relative to their largest, from batch a to batch b."""
    with torch.no_grad():
        first_a, first_b = model(a)[0], model(b)[0]
    return float((first_a - first_b).abs().max() / first_a.abs().max())


def rounding_across_batch_sizes(model: nn.Module) -> float:
    example = check_batch(torch.float32)
    return relative_change(model, example, example[:1])


def mixing(model: nn.Module) -> float:
    """The change when the other image of the check's batch is replaced (the batch size kept)."""
    example = check_batch(torch.float32)
    replaced = example.clone()
    replaced[1] = image(5)
    return relative_change(model, example, replaced)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(MixesTheBatch(LargeOutputs()), id="large-outputs-mean-1e-2"),
        pytest.param(MixesTheBatch(OffsetCancelling()), id="amplifying-mean-1e-2"),
        pytest.param(BatchStatistics(OffsetCancelling()), id="amplifying-batch-statistics"),
    ],
)
def test_float32_models_that_mix_the_batch_are_refused(model):
    # The mixing is small next to the scores but above float32's tolerance (1e-4 of them).
    assert 3e-4 < mixing(model) < 0.1
    with pytest.raises(kfx.ModelError, match="depends on the other images in its batch"):
        kfx.compile(model, SHAPE, PATCH)


def test_mixing_below_the_rounding_across_batch_sizes_is_still_refused():
    """A tolerance wide enough for this model's batch-size rounding would let the mixing through."""
    model = MixesTheBatch(OffsetCancelling())
    assert mixing(model) < 0.5 * rounding_across_batch_sizes(OffsetCancelling())
    with pytest.raises(kfx.ModelError, match="depends on the other images in its batch"):
        kfx.compile(model, SHAPE, PATCH)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(ScalesWithBatchSize(LargeOutputs(), 1e-3), id="large-outputs-1e-3"),
        pytest.param(ScalesWithBatchSize(OffsetCancelling(), 0.5), id="amplifying-0.5"),
    ],
)
def test_float32_models_that_depend_on_the_batch_size_are_refused(model):
    with pytest.raises(kfx.ModelError, match="depends on the batch size"):
        kfx.compile(model, SHAPE, PATCH)


class CountsCalls(LargeOutputs):
    """Scores times 1 + 1e-3 * calls: tracing bakes in the count of its own call, a trace gap."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) * (1 + 1e-3 * self.calls)


def test_a_model_whose_state_changes_per_call_is_refused_at_large_outputs():
    # the traced graph bakes in one call's count, and every later call differs: refused as history-dependent
    with pytest.raises(kfx.ModelError, match="different outputs for the same images on two calls"):
        kfx.compile(CountsCalls(), SHAPE, PATCH)


@pytest.mark.parametrize(
    "model, match",
    [
        pytest.param(MixesTheBatch(LargeOutputs(), 1e-7), "other images", id="mean-1e-7"),
        pytest.param(ScalesWithBatchSize(LargeOutputs(), 1e-7), "batch size", id="batch-size-1e-7"),
    ],
)
def test_float64_stays_strict(model, match):
    model = model.double()
    with pytest.raises(kfx.ModelError, match=match):
        kfx.compile(model, SHAPE, PATCH)


def test_float64_per_example_model_with_large_outputs_compiles_and_is_exact():
    model = OffsetCancelling().double()
    engine = kfx.compile(model, SHAPE, PATCH)
    picture = image().double()
    positions = kfx.grid_positions(SHAPE[1:], PATCH)
    with torch.no_grad():
        expected = model(kfx.occlude(picture.clone(), positions, PATCH))
    torch.testing.assert_close(engine.outputs(picture, positions), expected, rtol=1e-9, atol=1e-9)
