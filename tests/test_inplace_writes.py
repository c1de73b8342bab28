"""Writes that functionalize cannot rewrite are refused, not computed wrong (passes/trace.py).

An ``out=`` argument, or an in-place op inside a module kept whole (``leaf_modules=``), changes a
tensor that later nodes read, and kfx's cached base activations with it. torch.fx records neither
as an in-place op, and the check against the eager model cannot see them (the graph mutates exactly
as the model does), so kfx once compiled such models and returned wrong maps. Shape propagation now
watches every tensor's version counter across each node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfx

SHAPE, PATCH = (3, 8, 8), kfx.Patch(4, stride=2)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 5)

    def head(self, y):
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class OutArgument(Head):
    def forward(self, x):
        y = self.conv(x)
        z = y.relu()
        torch.mul(y, 2, out=y)
        return self.head(z + y)


class DoublesInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


class DoublesThroughAView(nn.Module):
    def forward(self, x):
        x[:, :3].mul_(2)
        return x * 1


class DoublesACopy(nn.Module):
    def forward(self, x):
        return x.clone().mul_(2)


class WithLeaf(Head):
    def __init__(self, leaf: nn.Module):
        super().__init__()
        self.leaf = leaf

    def forward(self, x):
        y = self.conv(x)
        return self.head(self.leaf(y) + y)


@pytest.mark.parametrize(
    "model, leaves",
    [
        (OutArgument(), ()),
        (WithLeaf(DoublesInPlace()), (DoublesInPlace,)),
        (WithLeaf(DoublesThroughAView()), (DoublesThroughAView,)),
    ],
    ids=["out=", "leaf in-place", "leaf through a view"],
)
def test_writes_to_a_tensor_that_is_read_later_are_refused(model, leaves):
    with pytest.raises(kfx.TraceError, match="changes a tensor it reads in place"):
        kfx.compile(model.double().eval(), SHAPE, PATCH, leaf_modules=leaves)


def test_a_leaf_that_writes_only_its_own_copy_compiles_and_is_exact():
    model = WithLeaf(DoublesACopy()).double().eval()
    engine = kfx.compile(model, SHAPE, PATCH, leaf_modules=(DoublesACopy,), plan="incremental")
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    positions = kfx.grid_positions(SHAPE[1:], PATCH)
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, PATCH))
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=0, atol=1e-12)


class ReluInPlaceTwice(Head):
    """One ``nn.ReLU(inplace=True)`` called on two tensors that are read again afterwards: each call
    changes its input, so the later reads of both see the rectified values in eager mode."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        self.act(y)
        w = y - 0.1
        self.act(w)
        return self.head(w + y)


def test_an_in_place_module_called_twice_is_rewritten_at_both_calls_and_is_exact():
    model = ReluInPlaceTwice().double().eval()
    engine = kfx.compile(model, SHAPE, PATCH, plan="incremental")
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    positions = kfx.grid_positions(SHAPE[1:], PATCH)
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, PATCH))
    torch.testing.assert_close(engine.outputs(image, positions), expected, rtol=0, atol=1e-12)
    assert model.act.inplace  # the caller's module is untouched: the graph runs its own copy
