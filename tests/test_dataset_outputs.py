"""kfx.explain_dataset(drill_down=..., png=..., npy=...) and ``kfx batch --drill-down --png --npy``
with the local runner: drill-down rows against engine(image, drill_down=...) (the oracle), the
drill-down settings in the fingerprint, and per-image files against what ``kfx explain`` writes."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_dataset import PATCH, SIZE, TINY, bad_inputs, rows_in_parts, write_photos

import kfx
import kfx.dataset
from kfx import cli
from kfx.models import load_model, read_pixels

SPEEDUP_2 = kfx.DrillDown(target_speedup=2)


def drill_down_oracle(path, drill_down: kfx.DrillDown) -> kfx.Heatmap:
    """The engine's own drill-down map: the CLI's reading and resizing, one compile, one call."""
    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(path)), SIZE)
    return kfx.compile(loaded.model, (3, SIZE, SIZE), PATCH)(image, drill_down=drill_down)


def explain(source, out, **options):
    return kfx.explain_dataset(source, TINY, PATCH, out, size=SIZE, **options)


def assert_drill_down_rows(table, drill_down: kfx.DrillDown) -> None:
    for _, row in table.iterrows():
        expected = drill_down_oracle(row["path"], drill_down)
        assert row["status"] == "ok" and row["approximate"]
        assert torch.equal(torch.from_numpy(row["map"]), expected.values)
        assert torch.equal(torch.from_numpy(row["measured"]), expected.measured)
        assert not row["measured"].all()  # fewer queries than cells: some values are interpolated
        assert row["target"] == expected.target
        heatmap = kfx.dataset.heatmap(row)
        assert heatmap.approximate and torch.equal(heatmap.measured, expected.measured)
        assert torch.equal(heatmap.values, expected.values)


@pytest.mark.parametrize(
    "drill_down", [SPEEDUP_2, kfx.DrillDown(0.25, target_speedup=2)], ids=["adaptive", "lowest"]
)
def test_drill_down_rows_equal_the_engine_with_the_same_settings(tmp_path, drill_down):
    write_photos(tmp_path / "photos", 3)
    summary = explain(tmp_path / "photos", tmp_path / "out", drill_down=drill_down)
    assert (summary.done, summary.failed) == (3, 0)
    table = kfx.read_results(tmp_path / "out")
    assert_drill_down_rows(table, drill_down)
    settings = json.loads(table["drill_down"].iloc[0])
    assert settings["rule"] == drill_down.rule and settings["target_speedup"] == 2.0
    config = json.loads((summary.folder / "config.json").read_text())
    assert config["drill_down"] == settings


def test_drill_down_settings_are_part_of_the_configuration(tmp_path):
    write_photos(tmp_path / "photos", 3)
    out = tmp_path / "out"
    exact = explain(tmp_path / "photos", out)
    approximate = explain(tmp_path / "photos", out, drill_down=SPEEDUP_2)
    # exact rows are never taken for drill-down rows (nor the reverse): another folder, all computed
    assert approximate.folder != exact.folder and (approximate.done, approximate.skipped) == (3, 0)
    again = explain(tmp_path / "photos", out, drill_down=kfx.DrillDown(target_speedup=2.0))
    assert (again.folder, again.done, again.skipped) == (approximate.folder, 0, 3)
    other = explain(tmp_path / "photos", out, drill_down=kfx.DrillDown(target_speedup=3))
    assert other.folder not in (exact.folder, approximate.folder) and other.done == 3
    with pytest.raises(kfx.InputError, match="3 configurations.*drill-down"):
        kfx.read_results(out)
    exact_rows = kfx.read_results(out, fingerprint=exact.fingerprint)
    assert not exact_rows["approximate"].any() and exact_rows["drill_down"].isna().all()
    assert all(m is None for m in exact_rows["measured"])
    assert not kfx.dataset.heatmap(exact_rows.iloc[0]).approximate
    assert_drill_down_rows(kfx.read_results(out, fingerprint=approximate.fingerprint), SPEEDUP_2)
    assert len(rows_in_parts(out)) == 9  # three configurations, each image once in each


def test_a_drill_down_that_does_not_suit_the_patch_is_refused_before_any_work(tmp_path):
    write_photos(tmp_path / "photos", 1)
    with pytest.raises(kfx.InputError, match="finer than the engine's stride"):
        explain(tmp_path / "photos", tmp_path / "out", drill_down=kfx.DrillDown(0.25, stage1_stride=2))
    with pytest.raises(kfx.InputError, match="must be a kfx.DrillDown"):
        explain(tmp_path / "photos", tmp_path / "out", drill_down=3)
    assert not rows_in_parts(tmp_path / "out")


def kfx_explain_files(path, folder: Path, *options) -> tuple[Path, Path]:
    """The picture and .npy ``kfx explain`` writes for one image: the per-image files' oracle."""
    picture, npy = folder / f"{Path(path).stem}.png", folder / f"{Path(path).stem}.npy"
    args = ["explain", path, "--model", TINY, "--size", SIZE, "--patch", 8, "--stride", 4, *options]
    assert cli.main([str(a) for a in [*args, "--out", picture, "--npy", npy, "-q"]]) == 0
    return picture, npy


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def test_png_and_npy_per_image_as_kfx_explain_writes_them(tmp_path):
    # two inputs with the same file name in different folders, and one image explained for two classes
    paths = write_photos(tmp_path / "a", 2) + write_photos(tmp_path / "b", 1)
    bad = bad_inputs(tmp_path / "a")
    manifest = tmp_path / "inputs.csv"
    rows = [f"{p}," for p in [*paths, *bad.values()]] + [f"{paths[0]},3"]
    manifest.write_text("path,target\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    summary = explain(manifest, out, png=True, npy=True, drill_down=SPEEDUP_2)
    assert (summary.done, summary.failed, summary.files_written) == (4, 3, 4)
    assert summary.images == summary.folder / "images"
    written = sorted(summary.images.iterdir())
    assert len(written) == 8 and len({p.name for p in written}) == 8  # no name shared, no temporary left
    table = kfx.read_results(out)
    for _, row in table.iterrows():
        files = kfx.dataset.image_files(out, row)
        if row["status"] == "error":
            assert files == {}
            continue
        assert set(files) == {"png", "npy"} and files["png"].stem.startswith(Path(row["path"]).stem + "-")
        values = np.load(files["npy"])
        assert values.dtype == np.float32 and np.array_equal(values, row["map"])
        with Image.open(files["png"]) as picture:
            assert picture.format == "PNG"
        target = [] if pd.isna(row["requested_target"]) else ["--target", row["requested_target"]]
        picture, npy = kfx_explain_files(row["path"], tmp_path / "explain", "--drill-down", "2", *target)
        assert np.array_equal(pixels(files["png"]), pixels(picture))  # the same picture, pixel for pixel
        assert np.array_equal(values, np.load(npy))


def test_files_are_skipped_on_resume_and_missing_ones_come_from_the_stored_rows(tmp_path):
    paths = write_photos(tmp_path / "photos", 3)
    out = tmp_path / "out"
    first = explain(tmp_path / "photos", out, npy=True)
    stamps = {p: p.stat().st_mtime_ns for p in first.images.iterdir()}
    again = explain(tmp_path / "photos", out, npy=True)
    assert (again.done, again.skipped, again.files_written) == (0, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in again.images.iterdir()} == stamps  # not rewritten
    # a file lost (a run killed between a row and its files), and pictures asked for on a rerun:
    # written from the stored rows, nothing explained again
    lost = sorted(stamps)[0]
    lost.unlink()
    resumed = explain(tmp_path / "photos", out, npy=True, png=True)
    assert (resumed.done, resumed.skipped, resumed.files_written) == (0, 3, 3)
    assert len(rows_in_parts(out)) == 3
    table = kfx.read_results(out)
    for _, row in table.iterrows():
        files = kfx.dataset.image_files(out, row)
        assert np.array_equal(np.load(files["npy"]), row["map"])
        picture, _ = kfx_explain_files(row["path"], tmp_path / "explain")
        assert np.array_equal(pixels(files["png"]), pixels(picture))
    assert sorted(table["path"]) == sorted(str(p) for p in paths)
    # an image replaced by a broken file: its row is now an error, and its old files are gone
    paths[1].write_bytes(b"no longer a picture")
    broken = explain(tmp_path / "photos", out, npy=True, png=True)
    assert (broken.done, broken.skipped, broken.failed) == (0, 2, 1)
    table = kfx.read_results(out)
    row = table[table["path"] == str(paths[1])].iloc[0]
    assert row["status"] == "error" and kfx.dataset.image_files(out, row) == {}
    assert len(list(broken.images.iterdir())) == 4  # the two other images' .png and .npy


def test_cli_batch_drill_down_png_npy(tmp_path, capsys):
    write_photos(tmp_path / "photos", 2)
    common = ["batch", tmp_path / "photos", "--model", TINY, "--size", SIZE, "--patch", 8, "--stride", 4]
    code = cli.main(
        [str(a) for a in [*common, "--out", tmp_path / "out", "--drill-down", "2", "--png", "--npy"]]
    )
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, ""), captured.err
    assert "2 explained" in captured.out and "files of 2 inputs written to" in captured.out
    table = kfx.read_results(tmp_path / "out")
    assert_drill_down_rows(table, SPEEDUP_2)
    for _, row in table.iterrows():
        assert np.array_equal(np.load(kfx.dataset.image_files(tmp_path / "out", row)["npy"]), row["map"])
    for option, status, fragment in [
        ("rule=paper,queries=3", 2, "--drill-down rule=paper,queries=3: queries and target_ssim are"),
        ("0.5", 2, "argument --drill-down: a single number is the adaptive rule's SPEEDUP"),
        ("stage1=2", 1, "finer than the engine's stride"),
    ]:
        code = cli.main([str(a) for a in [*common, "--out", tmp_path / "o2", "--drill-down", option]])
        err = capsys.readouterr().err
        assert code == status and err.startswith("kfx: error: ") and fragment in err, err
        assert len(err.splitlines()) == 1
