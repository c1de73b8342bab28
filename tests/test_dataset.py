"""kfx.explain_dataset / kfx.read_results / ``kfx batch`` with the local runner: sources, the Parquet
rows against kfx.compile(...)(image) (the oracle), resuming, bad inputs, kills and interrupts."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import kfx
import kfx.dataset
from kfx import cli
from kfx.cli.common import OutputError
from kfx.models import load_model, read_pixels

TESTS = Path(__file__).parent
TINY = "cli_models:tiny"
SIZE = 32
PATCH = kfx.Patch(8, stride=4)


def write_photos(folder: Path, count: int, prefix: str = "photo") -> list[Path]:
    """``count`` small RGB PNGs of different shapes (each resized and cropped to SIZE)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        pixels = (rng.random((36 + 2 * i, 44 - i, 3)) * 255).astype(np.uint8)
        path = folder / f"{prefix}{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def oracle(path) -> kfx.Heatmap:
    """The map kfx explain would give: the CLI's reading and resizing, one kfx.compile, one call."""
    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(path)), SIZE)
    return kfx.compile(loaded.model, (3, SIZE, SIZE), PATCH)(image)


def explain(source, out, **options):
    return kfx.explain_dataset(source, TINY, PATCH, out, size=SIZE, **options)


def rows_in_parts(out: Path) -> list[dict]:
    """Every row of every part, duplicates included (read_results keeps one per input)."""
    tables = [pq.read_table(p) for p in sorted(Path(out).glob("config-*/part-*.parquet"))]
    return pa.concat_tables(tables).to_pylist() if tables else []


