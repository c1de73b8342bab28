"""kfx.explain_dataset(..., runner="ray") and ``kfx batch --ray`` on a local Ray with 2 CPUs: the
same rows as the local run and as kfx.compile(...)(image), the same resume rule across runners."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from test_dataset import PATCH, SIZE, TINY, bad_inputs, oracle, rows_in_parts, write_photos
from test_dataset_outputs import drill_down_oracle, pixels

import kfx
import kfx.dataset
from kfx import cli
from kfx.models import load_model, read_pixels


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray for the module, sized like the CI machine (2 CPUs); explain_dataset joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_rows_equal_the_oracle_and_resume_the_local_run(tmp_path):
    paths = write_photos(tmp_path / "photos", 4)
    bad = bad_inputs(tmp_path / "photos")
    out = tmp_path / "out"
    # half of the work done by the local runner first: Ray must skip exactly that half
    local = kfx.explain_dataset(paths[:2], TINY, PATCH, out, size=SIZE)
    assert local.done == 2
    summary = kfx.explain_dataset(tmp_path / "photos", TINY, PATCH, out, size=SIZE, runner="ray", actors=2)
    assert (summary.done, summary.skipped, summary.failed) == (2, 2, 3)
    assert summary.folder == local.folder  # the same configuration, whichever runner
    rows = rows_in_parts(out)
    explained = sorted(r["path"] for r in rows if r["status"] == "ok")
    assert explained == sorted(str(p) for p in paths)  # each image exactly once
    table = kfx.read_results(out).set_index("path")
    for path in paths:
        assert torch.equal(torch.from_numpy(table.loc[str(path), "map"]), oracle(path).values)
    for path in bad.values():
        assert table.loc[str(path), "status"] == "error" and str(path) in table.loc[str(path), "error"]
    again = kfx.explain_dataset(tmp_path / "photos", TINY, PATCH, out, size=SIZE, runner="ray", actors=2)
    assert (again.done, again.skipped, again.failed) == (0, 4, 3)


def test_ray_drill_down_rows_and_files_equal_the_local_run(tmp_path):
    write_photos(tmp_path / "photos", 3)
    drill_down, out = kfx.DrillDown(target_speedup=2), tmp_path / "out"
    options = {"size": SIZE, "drill_down": drill_down, "png": True, "npy": True}
    summary = kfx.explain_dataset(tmp_path / "photos", TINY, PATCH, out, runner="ray", actors=2, **options)
    assert (summary.done, summary.failed, summary.files_written) == (3, 0, 3)
    local = kfx.explain_dataset(tmp_path / "photos", TINY, PATCH, tmp_path / "local", **options)
    assert local.fingerprint == summary.fingerprint
    table = kfx.read_results(out)
    for _, row in table.iterrows():
        expected = drill_down_oracle(row["path"], drill_down)
        assert row["approximate"] and torch.equal(torch.from_numpy(row["map"]), expected.values)
        assert torch.equal(kfx.dataset.heatmap(row).measured, expected.measured)
        files, local_files = (
            kfx.dataset.image_files(out, row),
            kfx.dataset.image_files(tmp_path / "local", row),
        )
        assert np.array_equal(np.load(files["npy"]), row["map"])
        assert np.array_equal(np.load(files["npy"]), np.load(local_files["npy"]))
        assert np.array_equal(pixels(files["png"]), pixels(local_files["png"]))
    # the same settings resume across runners
    again = kfx.explain_dataset(tmp_path / "photos", TINY, PATCH, out, **options)
    assert (again.folder, again.done, again.skipped, again.files_written) == (summary.folder, 0, 3, 0)


def test_cli_batch_ray_joins_the_running_ray(tmp_path, capsys):
    paths = write_photos(tmp_path / "photos", 2)
    args = ["batch", tmp_path / "photos", "--out", tmp_path / "out", "--model", TINY, "--size", SIZE]
    code = cli.main([str(a) for a in [*args, "--patch", "8", "--stride", "4", "--ray", "--threads", "1"]])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, ""), captured.err
    assert "2 explained, 0 skipped" in captured.out
    table = kfx.read_results(tmp_path / "out").set_index("path")
    for path in paths:
        assert torch.equal(torch.from_numpy(table.loc[str(path), "map"]), oracle(path).values)


def test_a_model_kfx_refuses_fails_with_kfx_error_not_a_dead_actor(tmp_path):
    from cli_models import tiny

    write_photos(tmp_path / "photos", 1)
    with pytest.raises(kfx.ModelError, match="training mode"):
        kfx.explain_dataset(tmp_path / "photos", tiny().train(), PATCH, tmp_path / "out", runner="ray")


def _descends_from_this_process(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def map_worker_pids() -> list[int]:
    """This test's Ray Data actor processes (Ray titles them ray::MapWorker(...)), none of another
    user's Ray: Ray's raylet, and so its workers, descend from the process that started it."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::MapWorker"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in pids if _descends_from_this_process(pid)]


