"""Never a silently wrong map: in-place ops, stale caches, threads, batch-dependent models (issue #14).

Every check compares the engine with torch itself: the caller's model run eagerly on the occluded
images (``model(kfx.occlude(...))``), never with another kfx path.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfx

SHAPE = (3, 12, 12)
PATCH = kfx.Patch(4, stride=4, fill=0.0)
POSITIONS = torch.tensor([[0, 0], [4, 8], [8, 4], [3, 5]])


def assert_exact(model: nn.Module, engine, image: torch.Tensor, positions=POSITIONS) -> None:
    """engine.outputs and the map's base probability equal the eager model's own answers."""
    with torch.no_grad():
        expected = model(kfx.occlude(image.clone(), positions, engine.patch))
        base = torch.softmax(model(image.clone()[None]), dim=1)[0]
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=1e-12, atol=1e-12)
    heatmap = engine(image)
    assert heatmap.base == pytest.approx(float(base[heatmap.target]), rel=1e-12)


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Head(nn.Module):
    """conv -> (the body under test) -> pool -> linear, so every test model ends in class scores."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.act = nn.ReLU(inplace=True)

    def head(self, y):
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


# -- 1. in-place ops ----------------------------------------------------------------------------


def _statement(body):
    class Model(Head):
        def forward(self, x):
            y = self.conv(x)
            z = body(self, y)
            return self.head(z)

    return Model().double().eval()


def _relu_method(self, y):
    y.relu_()
    return y


def _relu_inplace_kw(self, y):
    F.relu(y, inplace=True)
    return y


def _torch_relu_(self, y):
    torch.relu_(y)
    return y


def _clamp_(self, y):
    y.clamp_(min=-0.1, max=0.2)
    return y


def _mul_other(self, y):
    z = self.conv2(y)
    y.mul_(z)
    return y


def _chained(self, y):
    y.add_(1).mul_(2)
    return y


def _relu_module_statement(self, y):
    self.act(y)  # nn.ReLU(inplace=True) as a statement
    return y


def _relu_inplace_reused(self, y):
    a = F.relu(y, inplace=True)  # eager mutates y too: the later use of y sees the ReLU
    return a + self.conv2(y)


def _add_then_reuse(self, y):
    y.sub_(0.5)
    return torch.cat([y, y.sigmoid()], dim=1)[:, :6]


IN_PLACE = {
    "y.relu_()": _relu_method,
    "F.relu(inplace=True) statement": _relu_inplace_kw,
    "torch.relu_(y)": _torch_relu_,
    "y.clamp_()": _clamp_,
    "y.mul_(z)": _mul_other,
    "y.add_(1).mul_(2)": _chained,
    "nn.ReLU(inplace=True)(y)": _relu_module_statement,
    "inplace result and input both used": _relu_inplace_reused,
    "y.sub_() then reuse": _add_then_reuse,
}


@pytest.mark.parametrize("body", IN_PLACE.values(), ids=IN_PLACE.keys())
def test_in_place_ops_are_exact(body):
    model = _statement(body)
    engine = kfx.compile(model, SHAPE, PATCH)
    assert_exact(model, engine, image())


class InPlaceModule(Head):
    """ReLU(inplace=True) as a registered module whose input is used again later."""

    def forward(self, x):
        y = self.conv(x)
        a = self.act(y)
        return self.head(a + self.conv2(y))


def test_inplace_module_whose_input_is_reused():
    model = InPlaceModule().double().eval()
    assert_exact(model, kfx.compile(model, SHAPE, PATCH), image())
    assert model.act.inplace is True  # the caller's module is untouched


class MutatedView(Head):
    def forward(self, x):
        y = self.conv(x)
        v = y[:, :3]  # a view: mutating it mutates y
        v.mul_(0)
        return self.head(y)


class MutatedThroughView(Head):
    def forward(self, x):
        y = self.conv(x)
        flat = y.view(1, 6, 144)
        y.relu_()  # flat sees the ReLU in eager mode
        return self.fc(flat.mean(2))


class AliasedIadd(Head):
    def forward(self, x):
        y = self.conv(x)
        z = y  # an alias: eager's y += 1 changes z too, but torch.fx records y = y + 1
        y += 1
        return self.head(z * 2)