def test_folder_rows_equal_the_compiled_engine_and_read_back(tmp_path):
    paths = write_photos(tmp_path / "photos", 2) + write_photos(tmp_path / "photos" / "nested", 2, "deep")
    summary = explain(tmp_path / "photos", tmp_path / "out")
    assert (summary.done, summary.skipped, summary.failed, summary.total) == (4, 0, 0, 4)
    table = kfx.read_results(tmp_path / "out")
    assert sorted(table["path"]) == sorted(str(p) for p in paths)
    for _, row in table.iterrows():
        expected = oracle(row["path"])
        assert row["status"] == "ok" and pd.isna(row["error"])
        assert row["map"].dtype == np.float32 and row["map"].shape == tuple(expected.values.shape)
        assert torch.equal(torch.from_numpy(row["map"]), expected.values)
        assert (row["target"], row["base_probability"]) == (expected.target, pytest.approx(expected.base))
        assert row["content_hash"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
        assert list(row["patch"]) == [8, 8] and list(row["stride"]) == [4, 4] and row["tau"] == 1.0
        heatmap = kfx.dataset.heatmap(row)
        assert torch.equal(heatmap.values, expected.values) and heatmap.patch == PATCH
        assert heatmap.image_size == (SIZE, SIZE)
    # the exact map is the full-inference one too (independent of the incremental engine)
    first = table.iloc[0]
    loaded = load_model(TINY)
    naive = kfx.naive_heatmap(loaded.model, loaded.prepare(read_pixels(first["path"]), SIZE), PATCH)
    torch.testing.assert_close(torch.from_numpy(first["map"]), naive.values, rtol=0, atol=1e-5)


def test_every_kind_of_source_lists_the_same_images(tmp_path):
    paths = write_photos(tmp_path / "photos", 3)
    (tmp_path / "photos" / "notes.md").write_text("not an image")
    (tmp_path / "list.txt").write_text("# photos\n" + "".join(f"photos/{p.name}\n" for p in paths))
    (tmp_path / "list.csv").write_text(
        "path,target\n" + "".join(f"photos/{p.name},{i}\n" for i, p in enumerate(paths))
    )
    (tmp_path / "bare.csv").write_text(f"{paths[0]}\n{paths[1]},7\n")
    pq.write_table(
        pa.table({"path": [str(p) for p in paths], "target": [None, 2, None]}), tmp_path / "t.parquet"
    )
    sources = {
        "folder": tmp_path / "photos",
        "glob": str(tmp_path / "**" / "*.png"),
        "txt": tmp_path / "list.txt",
        "csv": tmp_path / "list.csv",
        "parquet": tmp_path / "t.parquet",
        "list": paths,
    }
    for name, source in sources.items():
        table = kfx.read_results(tmp_path / name) if explain(source, tmp_path / name) else None
        assert sorted(table["path"]) == sorted(str(p) for p in paths), name
        assert (table["status"] == "ok").all(), name
    by_path = kfx.read_results(tmp_path / "csv").set_index("path")
    for i, path in enumerate(paths):  # the manifest's targets are explained, not the predicted class
        assert by_path.loc[str(path), "target"] == i
        assert torch.equal(torch.from_numpy(by_path.loc[str(path), "map"]), oracle_for_target(path, i))
    bare = kfx.read_results(tmp_path / "parquet").set_index("path")
    assert bare.loc[str(paths[1]), "requested_target"] == "2" and bare.loc[str(paths[1]), "target"] == 2
    explain(tmp_path / "bare.csv", tmp_path / "bare")
    assert list(kfx.read_results(tmp_path / "bare")["target"].iloc[[1]]) == [7]


def oracle_for_target(path, target: int) -> torch.Tensor:
    loaded = load_model(TINY)
    image = loaded.prepare(read_pixels(str(path)), SIZE)
    return kfx.compile(loaded.model, (3, SIZE, SIZE), PATCH)(image, target).values


def test_an_nn_module_with_its_own_preprocessing_and_labels(tmp_path):
    from cli_models import tiny

    from kfx.models import resize_crop

    paths = write_photos(tmp_path / "photos", 2)
    model, labels = tiny(), [f"kind {i}" for i in range(10)]
    (tmp_path / "t.csv").write_text(f"path,target\n{paths[0]},kind 3\n{paths[1]},\n")

    def symmetric(unit):
        return unit * 2 - 1

    kfx.explain_dataset(
        tmp_path / "t.csv", model, PATCH, tmp_path / "out", size=SIZE, preprocess=symmetric, labels=labels
    )
    table = kfx.read_results(tmp_path / "out").set_index("path")
    engine = kfx.compile(model, (3, SIZE, SIZE), PATCH)
    for path, target in [(paths[0], 3), (paths[1], None)]:
        expected = engine(symmetric(resize_crop(read_pixels(str(path)), SIZE)), target)
        row = table.loc[str(path)]
        assert (row["target"], row["label"]) == (expected.target, labels[expected.target])
        assert torch.equal(torch.from_numpy(row["map"]), expected.values)
    assert table.loc[str(paths[0]), "target"] == 3
    with pytest.raises(kfx.InputError, match="preprocess and labels apply to an nn.Module"):
        kfx.explain_dataset(paths, TINY, PATCH, tmp_path / "o", preprocess=symmetric)
    with pytest.raises(kfx.InputError, match="matches no class name"):
        kfx.explain_dataset(paths, model, PATCH, tmp_path / "o", size=SIZE, labels=labels, target="zebra")


def test_rerun_skips_what_is_done_and_a_new_configuration_does_not_mix(tmp_path):
    paths = write_photos(tmp_path / "photos", 3)
    out = tmp_path / "out"
    first = explain(tmp_path / "photos", out)
    again = explain(tmp_path / "photos", out)
    assert (again.done, again.skipped, again.failed) == (0, 3, 0)
    assert len(rows_in_parts(out)) == 3 and again.folder == first.folder
    # an edited file is explained again (its content hash changed); the others are not
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(paths[0])
    edited = explain(tmp_path / "photos", out)
    assert (edited.done, edited.skipped) == (1, 2)
    table = kfx.read_results(out).set_index("path")
    assert len(table) == 3 and len(kfx.read_results(out, history=True)) == 4  # the old row stays in history
    row = table.loc[str(paths[0])]
    assert row["content_hash"] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert torch.equal(torch.from_numpy(row["map"]), oracle(paths[0]).values)
    # another stride is another configuration: its own folder, nothing skipped, never mixed
    other = kfx.explain_dataset(tmp_path / "photos", TINY, 8, out, size=SIZE, stride=2)
    assert (other.done, other.skipped) == (3, 0) and other.folder != first.folder
    with pytest.raises(kfx.InputError, match="2 configurations.*fingerprint="):
        kfx.read_results(out)
    strided = kfx.read_results(out, fingerprint=other.fingerprint[:10])
    assert len(strided) == 3 and {tuple(s) for s in strided["stride"]} == {(2, 2)}


def bad_inputs(folder: Path) -> dict[str, Path]:
    """A file that is no image, a truncated PNG, and a 32-bit image outside every range kfx reads."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"this is not a picture")
    good = write_photos(folder / "tmp", 1)[0].read_bytes()
    truncated = folder / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    wrong_mode = folder / "negative.tif"
    Image.fromarray(np.full((40, 40), -5, np.int32)).save(wrong_mode)
    for p in (folder / "tmp").iterdir():
        p.unlink()
    (folder / "tmp").rmdir()
    return {"garbage": garbage, "truncated": truncated, "wrong mode": wrong_mode}


def test_bad_inputs_become_error_rows_and_the_run_goes_on(tmp_path):
    good = write_photos(tmp_path / "photos", 2)
    bad = bad_inputs(tmp_path / "photos")
    missing = tmp_path / "photos" / "gone.png"
    manifest = tmp_path / "all.txt"
    manifest.write_text("".join(f"{p}\n" for p in [good[0], *bad.values(), missing, good[1]]))
    summary = explain(manifest, tmp_path / "out")
    assert (summary.done, summary.failed) == (2, 4)
    table = kfx.read_results(tmp_path / "out").set_index("path")
    for path in good:
        assert torch.equal(torch.from_numpy(table.loc[str(path), "map"]), oracle(path).values)
    for path in [*bad.values(), missing]:
        row = table.loc[str(path)]
        assert row["status"] == "error" and row["map"] is None and str(path) in row["error"]
    assert "no such file" in table.loc[str(missing), "error"].lower()
    assert "32-bit integer pixels" in table.loc[str(bad["wrong mode"]), "error"]
    listed = summary.failures.read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(str(p) for p in [*bad.values(), missing])
    # error rows are retried: once fixed, the input is explained and the failure list shrinks
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(bad["garbage"], format="PNG")
    rerun = explain(manifest, tmp_path / "out")
    assert (rerun.done, rerun.skipped, rerun.failed) == (1, 2, 3)
    table = kfx.read_results(tmp_path / "out").set_index("path")
    assert table.loc[str(bad["garbage"]), "status"] == "ok" and len(table) == 6
    assert torch.equal(torch.from_numpy(table.loc[str(bad["garbage"]), "map"]), oracle(bad["garbage"]).values)
    assert len(rerun.failures.read_text().splitlines()) == 3


def _make_read_only(folder: Path):
    """Root ignores permission bits, so as root the folder is made immutable instead."""
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)


def test_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys):
    write_photos(tmp_path / "photos", 1)
    undo = _make_read_only(tmp_path / "locked")
    try:
        # a model that cannot load: the folder must be reported first, before the model is touched
        with pytest.raises(OutputError, match="cannot write results in .*locked"):
            kfx.explain_dataset(tmp_path / "photos", "cli_models:not_a_model", 8, tmp_path / "locked")
        code = cli.main(["batch", str(tmp_path / "photos"), "--out", str(tmp_path / "locked" / "sub")])
        err = capsys.readouterr().err
        assert (
            code == 1 and err.startswith("kfx: error: cannot write results in") and len(err.splitlines()) == 1
        )
    finally:
        undo()
    assert not any((tmp_path / "locked").iterdir())


@pytest.fixture
def tiny_disk(tmp_path):
    """A 40 KiB file system (tmpfs): room for a few parts, then ENOSPC. Needs root (mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_the_run_with_whole_parts_and_the_rerun_finishes(tmp_path, tiny_disk):
    paths = write_photos(tmp_path / "photos", 12)
    with pytest.raises(OutputError, match="No space left on device.*every earlier part is whole"):
        explain(tmp_path / "photos", tiny_disk / "out", part_rows=1)
    written = rows_in_parts(tiny_disk / "out")  # each part readable: none was left half-written
    assert 1 <= len(written) < len(paths)
    assert not [p for p in (tiny_disk / "out").rglob(".*") if p.suffix == ".parquet"]  # no temporary left
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    resumed = explain(tmp_path / "photos", tiny_disk / "out", part_rows=1)
    assert (resumed.skipped, resumed.done) == (len(written), len(paths) - len(written))
    assert sorted(r["path"] for r in rows_in_parts(tiny_disk / "out")) == sorted(str(p) for p in paths)


SLOW_RUN = """
import sys, time
import kfx.dataset
explain = kfx.dataset.Explainer.explain
def slowly(self, item, content=None):  # each image takes a while, so the run can be stopped midway
    row = explain(self, item, content)
    print("explained", flush=True)  # the test waits for these lines before stopping the run
    time.sleep(0.3)
    return row
kfx.dataset.Explainer.explain = slowly
from kfx import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def start_slow_batch(source, out, part_rows: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    args = ["batch", str(source), "--out", str(out), "--model", TINY, "--size", str(SIZE), "--patch", "8"]
    args += ["--stride", "4", "--part-rows", str(part_rows), "-q"]
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_RUN), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(out: Path, count: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(rows_in_parts(out)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run wrote no parts"
        time.sleep(0.05)


def test_sigkill_midway_then_rerun_explains_each_image_exactly_once(tmp_path):
    paths = write_photos(tmp_path / "photos", 8)
    out = tmp_path / "out"
    process = start_slow_batch(tmp_path / "photos", out, part_rows=1)
    wait_for_rows(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    before = rows_in_parts(out)
    assert 3 <= len(before) < len(paths)  # killed midway, and every part it left is whole
    resumed = explain(tmp_path / "photos", out)
    assert (resumed.skipped, resumed.done) == (len(before), len(paths) - len(before))
    rows = rows_in_parts(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)  # each exactly once
    explain(tmp_path / "photos", tmp_path / "uninterrupted")
    whole = kfx.read_results(tmp_path / "uninterrupted").set_index("path")
    for row in rows:
        assert torch.equal(torch.tensor(row["map"]), torch.from_numpy(whole.loc[row["path"], "map"]).ravel())
        expected = oracle(row["path"]).values.ravel()
        torch.testing.assert_close(torch.tensor(row["map"]), expected, rtol=0, atol=1e-6)


DIES_WRITING_THIRD_PART = """
import io, os, signal, sys
import pyarrow.parquet as pq
write_table, parts = pq.write_table, []
def dies_halfway(table, where, **options):  # the power fails while the third part is being written
    parts.append(where)
    if len(parts) == 3:
        buffer = io.BytesIO()
        write_table(table, buffer)
        with open(where, "wb") as file:
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return write_table(table, where, **options)
pq.write_table = dies_halfway
from kfx import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_while_writing_a_part_leaves_only_whole_parts(tmp_path):
    paths = write_photos(tmp_path / "photos", 6)
    out = tmp_path / "out"
    args = ["batch", tmp_path / "photos", "--out", out, "--model", TINY, "--size", SIZE, "--patch", 8]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", textwrap.dedent(DIES_WRITING_THIRD_PART), *map(str, args)]
    process = subprocess.run([*command, "--stride", "4", "--part-rows", "1"], env=env, capture_output=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert len(rows_in_parts(out)) == 2  # the half-written third part is not among them
    resumed = explain(tmp_path / "photos", out)
    assert (resumed.skipped, resumed.done) == (2, 4)
    assert sorted(r["path"] for r in rows_in_parts(out)) == sorted(str(p) for p in paths)


def test_ctrl_c_writes_what_is_finished_and_exits_130(tmp_path):
    paths = write_photos(tmp_path / "photos", 8)
    out = tmp_path / "out"
    process = start_slow_batch(tmp_path / "photos", out, part_rows=100)  # no part until the end
    for _ in range(2):  # two images explained, none written yet
        assert process.stdout.readline() == "explained\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.startswith("kfx: error: interrupted (Ctrl-C);") and len(err.splitlines()) == 1, err
    written = rows_in_parts(out)
    assert 1 <= len(written) < len(paths) and f"{len(written)} results" in err
    resumed = explain(tmp_path / "photos", out)
    assert (resumed.skipped, resumed.done) == (len(written), len(paths) - len(written))


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_batch_summary_failures_and_usage_errors(tmp_path, capsys):
    write_photos(tmp_path / "photos", 2)
    common = ["--out", tmp_path / "out", "--model", TINY, "--size", SIZE, "--patch", 8, "--stride", 4]
    code, out, err = run(capsys, "batch", tmp_path / "photos", *common)
    assert (code, err) == (0, "") and "2 explained, 0 skipped" in out
    table = kfx.read_results(tmp_path / "out")
    for _, row in table.iterrows():
        assert torch.equal(torch.from_numpy(row["map"]), oracle(row["path"]).values)
    bad_inputs(tmp_path / "photos")
    code, out, err = run(capsys, "batch", tmp_path / "photos", *common)
    assert code == 1 and "0 explained, 2 skipped" in out and "3 failed" in out
    assert err.startswith("kfx: error: 3 of 5 inputs failed; they are listed in") and err.strip().endswith(
        "failures.txt"
    )
    assert len(err.splitlines()) == 1
    for args, status, fragment in [
        (["--actors", "2"], 2, "--actors and --threads apply to --ray"),
        (["--patch", "64"], 2, "larger than the image"),
        (["--target", "cat"], 1, "no label names"),
    ]:
        code, _, err = run(capsys, "batch", tmp_path / "photos", *common, *args)
        assert code == status and err.startswith("kfx: error: ") and fragment in err, err
        assert len(err.splitlines()) == 1
    code, _, err = run(capsys, "batch", tmp_path / "nowhere", "--out", tmp_path / "o2")
    assert code == 1 and "no such folder or file" in err and len(err.splitlines()) == 1