def test_a_worker_killed_midway_costs_time_not_results(tmp_path):
    paths = write_photos(tmp_path / "photos", 24)
    out, killed = tmp_path / "out", []

    def kill_a_worker_once_rows_arrive():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = map_worker_pids()
            if pids and rows_in_parts(out):
                written = len(rows_in_parts(out))
                os.kill(pids[0], signal.SIGKILL)
                killed.append(written)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_once_rows_arrive)
    killer.start()
    patch = kfx.Patch(4, stride=1)  # about 0.3 s an image: the kill lands while others are running
    summary = kfx.explain_dataset(
        tmp_path / "photos", TINY, patch, out, size=128, runner="ray", actors=2, part_rows=1
    )
    killer.join()
    assert killed and killed[0] < len(paths), "no worker was killed while the run was going on"
    assert (summary.done, summary.failed) == (len(paths), 0)
    rows = rows_in_parts(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)  # each exactly once
    loaded = load_model(TINY)
    engine = kfx.compile(loaded.model, (3, 128, 128), patch)
    for row in rows[:4]:
        expected = engine(loaded.prepare(read_pixels(row["path"]), 128)).values.ravel()
        torch.testing.assert_close(torch.tensor(row["map"]), expected, rtol=0, atol=1e-6)


SMALL_PATCH = kfx.Patch(16, stride=8)  # 9 positions on 32 px: the default plan runs full inference


@pytest.mark.library_defaults
def test_ray_actors_group_small_images_and_give_each_its_own_map(tmp_path):
    paths = write_photos(tmp_path / "photos", 5)
    corrupt = tmp_path / "photos" / "photo2b.png"  # among the good ones: inside a group
    corrupt.write_bytes(b"not a picture")
    summary = kfx.explain_dataset(
        tmp_path / "photos", TINY, SMALL_PATCH, tmp_path / "out", size=SIZE, runner="ray", actors=2
    )
    assert (summary.done, summary.failed) == (5, 1)
    table = kfx.read_results(tmp_path / "out").set_index("path")
    loaded = load_model(TINY)
    engine = kfx.compile(loaded.model, (3, SIZE, SIZE), SMALL_PATCH, plan="incremental")  # one by one
    maps = []
    for path in paths:
        expected = engine(loaded.prepare(read_pixels(str(path)), SIZE))
        row = table.loc[str(path)]
        assert row["status"] == "ok" and row["target"] == expected.target
        maps.append(torch.from_numpy(row["map"]))
        torch.testing.assert_close(maps[-1], expected.values, rtol=0, atol=1e-6)
    assert all(not torch.allclose(a, b, atol=1e-4) for i, a in enumerate(maps) for b in maps[i + 1 :])
    assert table.loc[str(corrupt), "status"] == "error" and str(corrupt) in table.loc[str(corrupt), "error"]


@pytest.mark.library_defaults
def test_an_actor_runs_its_pending_small_images_in_shared_batches_and_marks_the_skipped(tmp_path):
    from kfx import _dataset_io as io
    from kfx._dataset_ray import SKIPPED, _RayExplainer

    paths = write_photos(tmp_path / "photos", 4)
    setup = kfx.dataset._setup(
        TINY, SMALL_PATCH, None, None, 1.0, None, SIZE, None, None, None, None, None, "cpu"
    )
    done = {io.row_key(str(paths[1]), io.content_hash(str(paths[1])), None)}  # finished earlier
    batches = []  # the batch sizes the model's head runs at; hooked before compiling, as kfx requires
    hook = setup.loaded.model[-1].register_forward_hook(
        lambda module, args, out: batches.append(args[0].shape[0])
    )
    actor = _RayExplainer(setup, done, threads=torch.get_num_threads())
    batches.clear()  # compiling's own checks ran it too
    import pyarrow as pa

    rows = actor(pa.Table.from_pylist([{"path": str(p), "target": None} for p in paths])).to_pylist()
    assert [row["path"] for row in rows] == [str(p) for p in paths]  # in order
    assert rows[1]["status"] == SKIPPED and [rows[i]["status"] for i in (0, 2, 3)] == ["ok"] * 3
    # each pending image's unoccluded run (batch 1), then their 3 x 9 positions in one model call:
    # grouped, none dropped
    assert batches == [1, 1, 1, 27]
    hook.remove()
    engine = kfx.compile(setup.loaded.model, (3, SIZE, SIZE), SMALL_PATCH, plan="incremental")
    for i in (0, 2, 3):
        expected = engine(setup.loaded.prepare(read_pixels(str(paths[i])), SIZE)).values.ravel()
        torch.testing.assert_close(torch.tensor(rows[i]["map"]), expected, rtol=0, atol=1e-6)
