"""Every torchvision classifier we list: the engine equals full inference (float64, random weights).

CI runs CI_SUBSET; the rest is marked slow: `pytest -m slow tests/test_zoo.py` runs it.
"""

import pytest
import torch

import kfx
from tests.zoo import CI_SUBSET, ZOO, build

PARAMS = [pytest.param(name, marks=() if name in CI_SUBSET else pytest.mark.slow) for name in ZOO]


@pytest.mark.parametrize("name", PARAMS)
def test_zoo_model_is_exact(name):
    size = ZOO[name]
    model = build(name)
    patch = kfx.Patch(8, stride=4, fill=0.5)
    engine = kfx.compile(model, (3, size, size), patch, batch_size=3)
    image = torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hi = size - 8
    generator = torch.Generator().manual_seed(1)
    positions = torch.cat(
        [
            torch.tensor([[0, 0], [0, hi], [hi, 0], [hi, hi]]),
            torch.randint(0, hi + 1, (3, 2), generator=generator),
        ]
    )
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, patch))
    actual = engine.outputs(image, positions)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-9