class SetItem(Head):
    def forward(self, x):
        y = self.conv(x)
        y[:, 0] = 0
        return self.head(y)


@pytest.mark.parametrize("cls", [MutatedView, MutatedThroughView, AliasedIadd, SetItem])
def test_mutations_through_aliases_are_refused(cls):
    """No rebinding can make these functional: refused with a TraceError, never computed wrongly."""
    model = cls().double().eval()
    with pytest.raises(kfx.TraceError, match="in-place|in place|something other than the model"):
        kfx.compile(model, SHAPE, PATCH)


# -- 2. stale base activations ------------------------------------------------------------------


class BNModel(Head):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _fresh_bn_model(seed: int) -> BNModel:
    model = BNModel().double()
    torch.manual_seed(seed)
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def _load_state_dict(model):
    model.load_state_dict(_fresh_bn_model(1).state_dict())


def _optimizer_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(image()[None]).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _running_stats(model):
    with torch.no_grad():
        model.bn.running_mean.add_(0.5)


CHANGES = {"load_state_dict": _load_state_dict, "optimizer step": _optimizer_step, "BN stats": _running_stats}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_weight_changes_invalidate_the_base_activations(change):
    model = _fresh_bn_model(0)
    engine = kfx.compile(model, SHAPE, PATCH)
    x = image()
    before = engine(x)
    change(model)
    model.eval()
    assert_exact(model, engine, x)
    assert not torch.allclose(engine(x).values, before.values)


def test_replaced_parameters_or_training_mode_are_refused():
    model = _fresh_bn_model(0)
    engine = kfx.compile(model, SHAPE, PATCH)
    engine(image())
    model.fc = nn.Linear(6, 5).double().eval()
    with pytest.raises(kfx.ModelError, match="compile"):
        engine(image())
    model = _fresh_bn_model(0)
    engine = kfx.compile(model, SHAPE, PATCH)
    model.train()
    with pytest.raises(kfx.ModelError, match="eval"):
        engine.outputs(image(), POSITIONS)


# -- 3. threads ---------------------------------------------------------------------------------


def test_engine_is_safe_to_share_across_threads():
    model = _fresh_bn_model(0)
    engine = kfx.compile(model, SHAPE, PATCH, batch_size=2)
    images = [image(seed) for seed in range(4)]
    expected = [engine.outputs(x, POSITIONS) for x in images]
    failures: list[str] = []
    calls = 150

    def worker(k: int) -> None:
        for i in range(calls):
            which = (k + i) % len(images)
            out = engine.outputs(images[which], POSITIONS)
            if not torch.equal(out, expected[which]):
                failures.append(f"thread {k} call {i}: image {which} got another image's outputs")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up in a short run
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[:3]


# -- 4. models that mix the examples of a batch ---------------------------------------------------


class BatchStats(Head):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6, track_running_stats=False)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


class BatchMean(Head):
    def forward(self, x):
        y = self.conv(x)
        return self.head(y - y.mean(0, keepdim=True))


@pytest.mark.parametrize(
    "cls, match", [(BatchStats, r"BatchNorm2d \(bn\).*track_running_stats"), (BatchMean, "batch")]
)
def test_batch_dependent_models_are_refused(cls, match):
    model = cls().double().eval()
    with pytest.raises(kfx.ModelError, match=match):
        kfx.compile(model, SHAPE, PATCH)


def test_a_view_made_after_the_in_place_op_sees_its_result():
    """Found by hypothesis: x.relu_() on the input, then Flatten (a view of x) made afterwards."""
    from tests.strategies import Functional, _relu_statement

    torch.manual_seed(0)
    model = nn.Sequential(Functional("x.relu_(); x", _relu_statement), nn.Flatten(), nn.Linear(48, 5))
    model = model.double().eval()
    shape = (3, 4, 4)
    engine = kfx.compile(model, shape, kfx.Patch(2, stride=1))
    x = torch.randn(shape, dtype=torch.float64)
    positions = kfx.grid_positions(shape[1:], engine.patch)
    with torch.no_grad():
        expected = model(kfx.occlude(x.clone(), positions, engine.patch))
    torch.testing.assert_close(engine.outputs(x, positions), expected, rtol=1e-12, atol=1e-12)
