"""Positions of several small images in one batch (kfx/_multi_image.py) and the local dataset run
that groups images by it: every map against a per-image oracle, a bad input inside a group, each
image's own target, and batches that really hold positions of several images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kfx
import kfx._multi_image as multi
import kfx.dataset
from kfx.models import resize_crop
from kfx.patch import grid_positions

SIZE = 32
PATCH = kfx.Patch(8, stride=4)  # a 7 x 7 grid: 49 positions, fewer than the default batch of 64
CLASSES = 6


def tiny64() -> nn.Module:
    """A small float64 CNN with fixed random weights (float64: the maps agree to 1e-12)."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, CLASSES),
        )
        .double()
        .eval()
    )


def to_unit_range(unit):
    return unit * 2 - 1


def write_photos(folder: Path, count: int) -> list[Path]:
    """``count`` different random RGB PNGs (each its own map)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (np.random.default_rng(100 + i).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        paths.append(folder / f"photo{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def model_input(path) -> torch.Tensor:
    from kfx.models import read_pixels

    return to_unit_range(resize_crop(read_pixels(str(path)), SIZE)).double()


@pytest.fixture
def grouped(monkeypatch):
    """Group images whatever the plan (full inference is exact for every engine), and record the
    batch size of every call of the model inside multi.grid_outputs (the grouped run)."""
    monkeypatch.setattr(multi, "_runs_fully", lambda engine: True)
    model, calls, inside = tiny64(), [], []

    def record(module, args, out) -> None:
        if inside:
            calls.append(args[0].shape[0])

    model.register_forward_hook(record)
    grid_outputs = multi.grid_outputs

    def recorded(engine, bases):
        inside.append(True)
        try:
            return grid_outputs(engine, bases)
        finally:
            inside.clear()

    monkeypatch.setattr(multi, "grid_outputs", recorded)
    return model, calls


def explain(source, model, out, **options):
    return kfx.explain_dataset(source, model, PATCH, out, size=SIZE, preprocess=to_unit_range, **options)


def test_grouped_rows_equal_each_images_own_map_with_a_corrupt_file_in_the_group(
    tmp_path, grouped, monkeypatch
):
    model, calls = grouped
    paths = write_photos(tmp_path / "photos", 5)
    corrupt = tmp_path / "photos" / "photo2b.png"  # between photo2 and photo3: inside the group
    corrupt.write_bytes(b"not a picture")
    heatmaps = {}  # each row's float64 map, before the row stores it as float32
    row_of = kfx.dataset.Explainer._row

    def spy(self, item, *args, result=None, **kwargs):
        heatmaps[item.path] = result
        return row_of(self, item, *args, result=result, **kwargs)

    monkeypatch.setattr(kfx.dataset.Explainer, "_row", spy)
    summary = explain(tmp_path / "photos", model, tmp_path / "out")
    assert (summary.done, summary.failed, summary.total) == (5, 1, 6)
    # the five good images' 245 positions ran end to end in batches of 64: grouped, none dropped
    assert calls == [64, 64, 64, 53]
    table = kfx.read_results(tmp_path / "out").set_index("path")
    engine = kfx.compile(tiny64(), (3, SIZE, SIZE), PATCH)  # the oracle: one image per call
    for path in paths:
        row, got, expected = table.loc[str(path)], heatmaps[str(path)], engine(model_input(path))
        assert row["status"] == "ok" and (got.target, row["target"]) == (expected.target, expected.target)
        assert got.base == pytest.approx(expected.base, abs=1e-12) and got.image_size == (SIZE, SIZE)
        assert got.values.dtype == torch.float64 and not got.approximate and got.patch == PATCH
        torch.testing.assert_close(got.values, expected.values, rtol=0, atol=1e-12)
        assert np.array_equal(row["map"], got.values.float().numpy())
    # every image has its own map, so a row holding another image's outputs cannot pass the above
    maps = [heatmaps[str(path)].values for path in paths]
    assert all(not torch.allclose(a, b, atol=1e-4) for i, a in enumerate(maps) for b in maps[i + 1 :])
    row = table.loc[str(corrupt)]
    assert row["status"] == "error" and row["map"] is None and str(corrupt) in row["error"]


def test_each_grouped_image_explains_its_own_target(tmp_path, grouped):
    model, calls = grouped
    paths = write_photos(tmp_path / "photos", 4)
    targets = [0, 3, 5, 2]
    manifest = tmp_path / "t.csv"
    manifest.write_text("path,target\n" + "".join(f"{p},{t}\n" for p, t in zip(paths, targets)))
    summary = explain(manifest, model, tmp_path / "out")
    assert (summary.done, summary.failed) == (4, 0) and calls == [64, 64, 64, 4]
    table = kfx.read_results(tmp_path / "out").set_index("path")
    engine = kfx.compile(tiny64(), (3, SIZE, SIZE), PATCH)
    for path, target in zip(paths, targets):
        expected = engine(model_input(path), target)
        row = table.loc[str(path)]
        assert row["target"] == target and row["base_probability"] == pytest.approx(expected.base, abs=1e-12)
        torch.testing.assert_close(
            torch.from_numpy(row["map"]).double(), expected.values.float().double(), rtol=0, atol=1e-12
        )


def test_a_rerun_skips_grouped_rows_and_explains_only_the_new_image(tmp_path, grouped):
    model, _ = grouped
    paths = write_photos(tmp_path / "photos", 3)
    explain(tmp_path / "photos", model, tmp_path / "out")
    copy = tmp_path / "photos" / "same_as_photo1.png"
    copy.write_bytes(paths[1].read_bytes())
    summary = explain(tmp_path / "photos", model, tmp_path / "out")
    assert (summary.done, summary.skipped, summary.failed) == (1, 3, 0)
    table = kfx.read_results(tmp_path / "out").set_index("path")
    assert len(table) == 4
    torch.testing.assert_close(
        torch.from_numpy(table.loc[str(copy), "map"]), torch.from_numpy(table.loc[str(paths[1]), "map"])
    )


def test_grid_outputs_equal_engine_outputs_per_image_across_batch_boundaries():
    model = tiny64()
    engine = kfx.compile(model, (3, SIZE, SIZE), PATCH, batch_size=20, plan="full")
    torch.manual_seed(1)
    images = [torch.randn(3, SIZE, SIZE, dtype=torch.float64) for _ in range(4)]
    bases = [engine._prepare(engine._check_image(image)) for image in images]
    outputs = multi.grid_outputs(engine, bases)
    grid = grid_positions((SIZE, SIZE), PATCH)
    assert len(outputs) == len(images)
    for image, out in zip(images, outputs):
        expected = model(kfx.occlude(image, grid, PATCH))  # full inference, one image at a time
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        assert not torch.allclose(out, outputs[0]) or image is images[0]


def test_changed_weights_between_preparing_and_running_a_group_are_refused():
    model = tiny64()
    engine = kfx.compile(model, (3, SIZE, SIZE), PATCH, plan="full")
    bases = [engine._prepare(engine._check_image(torch.randn(3, SIZE, SIZE, dtype=torch.float64)))]
    with torch.no_grad():
        model[0].bias.add_(1.0)
    with pytest.raises(kfx.ModelError, match="weights changed"):
        multi.grid_outputs(engine, bases)


def test_only_exact_full_inference_engines_with_small_grids_group_images():
    model, shape = tiny64(), (3, SIZE, SIZE)
    full = kfx.compile(model, shape, PATCH, plan="full")
    assert multi.group_size(full) == 16  # lcm(49, 64) / 49 = 64 images fill whole batches: capped
    assert multi.group_size(kfx.compile(model, shape, PATCH, plan="full", batch_size=98)) == 2
    assert multi.group_size(kfx.compile(model, shape, PATCH, plan="full", batch_size=49)) == 1
    assert multi.group_size(full, {"drill_down": kfx.DrillDown(target_speedup=2)}) == 1
    assert multi.group_size(kfx.compile(model, shape, PATCH, plan="incremental")) == 1
    assert multi.group_size(kfx.compile(model, shape, PATCH, plan="incremental", tau=0.5)) == 1


class NanWhenBrightAndOccluded(nn.Module):
    """tiny64's scores, but NaN for occluded copies (a pixel equal to the fill, 0) of an image
    with a pixel at 1.0 (only the all-white test image: the others' pixels never reach 255)."""

    def __init__(self):
        super().__init__()
        self.net = tiny64()

    def forward(self, x):
        scores = self.net(x)
        bad = (x == 0).flatten(1).any(1) & (x.flatten(1).amax(1) >= 1.0)
        return torch.where(bad[:, None], torch.full_like(scores, float("nan")), scores)


def test_a_map_of_nan_in_the_group_is_its_own_error_row(tmp_path, monkeypatch):
    monkeypatch.setattr(multi, "_runs_fully", lambda engine: True)
    paths = write_photos(tmp_path / "photos", 3)
    white = tmp_path / "photos" / "photo1w.png"  # inside the group, between photo1 and photo2
    Image.fromarray(np.full((SIZE, SIZE, 3), 255, np.uint8)).save(white)
    summary = explain(tmp_path / "photos", NanWhenBrightAndOccluded().eval(), tmp_path / "out")
    assert (summary.done, summary.failed) == (3, 1)
    table = kfx.read_results(tmp_path / "out").set_index("path")
    assert table.loc[str(white), "status"] == "error"
    assert "NaN probabilities at 49 of 49 patch positions" in table.loc[str(white), "error"]
    engine = kfx.compile(tiny64(), (3, SIZE, SIZE), PATCH)
    for path in paths:
        expected = engine(model_input(path)).values.float()
        torch.testing.assert_close(torch.from_numpy(table.loc[str(path), "map"]), expected, rtol=0, atol=1e-7)
